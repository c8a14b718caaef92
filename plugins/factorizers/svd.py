"""Low-rank factorizers: plain SVD, SVD-LLM (whitened, truncation-aware) and AA-SVD (anchored).

The closed forms are in ``closed_forms``; these classes say which statistics each needs. Budget,
ranks and block refinement are shared (``budgeted``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .budgeted import BudgetedFactorizer, FactorizerParams
from .closed_forms import (
    factor_anchored,
    factor_plain,
    factor_whitened,
    spectrum_plain,
    spectrum_whitened,
)


class SVDFactorizer(BudgetedFactorizer):
    description = "truncated SVD of each weight (no calibration data)"
    statistics = "none"

    def factor(self, name, weight, stats, rank):
        return factor_plain(weight, rank)

    def spectrum(self, name, weight, gram):
        return spectrum_plain(weight)


@dataclass
class SVDLLMParams(FactorizerParams):
    # whitening with X^T X + mu I, mu = ridge x mean(diag X^T X): 0 is the paper's; larger trusts the
    # calibration's input covariance less (very large: plain SVD). Measured on SmolLM2 in docs/guide.md.
    ridge: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.ridge < 0:
            raise ValueError(f"ridge: {self.ridge} must be >= 0")


class SVDLLMFactorizer(BudgetedFactorizer):
    Params = SVDLLMParams
    description = "SVD-LLM: SVD of W chol(X^T X) on dense inputs, truncation loss = sqrt(sum dropped sigma^2)"
    statistics = "dense"

    def factor(self, name, weight, stats, rank):
        return factor_whitened(weight, stats.gram, rank, name, self.params.ridge)

    def spectrum(self, name, weight, gram):
        return spectrum_whitened(weight, gram, name, self.params.ridge)


@dataclass
class AASVDParams(SVDLLMParams):
    # blend alpha X^T X_hat + (1 - alpha) X_hat^T X_hat: 1 = match the dense outputs, 0 = the layer's own
    # output on the shifted inputs. 0.5 measured best on SmolLM2 (docs/guide.md, low-rank section).
    alpha: float = 0.5
    # the same C + mu I, here on X_hat: a penalty mu ||W'||^2 on the anchored fit. 0 is the paper's
    # objective, which on SmolLM2 at kept 0.8 gave 15.8x perplexity against 1.80x with 1e-3 (docs/guide.md,
    # low-rank section)
    ridge: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha: {self.alpha} must be in [0, 1]")


class AASVDFactorizer(BudgetedFactorizer):
    Params = AASVDParams
    description = "AA-SVD: fit each linear to the dense outputs from the compressed model's inputs"
    statistics = "anchored"

    def factor(self, name, weight, stats, rank):
        return factor_anchored(weight, stats.gram_hat, stats.cross, rank, self.params.alpha, name, self.params.ridge)

    def spectrum(self, name, weight, gram):
        return spectrum_whitened(weight, gram, name)
