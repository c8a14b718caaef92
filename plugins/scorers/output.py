"""SubFit's selection score: each candidate's effect on the model's output with its fitted
bypass in place, measured on the scoring windows from the cached residual stream in front of it
(only the submodules after it are re-run).

    score_s = M(model with s -> bypass_s) - M(model)
    M = a registered metric (``subfit_metrics``); built in: kl, the mean KL(dense next-token
        distribution || candidate's); loss, the mean next-token cross-entropy; js, the mean
        Jensen-Shannon divergence between the two distributions (FinerCut)
"""

from __future__ import annotations

from dataclasses import dataclass

from subfit_core.engine.interfaces import Scorer
from subfit_core.plugins import require


@dataclass
class OutputParams:
    metric: str = "kl"  # a registered metric


class OutputScorer(Scorer):
    Params = OutputParams
    description = "change in output KL (or loss, JS) on the scoring windows with the bypass in place"
    scores_groups = True

    def __init__(self, params=None, plugins=None):
        super().__init__(params, plugins)
        require(plugins, "metric", self.params.metric, "scorer.metric")

    def score_groups(self, groups, bench, fitter):
        base = bench.metric(self.params.metric)
        candidates = [{s: bench.fit(fitter, s) for s in group} for group in groups]
        return [value - base for value in bench.metrics_with_each(candidates, self.params.metric)]
