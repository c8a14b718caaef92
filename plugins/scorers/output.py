"""SubFit's selection score: each candidate's effect on the model's output with its fitted
bypass in place, measured on the scoring windows from the cached residual stream in front of it
(only the submodules after it are re-run).

    score_s = M(model with s -> bypass_s) - M(model)
    M = kl:   mean KL(dense next-token distribution || candidate's)
        loss: mean next-token cross-entropy
        js:   mean Jensen-Shannon divergence between the two distributions (FinerCut)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from subfit_core.interfaces import Scorer
from subfit_core.progress import progress


@dataclass
class OutputParams:
    metric: Literal["kl", "loss", "js"] = "kl"


class OutputScorer(Scorer):
    Params = OutputParams
    description = "change in output KL (or loss, JS) on the scoring windows with the bypass in place"
    scores_groups = True

    def score_groups(self, groups, bench, fitter):
        base = bench.metric(self.params.metric)
        return [bench.metric_with_many({s: bench.fit(fitter, s) for s in group}, self.params.metric) - base
                for group in progress(groups, desc="scoring candidates")]
