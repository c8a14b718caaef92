"""Per-prompt skipping: each prompt chooses which candidate submodules to bypass, from probes.

Every candidate has a bypass fitted by the static engine, so skipping one costs its bypass, not a
hole. For a prompt, ``estimate`` measures harm with ``probes`` random subsets bypassed at once
(``sensing``) and ``choose`` skips the candidates with the least harm per unit of budget until the
budget is met. While decoding, the choice is re-estimated every ``every`` tokens on the context so
far; when it changes, the context is prefilled again under the new choice, which rebuilds every
kept attention's KV cache (an attention skipped so far has no entries for the tokens it missed;
recomputing them is the only exact way) and is counted in ``counts["reprefill"]``.

With ``tokens`` > 0, each prefill also drops that share of its context from every kept attention's
KV cache: the tokens the kept attentions of the context's last ``window`` positions attend to least
(the first token, where attention that has nowhere else to go lands, and the window itself stay).
Later tokens keep their true positions. Both reductions spend one budget, in compute per decoded
token: a cached token costs each kept attention 2 x heads x head_dim multiply-adds (scores and
weighted values), counted in the unit the submodules' parameters are (a linear's parameters are its
multiply-adds per token); skipping an attention forgoes the tokens dropped from it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from subfit_core.engine.adapter import Adapter
from subfit_core.engine.budget import Budget
from subfit_core.engine.interfaces import Submodule
from subfit_core.errors import SubFitError
from subfit_core.progress import progress

from .sensing import choose, probe_design, recover


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
    tokens: float = 0.0  # share of each prefilled context dropped from the KV cache (0: none)
    window: int = 16  # the context's last positions, whose attention decides which tokens are dropped
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
        if not 0.0 <= self.tokens < 1.0:
            raise ValueError(f"tokens: {self.tokens} must be in [0, 1) (share of the context dropped from the KV cache)")
        if self.window < 1:
            raise ValueError(f"window: {self.window} must be at least 1")


def token_costs(adapter: Adapter, unit: str) -> list[float]:
    """Per layer: the share of the budget one cached token costs that layer's attention per decoded
    token (2 x heads x head_dim multiply-adds, in ``unit``, like a bypass's parameters)."""
    cfg = adapter.model.config.get_text_config()
    width = 2 * cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    layers = range(adapter.num_layers)
    if unit == "params":
        return [width / Budget(0.0, unit, adapter).decoder_params for _ in layers]
    return [width / adapter.layer_param_count(l) / adapter.num_layers for l in layers]


def usage(attentions, window: int) -> torch.Tensor:
    """(T,) attention each context token receives from the last ``window`` queries, averaged over the
    heads and the attentions that ran (a skipped one records nothing)."""
    return torch.stack([a[0, :, -window:].float().mean((0, 1)) for a in attentions if a is not None]).mean(0)


def kept_positions(use: torch.Tensor, drop: int, window: int) -> torch.Tensor:
    """Context positions left after dropping the ``drop`` least used; the first token and the last
    ``window`` are never dropped."""
    free = torch.arange(1, max(1, use.numel() - window), device=use.device)
    gone = free[use[free].argsort()[:drop]]
    keep = torch.ones(use.numel(), dtype=torch.bool, device=use.device)
    keep[gone] = False
    return keep.nonzero().flatten()


def drop_tokens(cache, keep: torch.Tensor) -> None:
    """Keep only positions ``keep`` in every filled KV-cache slot."""
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):  # a skipped attention's slot stays empty
            continue
        if layer.is_sliding:
            raise SubFitError("runner.tokens: a sliding-window attention's cache cannot drop tokens (its window "
                              "counts positions); set runner.tokens=0 for this model")
        layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]


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
        from subfit_core.engine.pipeline import compress
        from subfit_core.plugins import build_component, get_plugins

        bypasses = compress(session, {**cfg, "sparsity": min(0.95, pool * params.budget)}).bypasses
        session.bench.restore()
        fitter = build_component(get_plugins(), "fitter", cfg["fitter"], "fitter")
        fitter.attach(session.adapter)
        budget = Budget(params.budget, cfg["sparsity_unit"], session.adapter)
        charges = {s: fitter.estimate_params(s, session.adapter.hidden_size) for s in bypasses}
        dyn = cls(session.adapter, bypasses, {s: budget.saving(s, charges[s]) for s in bypasses}, params,
                  cfg["sparsity_unit"])
        dyn.charges = charges
        return dyn

    def __init__(self, adapter: Adapter, bypasses: dict[Submodule, nn.Module], savings: dict[Submodule, float],
                 params: DynamicParams, unit: str = "layers"):
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
        self.token_cost = token_costs(adapter, unit)
        self.dropped = 0  # context tokens the last prefill dropped from the cache
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
        h = self.adapter.embed(ids.to(self.model.device))  # calibration windows are kept on the host
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
        self.prior = torch.stack([self.exact(w[None]) for w in progress(windows, desc="per-prompt prior")]).mean(0)

    def probed(self, ids: torch.Tensor, probes: int | None = None) -> torch.Tensor:
        """Each candidate's harm on ``ids``, recovered from ``probes`` random subsets around the prior."""
        m = self.p.probes if probes is None else probes
        if m == 0:
            return self.prior.clone()
        a = probe_design(m, len(self.candidates), self.p.share, self.generator)
        run = self.dense_run(ids)
        y = [self.measure(run, frozenset(s for s, on in zip(self.candidates, row) if on)) for row in a]
        return recover(a, torch.tensor(y, dtype=torch.float64), self.prior, self.p.solver, self.p.lam, self.p.sparsity)

    def drop_count(self, length: int) -> int:
        """Context tokens a prefill of ``length`` drops from the cache."""
        return min(round(self.p.tokens * length), max(0, length - 1 - self.p.window))

    def choose(self, harm: torch.Tensor, dropped: int = 0) -> frozenset[Submodule]:
        """``sensing.choose`` over the candidates (the model's layout refusing a set passes a candidate
        over). ``dropped`` context tokens leave the cache of every attention kept: that much of the
        budget is spent before any candidate, and skipping an attention saves its parameters less those
        tokens."""
        saving = [self.savings[s] - (dropped * self.token_cost[s.layer] if s.kind == "attn" else 0.0)
                  for s in self.candidates]
        spent = dropped * sum(self.token_cost[l] for l in range(self.adapter.num_layers))

        def allowed(indices: list[int]) -> bool:
            try:
                self.use(frozenset(self.candidates[i] for i in indices))
            except SubFitError:
                return False
            return True

        picked = choose(harm, saving, self.p.budget - spent, allowed)
        self.use(frozenset())
        return frozenset(self.candidates[i] for i in picked)

    def saved(self, chosen: frozenset[Submodule], dropped: int = 0) -> float:
        """The share of the budget ``chosen`` skipped with ``dropped`` context tokens saves."""
        kept = [l for l in range(self.adapter.num_layers) if Submodule(l, "attn") not in chosen]
        return sum(self.savings[s] for s in chosen) + dropped * sum(self.token_cost[l] for l in kept)

    def estimate(self, ids: torch.Tensor) -> frozenset[Submodule]:
        return self.choose(self.probed(ids), self.drop_count(ids.shape[-1]))

    # --- prefill, with context tokens dropped from the cache
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor):
        """``ids`` (1, T) through the model as it is now, with the KV cache; then ``drop_count(T)`` context
        tokens leave the cache (see the module docstring). Later tokens must pass their true positions
        (``position``), since the cache is shorter than the context."""
        drop = self.drop_count(ids.shape[-1])
        self.dropped = 0
        if drop == 0:
            return self.model(input_ids=ids, use_cache=True)
        impl = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")  # the attention weights: fused kernels do not return them
        try:
            out = self.model(input_ids=ids, use_cache=True, output_attentions=True)
        finally:
            self.model.set_attn_implementation(impl)
        drop_tokens(out.cache, kept_positions(usage(out.attentions, self.p.window), drop, self.p.window))
        self.dropped = drop
        self.counts["dropped"] += drop
        return out

    def position(self, start: int, length: int) -> dict:
        """The positions of ``length`` tokens from context position ``start``, when the cache is shorter."""
        return {"position_ids": torch.arange(start, start + length, device=self.model.device)[None]} if self.dropped else {}

    @torch.inference_mode()
    def continuation_nll(self, window: torch.Tensor, split: int) -> float:
        """Summed negative log-likelihood of ``window[split:]`` after a prefill of ``window[:split]`` (its
        tokens dropped from the cache as when generating), the model as it is now."""
        out = self.prefill(window[None, :split])
        rest = self.model(input_ids=window[None, split:-1], cache=out.cache, use_cache=True,
                          **self.position(split, window.numel() - 1 - split)).logits[0]
        logits = torch.cat([out.logits[0, -1:], rest]).float()
        return float(torch.nn.functional.cross_entropy(logits, window[split:], reduction="sum"))

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
        out = self.prefill(ids)
        self.counts["prefill"] += ids.shape[-1]
        for step in range(1, new_tokens + 1):
            ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=-1)
            if step == new_tokens:
                break
            if self.p.every and step % self.p.every == 0:
                current = self.skipped  # the set the cache was built with (estimating leaves the model dense)
                new = estimate(ids)
                self.use(new)
                # the cache holds what the set in use and the last prefill's dropped tokens allow; the new choice
                # was budgeted for a prefill of the whole context: rebuild unless both are what the cache holds
                if new != current or self.drop_count(ids.shape[-1]) != self.dropped:
                    out = self.prefill(ids)  # every kept attention's cache rebuilt
                    self.counts["reprefill"] += ids.shape[-1]
                    continue
            out = self.model(input_ids=ids[:, -1:], cache=out.cache, use_cache=True,
                             **self.position(ids.shape[-1] - 1, 1))
            self.counts["decode"] += 1
        self.cache = out.cache
        return ids

