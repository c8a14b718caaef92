"""Search the set of replaced submodules directly with Optuna, under the budget.

Each trial samples a priority per candidate; the mask is filled greedily by priority until the
budget is met, then every member the budget no longer needs is dropped (lowest priority first).
So every proposal is feasible by construction: it reaches the requested sparsity and removes
nothing it does not need to. A mask is judged by the output metric on the scoring windows with
all its fitted bypasses in place (from the cached boundary states); masks already seen are not
re-evaluated. With ``warm_start`` the first trial follows the scorer's ranking (score per unit
of budget, like the greedy selector), so the search starts from a greedy-quality answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from subfit_core.engine.interfaces import Plan, Replacement, Selector, Submodule
from subfit_core.plugins import require
from subfit_core.progress import progress

from .budget_fill import achieved as achieved_of


@dataclass
class OptunaSearchParams:
    trials: int = 64
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    metric: str = "kl"  # a registered metric
    warm_start: bool = True  # first trial: the scorer's ranking per unit of budget
    kinds: str = "attn,ffn"

    def __post_init__(self):
        if self.trials < 1:
            raise ValueError(f"trials: {self.trials} must be at least 1")
        bad = set(self.kinds.split(",")) - {"attn", "ffn"}
        if bad:
            raise ValueError(f"kinds: {self.kinds!r} may list only attn, ffn")


def fill(order: list[Submodule], reached) -> list[Submodule]:
    """The smallest prefix of ``order`` that ``reached``, minus members it does not need
    (checked from the lowest priority up): a budget-feasible, minimal mask."""
    chosen: list[Submodule] = []
    for s in order:
        if reached(chosen):
            break
        chosen.append(s)
    for s in reversed(list(chosen)):
        rest = [c for c in chosen if c != s]
        if rest and reached(rest):
            chosen = rest
    return chosen


class OptunaSearchSelector(Selector):
    Params = OptunaSearchParams
    description = "Optuna search (TPE, NSGA-II or random) over budget-feasible masks of submodules"

    def __init__(self, params=None, plugins=None):
        super().__init__(params, plugins)
        require(plugins, "metric", self.params.metric, "selector.metric")

    def select(self, bench, scorer, fitter, budget):
        import optuna

        p = self.params
        kinds = set(p.kinds.split(","))
        dim = bench.adapter.hidden_size
        cands = [s for s in bench.subs if s.kind in kinds and budget.saving(s, fitter.estimate_params(s, dim)) > 0]

        def reached(subs) -> bool:
            return achieved_of(budget, fitter, subs, dim) >= budget.sparsity - 1e-9

        def mask_of(priority: dict[Submodule, float]) -> tuple[Submodule, ...]:
            return tuple(sorted(fill(sorted(cands, key=lambda s: -priority[s]), reached)))

        seen: dict[tuple[Submodule, ...], float] = {}

        def judge(mask: tuple[Submodule, ...]) -> float:
            if mask not in seen:
                seen[mask] = bench.metric_with_many({s: bench.fit(fitter, s) for s in mask}, p.metric) if mask \
                    else bench.metric(p.metric)
            return seen[mask]

        def objective(trial) -> float:
            mask = mask_of({s: trial.suggest_float(s.name, 0.0, 1.0) for s in cands})
            trial.set_user_attr("mask", [s.name for s in mask])
            return judge(mask)

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        samplers = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
                    "random": optuna.samplers.RandomSampler}
        study = optuna.create_study(direction="minimize", sampler=samplers[p.sampler](seed=p.seed))
        scores = {}
        if p.warm_start:
            scores = scorer.score(cands, bench, fitter)
            saving = {s: budget.saving(s, fitter.estimate_params(s, dim)) for s in cands}
            ranked = sorted(cands, key=lambda s: scores[s] / saving[s])
            study.enqueue_trial({s.name: 1.0 - i / len(ranked) for i, s in enumerate(ranked)})
        bar = progress(total=p.trials, desc="optuna mask search")
        study.optimize(objective, n_trials=p.trials, callbacks=[lambda *_: bar.update()])
        bar.close()
        best = [s for s in cands if s.name in set(study.best_trial.user_attrs["mask"])]
        plan = Plan([Replacement(s, scores.get(s)) for s in best])
        achieved = achieved_of(budget, fitter, best, dim)
        if achieved < budget.sparsity - 1e-9:
            plan.notes["warning"] = f"budget not reachable with these candidates: {achieved:.4f} < {budget.sparsity}"
        plan.notes.update({"estimated_sparsity": achieved, "search_trials": p.trials, "masks_evaluated": len(seen),
                           "best_metric": study.best_value})
        return plan
