"""SubFit's selection score: each candidate's effect on the model's output with its fitted
bypass in place, measured on the scoring windows from the cached residual stream in front of it
(only the submodules after it are re-run).

    score_s = M(model with s -> bypass_s) - M(model)
    M = kl:   mean KL(dense next-token distribution || candidate's)
        loss: mean next-token cross-entropy
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from subfit_core.interfaces import Scorer
from subfit_core.progress import progress


@dataclass
class OutputParams:
    metric: Literal["kl", "loss"] = "kl"


class OutputScorer(Scorer):
    Params = OutputParams
    description = "change in output KL (or loss) on the scoring windows with the bypass in place"

    def score(self, candidates, bench, fitter):
        base = bench.metric(self.params.metric)
        return {
            s: bench.metric_with(s, bench.fit(fitter, s), self.params.metric) - base
            for s in progress(candidates, desc="scoring candidates")
        }
