"""Per-prompt skipping: each prompt chooses which candidate submodules to bypass, from probes.

Every candidate has a bypass fitted by the static engine, so skipping one costs its bypass, not a
hole. For a prompt, ``estimate`` measures harm with ``probes`` random subsets bypassed at once
(``sensing``) and ``choose`` skips the candidates with the least harm per unit of budget until the
budget is met. While decoding, the choice is re-estimated every ``every`` tokens on the context so
far; when it changes, the context is prefilled again under the new choice, which rebuilds every
kept attention's KV cache (an attention skipped so far has no entries for the tokens it missed;
recomputing them is the only exact way) and is counted in ``counts["reprefill"]``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from subfit_core.engine.adapter import Adapter
from subfit_core.engine.interfaces import Submodule
from subfit_core.errors import SubFitError

from .sensing import probe_design, recover


@dataclass
class Run:
    """A context's dense pass: residual stream at each submodule boundary, rotary/mask context,
    next-token log-probabilities."""

    states: list[torch.Tensor]
    ctx: object
    dense: torch.Tensor


@dataclass
class DynamicParams:
    budget: float = 0.25  # share of the model to skip per prompt (the static budget's unit)
    probes: int = 8  # m random measurements per estimate; 0: the calibration prior alone (a static choice)
    share: float = 0.1  # share of the probes that bypass each candidate
    every: int = 32  # re-estimate every this many generated tokens (0: once, at the prompt)
    solver: str = "lasso"  # lasso | omp
    lam: float = 0.05  # lasso penalty, relative to the largest correlation
    sparsity: int = 4  # omp: at most this many deviations from the prior
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.budget < 1.0:
            raise ValueError(f"budget: {self.budget} must be in (0, 1)")
        for key in ("probes", "every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: {getattr(self, key)} must not be negative")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share: {self.share} must be in (0, 1]")
        if self.solver not in ("lasso", "omp"):
            raise ValueError(f"solver: {self.solver!r} is not one of lasso, omp")


class DynamicSkip:
    """Swaps candidate submodules of ``adapter``'s model between original and bypass per prompt.

    From a compression session (the usual way in)::

        session = open_session(resolve_recipe(["strategy=subfit"]))
        dyn = DynamicSkip.from_session(session, session.cfg, DynamicParams(budget=0.25, probes=16))
        dyn.calibrate(session.windows.calib[:4])          # the prior
        ids = dyn.generate(prompt_ids, 64)                 # per-prompt choice, re-made every ``every`` tokens
    """

    @classmethod
    def from_session(cls, session, cfg: dict, params: DynamicParams, pool: float = 1.5) -> DynamicSkip:
        """Candidates: the recipe ``cfg``'s static selection at ``pool`` x the budget, each with the bypass
        fitted for it; a candidate's saving is what replacing it alone saves, in ``cfg``'s unit. The
        session's model is left dense (the originals run until a prompt chooses)."""
        from subfit_core.engine.budget import Budget
        from subfit_core.engine.pipeline import compress
        from subfit_core.plugins import build_component, get_plugins

        bypasses = compress(session, {**cfg, "sparsity": min(0.95, pool * params.budget)}).bypasses
        session.bench.restore()
        fitter = build_component(get_plugins(), "fitter", cfg["fitter"], "fitter")
        fitter.attach(session.adapter)
        budget = Budget(params.budget, cfg["sparsity_unit"], session.adapter)
        charges = {s: fitter.estimate_params(s, session.adapter.hidden_size) for s in bypasses}
        dyn = cls(session.adapter, bypasses, {s: budget.saving(s, charges[s]) for s in bypasses}, params)
        dyn.charges = charges
        return dyn

    def __init__(self, adapter: Adapter, bypasses: dict[Submodule, nn.Module], savings: dict[Submodule, float],
                 params: DynamicParams):
        self.adapter, self.model, self.p = adapter, adapter.model, params
        self.candidates = sorted(bypasses)
        self.bypasses, self.savings = bypasses, savings
        self.charges: dict[Submodule, int] = {}  # parameters each bypass adds (shared tensors amortised), if known
        self.originals = {s: adapter.module(s) for s in self.candidates}
        self.order = adapter.submodules()
        self.prior = torch.zeros(len(self.candidates), dtype=torch.float64)
        self.skipped: frozenset[Submodule] = frozenset()  # bypassed now
        self.last_choice: frozenset[Submodule] = frozenset()  # what the last ``generate`` ended with
        # tokens run: probe (a partial probe counts the share of the depth it re-runs), prefill, decode, reprefill
        self.counts: Counter = Counter()
        self.generator = torch.Generator().manual_seed(params.seed)

    # --- the model under a choice
    def use(self, skip: frozenset[Submodule]) -> None:
        """Bypass exactly ``skip`` (a subset of the candidates); the rest run their originals."""
        for s in self.candidates:
            self.adapter.replace(s, self.bypasses[s] if s in skip else self.originals[s])
        self.adapter.finalize()
        self.skipped = frozenset(skip)

    # --- probes: piecewise runs that start at the first bypassed candidate, from the dense states
    @torch.inference_mode()
    def dense_run(self, ids: torch.Tensor) -> Run:
        """The dense residual stream at every submodule boundary of ``ids``, and its next-token log-probs."""
        h = self.adapter.embed(ids)
        ctx = self.adapter.context(h)
        states = [h]
        for sub in self.order:
            h = h + self.adapter.contribution(sub, h, ctx, self.module_of(sub))
            states.append(h)
        self.counts["probe"] += ids.numel()
        return Run(states, ctx, self.adapter.logits(h).float().log_softmax(-1))

    @torch.inference_mode()
    def measure(self, run: Run, subset: frozenset[Submodule]) -> float:
        """Mean KL(dense || model with ``subset`` bypassed) over the positions, re-running only from
        the first bypassed submodule onward. A probe that bypasses nothing is the dense model: 0."""
        if not subset:  # with few probes a random design can leave a row empty
            return 0.0
        start = min(self.adapter.position(s) for s in subset)
        h = run.states[start]
        for sub in self.order[start:]:
            module = self.bypasses[sub] if sub in subset else self.module_of(sub)
            h = h + self.adapter.contribution(sub, h, run.ctx, module)
        self.counts["probe"] += int(h.shape[0] * h.shape[1] * (len(self.order) - start) / len(self.order))
        lp = self.adapter.logits(h).float().log_softmax(-1)
        return float((run.dense.exp() * (run.dense - lp)).sum(-1).mean())

    def module_of(self, sub: Submodule) -> nn.Module:
        return self.originals[sub] if sub in self.originals else self.adapter.module(sub)

    # --- estimates
    def exact(self, ids: torch.Tensor) -> torch.Tensor:
        """Each candidate's harm bypassed alone: one probe per candidate."""
        run = self.dense_run(ids)
        return torch.tensor([self.measure(run, frozenset([s])) for s in self.candidates], dtype=torch.float64)

    def calibrate(self, windows: torch.Tensor) -> None:
        """The prior: each candidate's harm alone, averaged over calibration windows."""
        self.prior = torch.stack([self.exact(w[None]) for w in windows]).mean(0)

    def probed(self, ids: torch.Tensor, probes: int | None = None) -> torch.Tensor:
        """Each candidate's harm on ``ids``, recovered from ``probes`` random subsets around the prior."""
        m = self.p.probes if probes is None else probes
        if m == 0:
            return self.prior.clone()
        a = probe_design(m, len(self.candidates), self.p.share, self.generator)
        run = self.dense_run(ids)
        y = [self.measure(run, frozenset(s for s, on in zip(self.candidates, row) if on)) for row in a]
        return recover(a, torch.tensor(y, dtype=torch.float64), self.prior, self.p.solver, self.p.lam, self.p.sparsity)

    def choose(self, harm: torch.Tensor) -> frozenset[Submodule]:
        """The candidates with the least harm per unit of budget saved, until the budget is met. Near
        the end only candidates that do not overshoot are taken, and when none is left, the least
        harmful one that completes it (as the static selectors do). A candidate the model's layout
        cannot drop together with those chosen (the adapter refuses the set) is passed over."""
        rank = sorted(range(len(self.candidates)), key=lambda i: float(harm[i]) / self.savings[self.candidates[i]])
        left = [self.candidates[i] for i in rank]
        chosen: list[Submodule] = []
        saved = 0.0
        while left and saved < self.p.budget - 1e-9:
            need = self.p.budget - saved
            fitting = [s for s in left if self.savings[s] <= need + 1e-12]
            s = fitting[0] if fitting else min(left, key=lambda c: float(harm[self.candidates.index(c)]))
            left.remove(s)
            try:
                self.use(frozenset([*chosen, s]))
            except SubFitError:
                continue
            chosen.append(s)
            saved += self.savings[s]
        self.use(frozenset())
        return frozenset(chosen)

    def estimate(self, ids: torch.Tensor) -> frozenset[Submodule]:
        return self.choose(self.probed(ids))

    # --- decoding
    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, new_tokens: int, estimate=None) -> torch.Tensor:
        """Greedy decoding of ``new_tokens`` after ``prompt`` (1, T) with the KV cache, the choice
        re-estimated every ``every`` tokens. ``estimate`` (context -> set) replaces the probes. The model
        is whole again afterwards (``last_choice`` is the set the last tokens were generated with), so
        a later plain forward of the model is never silently a compressed one."""
        try:
            return self._generate(prompt, new_tokens, estimate or self.estimate)
        finally:
            self.last_choice = self.skipped
            self.use(frozenset())

    def _generate(self, prompt: torch.Tensor, new_tokens: int, estimate) -> torch.Tensor:
        ids = prompt
        self.use(estimate(ids))
        out = self.model(input_ids=ids, use_cache=True)
        self.counts["prefill"] += ids.shape[-1]
        for step in range(1, new_tokens + 1):
            ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=-1)
            if step == new_tokens:
                break
            if self.p.every and step % self.p.every == 0:
                new = estimate(ids)
                if new != self.skipped:
                    self.use(new)
                    out = self.model(input_ids=ids, use_cache=True)  # every kept attention's cache rebuilt
                    self.counts["reprefill"] += ids.shape[-1]
                    continue
                self.use(new)  # the same set: the cache stays valid
            out = self.model(input_ids=ids[:, -1:], cache=out.cache, use_cache=True)
            self.counts["decode"] += 1
        self.cache = out.cache
        return ids

