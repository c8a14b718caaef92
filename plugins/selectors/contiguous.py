"""Contiguous window (UIDL, and SubFit's bypasses on one block): the n consecutive whole layers,
n the fewest whose removal meets the budget, where the scorer rates the window best; every
submodule in it gets the fitter's bypass."""

from __future__ import annotations

from dataclasses import dataclass

from subfit_core.engine.interfaces import Plan, Replacement, Selector

from .budget_fill import achieved


@dataclass
class ContiguousParams:
    keep_last: bool = False  # never include the final layer in the window
    keep_first: bool = False  # never include layer 0 (ReplaceMe folds its map into the layer in front)


class ContiguousSelector(Selector):
    Params = ContiguousParams
    description = "one window of consecutive layers, the best-scored of the smallest size that meets the budget"

    def needs_group_scores(self):
        return True

    def selects_whole_layers(self):
        return True

    def select(self, bench, scorer, fitter, budget):
        dim = bench.adapter.hidden_size
        lo = 1 if self.params.keep_first else 0
        layer_subs = bench.layer_groups()[lo:bench.adapter.num_layers - (1 if self.params.keep_last else 0)]
        n_layers = len(layer_subs)
        def window_saving(start: int, n: int) -> float:
            return achieved(budget, fitter, [s for subs in layer_subs[start:start + n] for s in subs], dim)

        n = 1
        while n < n_layers and max(window_saving(i, n) for i in range(n_layers - n + 1)) < budget.sparsity - 1e-9:
            n += 1
        windows = [tuple(s for subs in layer_subs[i:i + n] for s in subs) for i in range(n_layers - n + 1)]
        windows = [w for i, w in enumerate(windows) if window_saving(i, n) >= budget.sparsity - 1e-9] or windows
        scores = scorer.score_groups(windows, bench, fitter)
        best = min(range(len(windows)), key=lambda i: scores[i])
        plan = Plan([Replacement(s, scores[best]) for s in windows[best]])
        plan.notes["window"] = [windows[best][0].layer, windows[best][-1].layer]
        plan.notes["window_scores"] = {f"L{w[0].layer}-L{w[-1].layer}": sc for w, sc in zip(windows, scores)}
        plan.notes["estimated_sparsity"] = achieved(budget, fitter, windows[best], dim)
        return plan
