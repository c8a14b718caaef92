"""Closed-form linear bypasses: ridge regression and reduced-rank regression, in float64.

With X = [x, 1] (the bypass input plus a constant for the intercept) and Y the submodule's
contribution: G = X^T X, H = X^T Y, and
    ridge:         W = (G + lam * tr(G)/d * I)^-1 H          (the intercept is not penalised;
                   ``subfit_core`` ``ridge_solve``)
    reduced rank:  V_r = top-r eigenvectors of W_x^T C W_x (the covariance of the fitted values,
                   C the centred input covariance), W_r = (W_x V_r) V_r^T stored as a down (r x d)
                   and an up (d x r) factor; the intercept is refitted freely for W_r.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from subfit_core.engine.bypass import LinearBypass, LowRankBypass
from subfit_core.engine.interfaces import Fitter, Submodule
from subfit_core.engine.stats import SubStats, ridge_solve


def without_intercept(stats: SubStats) -> tuple[torch.Tensor, torch.Tensor]:
    """G and H with the intercept row/column replaced by zeros (a fit through the origin)."""
    gram, cross = stats.gram.clone(), stats.cross.clone()
    gram[-1, :] = 0.0
    gram[:, -1] = 0.0
    gram[-1, -1] = 1.0
    cross[-1, :] = 0.0
    return gram, cross


def gram_of(stats: SubStats, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (stats.gram, stats.cross) if bias else without_intercept(stats)


def top_eigvecs(m: torch.Tensor, r: int) -> torch.Tensor:
    """Columns: the r leading eigenvectors of a symmetric matrix."""
    _, vecs = torch.linalg.eigh(symmetrized(m))
    return vecs[:, -r:].flip(-1)


def symmetrized(m: torch.Tensor) -> torch.Tensor:
    """(M + M^T) / 2 with one d x d temporary (the halving in place)."""
    return (m + m.T).div_(2)


def top_eigvecs_randomized(apply: Callable[[torch.Tensor], torch.Tensor], d: int, r: int, dtype: torch.dtype,
                           device: torch.device | str = "cpu", oversample: int = 16, iterations: int = 4,
                           seed: int = 0) -> torch.Tensor:
    """The r leading eigenvectors of a symmetric PSD operator ``apply`` (X -> M X) on R^d, by
    randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4) and Rayleigh-Ritz:
    O(d^2 (r + p) q) instead of eigh's O(d^3), and M itself is never formed. Seeded: the same
    operator always gives the same basis."""
    g = torch.Generator(device="cpu").manual_seed(seed)  # drawn on the CPU: the same start on every device
    start = torch.randn(d, min(d, r + oversample), generator=g, dtype=dtype, device="cpu").to(device)
    q, _ = torch.linalg.qr(apply(start))
    for _ in range(iterations):
        q, _ = torch.linalg.qr(apply(q))
    small = q.T @ apply(q)
    _, vecs = torch.linalg.eigh((small + small.T) / 2)
    return q @ vecs[:, -r:].flip(-1)


def centered_gram(gram: torch.Tensor) -> torch.Tensor:
    """Covariance-like Gram of the inputs about their mean: G_xx - n mu mu^T."""
    d = gram.shape[0] - 1
    n = gram[d, d].clamp_min(1.0)
    mu = gram[d, :d] / n
    return torch.addr(gram[:d, :d], mu, mu, alpha=-float(n))  # one d x d result, no outer product kept


def reduced_rank(gram: torch.Tensor, cross: torch.Tensor, w: torch.Tensor, r: int, bias: bool,
                 solver: str = "auto"):
    """Rank-r factors of the ridge fit ``w``: (down r x d, up d_out x r, bias or None).

    V = top-r eigenvectors of the fitted values' covariance W_x^T C W_x (C the input covariance,
    centred when there is an intercept, so the rank limit applies to the map and not to the
    mean); W_r = (W_x V) V^T and the intercept is refitted freely: b = mean(y) - mean(x) W_r.
    ``solver``: exact (eigh of the d x d matrix), randomized (subspace iteration on X -> W_x^T C W_x X,
    never forming it), auto (randomized when r is small against a wide d, where eigh's d^3 dominates).
    """
    d = gram.shape[0] - 1
    wx = w[:d]
    cov = centered_gram(gram) if bias else gram[:d, :d]
    if solver == "randomized" or (solver == "auto" and d >= RANDOMIZED_MIN_DIM and r <= d // 8):
        v = top_eigvecs_randomized(lambda x: wx.T @ (cov @ (wx @ x)), d, r, wx.dtype, wx.device)
    else:
        v = top_eigvecs(wx.T @ cov @ wx, r)
    down = (wx @ v).T
    if not bias:
        return down, v, None
    n = gram[d, d].clamp_min(1.0)
    b = cross[d] / n - (gram[d, :d] / n) @ wx @ v @ v.T
    return down, v, b


RANDOMIZED_MIN_DIM = 1024  # below this width eigh is cheap enough to be exact


def relative_residual(stats: SubStats, w: torch.Tensor) -> float:
    """||Y - XW||^2 / ||Y||^2 from the Gram matrices alone."""
    resid = stats.y_sq - 2 * float((w * stats.cross).sum()) + float((w * (stats.gram @ w)).sum())
    return max(resid, 0.0) / max(stats.y_sq, 1e-30)


def linear_bypass(w: torch.Tensor, dtype: torch.dtype, bias: bool) -> LinearBypass:
    d = w.shape[0] - 1
    return LinearBypass(w[:d].T.contiguous().to(dtype), w[d].to(dtype) if bias else None)


def lowrank_bypass(down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> LowRankBypass:
    return LowRankBypass(down.contiguous().to(dtype), up.contiguous().to(dtype), None if bias is None else bias.to(dtype))


@dataclass
class LinearParams:
    ridge: float = 1e-3  # relative to the mean input variance, tr(G)/d
    bias: bool = True


class LinearFitter(Fitter):
    """Full-rank ridge regression of the contribution on the submodule's normed input."""

    Params = LinearParams
    description = "full-rank ridge regression, closed form"

    def fit(self, sub: Submodule, stats: SubStats) -> LinearBypass:
        gram, cross = gram_of(stats, self.params.bias)
        w = ridge_solve(gram, cross, self.params.ridge, sub.name)
        return linear_bypass(w, torch.float32, self.params.bias)

    def estimate_params(self, sub: Submodule, dim: int) -> int:
        return dim * dim + (dim if self.params.bias else 0)


@dataclass
class LowRankParams:
    rank: int = 64
    ridge: float = 1e-3
    bias: bool = True
    solver: Literal["auto", "exact", "randomized"] = "auto"  # the top-r eigenvectors (see reduced_rank)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank: {self.rank} must be at least 1")


class LowRankFitter(Fitter):
    """Reduced-rank regression: the best rank-r linear map (for the unregularised objective)."""

    Params = LowRankParams
    description = "reduced-rank ridge regression (two factors d x r, r x d)"

    def fit(self, sub: Submodule, stats: SubStats) -> LowRankBypass:
        gram, cross = gram_of(stats, self.params.bias)
        w = ridge_solve(gram, cross, self.params.ridge, sub.name)
        down, up, bias = reduced_rank(gram, cross, w, min(self.params.rank, stats.dim), self.params.bias, self.params.solver)
        return lowrank_bypass(down, up, bias, torch.float32)

    def estimate_params(self, sub: Submodule, dim: int) -> int:
        r = min(self.params.rank, dim)
        return 2 * dim * r + (dim if self.params.bias else 0)
