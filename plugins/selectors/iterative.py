"""Iterative removal (SLEB, BlockPruner, FinerCut): at every step each remaining candidate (a
whole layer, or one attention/FFN submodule) is tried on the current model with the fitter's
bypass in place, the one the scorer likes best is committed, and the rest are tried again.

Every trial re-runs only the submodules after the candidate, from the workbench's cached boundary
states, on the scoring windows (``scoring.samples``, ``scoring.stride``), or on the first
``scoring_samples`` of them when the recipe asks for a smaller subset."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from subfit_core.engine.interfaces import Plan, Replacement, Selector

from .budget_fill import achieved as achieved_of
from .budget_fill import marginal, pick


@dataclass
class IterativeParams:
    unit: Literal["submodule", "layer"] = "submodule"
    ratio: bool = False  # rank by score / budget saved (the published methods rank by score)
    scoring_samples: int | None = None  # judge trials on the first N scoring windows (None: all)


class IterativeSelector(Selector):
    Params = IterativeParams
    description = "re-score every remaining layer or submodule after each removal (SLEB, BlockPruner, FinerCut)"

    def needs_group_scores(self):
        return self.params.unit == "layer"

    def selects_whole_layers(self):
        return self.params.unit == "layer"

    def select(self, bench, scorer, fitter, budget):
        with bench.subset(self.params.scoring_samples):
            return self._select(bench, scorer, fitter, budget)

    def _select(self, bench, scorer, fitter, budget):
        dim = bench.adapter.hidden_size
        if self.params.unit == "layer":
            groups = bench.layer_groups()
        else:
            groups = [(s,) for s in bench.subs]
        saving = {g: sum(budget.saving(s, fitter.estimate_params(s, dim)) for s in g) for g in groups}
        remaining = [g for g in groups if saving[g] > 0]
        plan, achieved = Plan(), 0.0
        # Scores after the same committed steps are the same, so a run at a higher sparsity in the
        # same session (subfit-compare) replays the steps an earlier run already scored.
        memo = bench.memo.setdefault(("iterative", repr(self.params), type(scorer).__name__, repr(scorer.params),
                                      type(fitter).__name__, repr(fitter.params)), {})
        reused = [0, 0.0]
        while achieved < budget.sparsity - 1e-9 and remaining:
            state = tuple(plan.subs)
            if state in memo:
                scores, seconds = memo[state]
                reused[0], reused[1] = reused[0] + 1, reused[1] + seconds
            else:
                t0 = time.perf_counter()
                scores = dict(zip(remaining, scorer.score_groups(remaining, bench, fitter)))
                memo[state] = (scores, time.perf_counter() - t0)
            key = {g: scores[g] / saving[g] if self.params.ratio else scores[g] for g in remaining}.get
            gain = marginal(budget, fitter, plan.subs, remaining, dim)
            best = pick(remaining, key, scores, gain, budget.sparsity - achieved)
            remaining.remove(best)
            for sub in best:
                plan.replacements.append(Replacement(sub, scores[best]))
                bench.commit(sub, bench.fit(fitter, sub))
            achieved = achieved_of(budget, fitter, plan.subs, dim)
        if achieved < budget.sparsity - 1e-9:
            plan.notes["warning"] = f"budget not reachable with these candidates: {achieved:.4f} < {budget.sparsity}"
        plan.notes["estimated_sparsity"] = achieved
        if reused[0]:
            plan.notes["scores_reused"] = {"steps": reused[0], "seconds": reused[1]}
            plan.reused_seconds = reused[1]
        return plan
