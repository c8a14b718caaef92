"""Greedy non-contiguous selection over attention and FFN submodules until the budget is met.

Candidates are ranked by score per unit of budget saved (``ratio``), so the attention/FFN split
of the budget follows from what each type costs and saves rather than from the raw scores.
With ``rescore``, the selection proceeds in ``rounds``: each round commits its share of the
budget, then re-scores a shortlist of the best remaining candidates on the partially compressed
model (re-running only from each candidate onward, from cached boundary states). With
``anchored``, each round first refits the bypasses chosen so far on the compressed model's own
inputs (as the final anchored refit will) and fits the shortlist the same way, so the re-scoring
judges each candidate with the bypass it would end up with, downstream of bypasses as they will be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from subfit_core.engine.interfaces import Plan, Replacement, Selector, Submodule
from subfit_core.errors import ConfigError

from .budget_fill import achieved as achieved_of
from .budget_fill import marginal, pick


@dataclass
class GreedyParams:
    ratio: bool = True  # rank by score / budget saved
    rescore: bool = True
    rounds: int = 4
    shortlist: float = 3.0  # re-score this multiple of the picks a round still needs
    kinds: str = "attn,ffn"  # which submodule types are candidates
    anchored: bool = False  # between rounds, refit the chosen and fit the shortlist on the compressed model's inputs

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds: {self.rounds} must be at least 1")
        bad = set(self.kinds.split(",")) - {"attn", "ffn"}
        if bad:
            raise ValueError(f"kinds: {self.kinds!r} may list only attn, ffn")
        if self.anchored and not (self.rescore and self.rounds > 1):
            raise ValueError(f"anchored: true acts between rounds; it needs rescore: true and rounds > 1 "
                             f"(got rescore: {self.rescore}, rounds: {self.rounds})")


class GreedySelector(Selector):
    Params = GreedyParams
    description = "greedy non-contiguous attention/FFN selection, optionally re-scored in rounds"

    def select(self, bench, scorer, fitter, budget):
        kinds = set(self.params.kinds.split(","))
        if self.params.anchored and not fitter.supports_anchored:
            raise ConfigError(f"selector.anchored: true needs a fitter that refits on the compressed model's inputs; "
                              f"fitter {type(fitter).__name__} does not (set selector.anchored: false)")
        remaining = [s for s in bench.subs if s.kind in kinds]
        dim = bench.adapter.hidden_size
        saving = {s: budget.saving(s, fitter.estimate_params(s, dim)) for s in remaining}
        remaining = [s for s in remaining if saving[s] > 0]
        scores = scorer.score(remaining, bench, fitter)
        plan, achieved = Plan(), 0.0
        rounds = self.params.rounds if self.params.rescore else 1

        def key(s: Submodule) -> float:
            return scores[s] / saving[s] if self.params.ratio else scores[s]

        for round_ in range(rounds):
            last = round_ == rounds - 1
            # this round's share of what is still missing
            target = budget.sparsity if last else achieved + (budget.sparsity - achieved) / (rounds - round_)
            while achieved < target - 1e-9 and remaining:
                gain = marginal(budget, fitter, plan.subs, remaining, dim) if last else saving
                best = pick(remaining, key, scores, gain, budget.sparsity - achieved if last else None)
                remaining.remove(best)
                plan.replacements.append(Replacement(best, scores[best]))
                achieved = achieved_of(budget, fitter, plan.subs, dim)
                if self.params.rescore:
                    bench.commit(best, bench.fit(fitter, best))
            if round_ < rounds - 1 and remaining and achieved < budget.sparsity:
                still = budget.sparsity - achieved
                mean_saving = sum(saving.values()) / len(saving)
                k = max(1, math.ceil(self.params.shortlist * still / mean_saving))
                shortlist = sorted(remaining, key=key)[:k]
                if self.params.anchored:
                    bench.reanchor(fitter, plan.subs, shortlist)
                scores.update(scorer.score(shortlist, bench, fitter))
        if achieved < budget.sparsity - 1e-9:
            plan.notes["warning"] = f"budget not reachable with these candidates: {achieved:.4f} < {budget.sparsity}"
        plan.notes["estimated_sparsity"] = achieved
        return plan
