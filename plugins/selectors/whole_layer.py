"""Whole-layer selection: remove entire decoder layers (attention and FFN together), lowest
layer score first, until the budget is met. Layer score = mean score of its submodules."""

from __future__ import annotations

from dataclasses import dataclass

from subfit_core.engine.interfaces import Plan, Replacement, Selector

from .budget_fill import achieved as achieved_of


@dataclass
class WholeLayerParams:
    overshoot: bool = True  # take the layer that crosses the budget (else stop just below it)


class WholeLayerSelector(Selector):
    Params = WholeLayerParams
    description = "one-shot removal of whole layers, lowest score first"

    def selects_whole_layers(self):
        return True

    def select(self, bench, scorer, fitter, budget):
        scores = scorer.score(bench.subs, bench, fitter)
        dim = bench.adapter.hidden_size
        groups = bench.layer_groups()
        layers = sorted(range(len(groups)), key=lambda l: sum(scores[s] for s in groups[l]))
        plan, achieved = Plan(), 0.0
        for layer in layers:
            if achieved >= budget.sparsity - 1e-9:
                break
            subs = list(groups[layer])
            after = achieved_of(budget, fitter, [*plan.subs, *subs], dim)
            if not self.params.overshoot and after > budget.sparsity + 1e-9:
                break
            plan.replacements.extend(Replacement(s, scores[s]) for s in subs)
            achieved = after
        plan.notes["layers_removed"] = sorted({r.sub.layer for r in plan.replacements})
        plan.notes["estimated_sparsity"] = achieved
        return plan
