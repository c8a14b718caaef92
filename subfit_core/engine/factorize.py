"""The factorization stage: every remaining linear layer of the decoder becomes two low-rank factors.

Runs after the removal/bypass stage, on whatever the model is then (dense, or with bypasses). A
*site* is one ``nn.Linear`` inside a submodule that was not replaced (q/k/v/o, gate/up/down on
the Llama family; found generically, not by name). The factorizer named in the recipe says which
statistics it needs, allocates ranks (``Factorizer.ranks``, reading spectra through this stage),
computes each site's factors and may refine each finished decoder layer (``refine_layer``); this
module streams the statistics and installs the factors.

Streaming (calibration windows, submodule by submodule in depth order, like the Workbench): two
residual streams are carried, the dense model's and the compressed model's (layers before the
current one already factored, bypasses in place). For each submodule, forward pre-hooks on its
linears capture their inputs X (dense stream) and X_hat (compressed stream) batch by batch, and
float64 accumulators receive

    G = X^T X        C = X_hat^T X_hat        M = X^T X_hat

(each batch's product formed in float32 on the device, as in ``stats.py``). Linears that read the
same tensor (q/k/v, gate/up) share one set. Activations are never stored beyond one batch; the
streams themselves are held as in the anchored refit. Within a submodule all linears are fitted
from one pass (the o/down inputs come from the submodule with its original q/k/v, gate/up); the
next submodule sees the factored one. After each layer the factorizer may adjust its factors
given the layer's input on the compressed stream, the dense layer's output and its own output.

Streamed weights (``offload``): every weight is read through ``read`` when a factorizer asks, each
submodule's weights once per pass, and a finished layer's factors join the weight stream (written
to a spill folder, their memory freed), so memory holds one layer's factors, not the model's.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from subfit_core.artifact.rebuild import set_child
from subfit_core.engine.cache import spill_root
from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.lowrank import FactoredLinear, Factors
from subfit_core.engine.models import room_for_fits
from subfit_core.errors import NumericalError, SubFitError
from subfit_core.progress import progress

STATISTICS = ("none", "dense", "anchored")


@dataclass(frozen=True, order=True)
class Site:
    """One linear layer inside a submodule: ``path`` is relative to the submodule's module."""

    sub: Submodule
    path: str

    @property
    def name(self) -> str:
        return f"{self.sub.name}.{self.path}"


@dataclass
class LinearStats:
    """Float64 statistics of one linear's input (shared by linears that read the same tensor)."""

    gram: torch.Tensor | None = None  # G = X^T X, dense inputs
    gram_hat: torch.Tensor | None = None  # C = X_hat^T X_hat, compressed-model inputs
    cross: torch.Tensor | None = None  # M = X^T X_hat
    tokens: int = 0

    def to(self, device: torch.device) -> LinearStats:
        """The same statistics on ``device``, where the factorizer's float64 work runs."""
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LinearStats(moved(self.gram), moved(self.gram_hat), moved(self.cross), self.tokens)


@dataclass
class FactorizeResult:
    factored: dict[Site, FactoredLinear] = field(default_factory=dict)
    kept_ratio: float = 1.0  # the ratio asked of the factorizer (over the sites it factored)
    dense_params: int = 0  # parameters of the factored linears before
    factor_params: int = 0  # and after
    regularised: list[dict] = field(default_factory=list)  # Gram matrices that needed a diagonal shift
    refinement: list[dict] = field(default_factory=list)  # per layer, what the factorizer's refine_layer reports
    truncation_loss: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def saved_per_layer(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for site, f in self.factored.items():
            saved = f.in_features * f.out_features - f.rank * (f.in_features + f.out_features)
            out[site.sub.layer] = out.get(site.sub.layer, 0) + saved
        return out

    def records(self) -> list[dict]:
        """What config.json stores to rebuild the factored linears, in depth order."""
        return [{"layer": s.sub.layer, "kind": s.sub.kind, "linear": s.path, **self.factored[s].spec()}
                for s in sorted(self.factored)]

    def summary(self) -> dict:
        ranks = {s.name: f.rank for s, f in sorted(self.factored.items())}
        return {"kept_ratio": self.kept_ratio, "linears": len(self.factored),
                "linear_params_before": self.dense_params, "linear_params_after": self.factor_params,
                "achieved_kept_ratio": self.factor_params / max(self.dense_params, 1),
                "ranks": ranks, "regularised": self.regularised, "refinement": self.refinement,
                "seconds": self.seconds}


# ----------------------------------------------------------------------------- sites


def linear_sites(module: nn.Module, sub: Submodule) -> list[tuple[Site, nn.Linear]]:
    return [(Site(sub, path), m) for path, m in module.named_modules() if isinstance(m, nn.Linear)]


def linear_params(module: nn.Module) -> int:
    """Weights of the linear layers in ``module`` (what factorization can shrink; biases stay)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@contextmanager
def capture_inputs(sites: list[tuple[Site, nn.Linear]], store: dict):
    """Forward pre-hooks that put each linear's input tensor in ``store[site]``."""
    handles = [lin.register_forward_pre_hook(lambda _m, args, site=site: store.__setitem__(site, args[0]))
               for site, lin in sites]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class GramSet:
    """Accumulators for the sites of one submodule; sites fed the same tensor share one entry."""

    def __init__(self, sites: list[Site], dense: bool, anchored: bool):
        self.sites, self.dense, self.anchored = sites, dense, anchored
        self.owner: dict[Site, Site] = {}  # site -> the first site that read the same tensor
        self.stats: dict[Site, LinearStats] = {}

    def _group(self, inputs: dict) -> None:
        if self.owner:
            return
        first: dict[int, Site] = {}
        for site in self.sites:
            self.owner[site] = first.setdefault(id(inputs[site]), site)
        for site in set(self.owner.values()):
            self.stats[site] = LinearStats()

    @staticmethod
    def _add(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        prod = (a.T @ b).to("cpu", torch.float64)
        return prod if acc is None else acc + prod

    def add(self, x: dict, x_hat: dict | None) -> None:
        self._group(x)
        for site, st in self.stats.items():
            a = x[site].reshape(-1, x[site].shape[-1]).float()
            if self.dense:
                st.gram = self._add(st.gram, a, a)
            if self.anchored:
                b = a if x_hat is None else x_hat[site].reshape(-1, a.shape[-1]).float()
                st.gram_hat = self._add(st.gram_hat, b, b)
                st.cross = self._add(st.cross, a, b)
            st.tokens += a.shape[0]

    def of(self, site: Site) -> LinearStats:
        st = self.stats[self.owner[site]]
        for name in ("gram", "gram_hat", "cross"):
            t = getattr(st, name)
            if t is not None and not torch.isfinite(t).all():
                raise NumericalError(f"{site.name}: input statistics contain NaN/Inf")
        return st


# ----------------------------------------------------------------------------- the stage


class Factorization:
    """One factorization run on a Workbench's model (``bench``), skipping replaced submodules."""

    def __init__(self, bench, factorizer, kept_ratio: float, skip: set[Submodule]):
        self.bench, self.fz, self.kept_ratio = bench, factorizer, kept_ratio
        self.adapter, self.piecewise = bench.adapter, bench.piecewise  # the engine's streaming interface
        self.subs = [s for s in bench.subs if s not in skip]
        self.sites = {s: linear_sites(bench.originals[s], s) for s in self.subs}
        self.result = FactorizeResult(kept_ratio=kept_ratio)
        self.refine = factorizer.refines()
        kind = factorizer.statistics
        if kind not in STATISTICS:
            raise ValueError(f"factorizer statistics {kind!r}; one of {STATISTICS}")
        self.need_stats = kind in ("dense", "anchored")  # streamed Gram statistics
        self.need_comp = kind == "anchored" or self.refine
        self.stream = bench.stream
        # where the factorizer's float64 work runs: the fits' device if its inputs' Gram matrices fit there
        widest = max((lin.in_features for subs in self.sites.values() for _, lin in subs), default=0)
        self.fit_device = bench.fit_device if room_for_fits(bench.fit_device, widest) else torch.device("cpu")
        self.folder: Path | None = None  # where a streamed run's factors wait (deleted with the stream)

    # ------------------------------------------------------------------ what factorizers read
    def shapes(self) -> dict[Site, tuple[int, int]]:
        """Every site's weight shape (out, in)."""
        return {site: (lin.weight.shape[0], lin.weight.shape[1]) for subs in self.sites.values() for site, lin in subs}

    def linears(self) -> list[tuple[Site, nn.Linear]]:
        return [pair for subs in self.sites.values() for pair in subs]

    def read(self, param: torch.Tensor) -> torch.Tensor:
        """A parameter's value, detached, on ``fit_device`` (where a factorizer works on it)."""
        return self.stored(param).to(self.fit_device)

    def stored(self, param: torch.Tensor) -> torch.Tensor:
        """A parameter's value, detached, where it is: in memory, or read from the stream when streamed."""
        return self.stream.read(param) if param.is_meta else param.detach()

    @torch.no_grad()
    def dense_pass(self, visit: Callable[[Site, nn.Linear, LinearStats], None]) -> None:
        """Stream the calibration windows through the dense model and call ``visit(site, linear,
        stats)`` with each site's dense input Gram on ``fit_device`` (one submodule's statistics alive
        at a time)."""
        b, pw = self.bench, self.piecewise
        hs = [self.adapter.embed(x) for x in pw.batches(b.windows.calib)]
        for sub in progress(pw.subs, desc="rank allocation statistics"):
            original = b.originals[sub]
            sites = self.sites.get(sub, [])
            grams = GramSet([s for s, _ in sites], dense=True, anchored=False)
            with pw.one_pass():
                for j, h in enumerate(hs):
                    seen: dict = {}
                    with capture_inputs(sites, seen):
                        y = self.adapter.contribution(sub, h, pw.context(h), original)
                    if sites:
                        grams.add(seen, None)
                    hs[j] = h + y
            for site, lin in sites:
                visit(site, lin, grams.of(site).to(self.fit_device))

    def layer_forward(self, layer: int, h: torch.Tensor, ctx=None) -> torch.Tensor:
        """The current model's decoder layer ``layer`` on the residual stream ``h`` (differentiable
        when called under ``torch.enable_grad`` with a ``ctx`` built outside inference mode)."""
        ctx = self.piecewise.context(h) if ctx is None else ctx
        for sub in self.piecewise.subs:
            if sub.layer == layer:
                h = h + self.adapter.contribution(sub, h, ctx, self.adapter.module(sub))
        return h

    # ------------------------------------------------------------------ factors
    def _install(self, site: Site, lin: nn.Linear, f: Factors) -> FactoredLinear:
        dtype = lin.weight.dtype
        device = self.piecewise.device if lin.weight.is_meta else lin.weight.device
        bias = self.stored(lin.bias).to(device, dtype, copy=True) if lin.bias is not None else None
        module = FactoredLinear(f.down.to(device, dtype).contiguous(), f.up.to(device, dtype).contiguous(), bias)
        set_child(self.bench.originals[site.sub], site.path, module)
        self.bench.factored[(site.sub, site.path)] = lin
        self.result.factored[site] = module
        self.result.dense_params += lin.weight.numel()
        self.result.factor_params += f.rank * (f.up.shape[0] + f.down.shape[1])
        self.result.truncation_loss[site.name] = f.truncation_loss
        if f.shift:
            self.result.regularised.append({"linear": site.name, "shift": f.shift})
        return module

    def _factor_sub(self, sub: Submodule, ranks: dict, grams: GramSet | None) -> list[tuple[Site, FactoredLinear]]:
        out: list[tuple[Site, FactoredLinear]] = []
        moved: dict[int, LinearStats] = {}  # linears reading one input (q, k, v) share its statistics: copied once
        for site, lin in self.sites.get(sub, []):
            st = None
            if grams is not None:
                st = grams.of(site)
                st = moved.setdefault(id(st), st.to(self.fit_device))
            f = self.fz.factor(site.name, self.read(lin.weight), st, ranks[site])
            out.append((site, self._install(site, lin, f)))
        return out

    def _settle(self, factored: list[tuple[Site, FactoredLinear]]) -> None:
        """With streamed weights, finished factors join the stream: written out, memory freed."""
        if self.stream is None or not factored:
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="factors-", dir=spill_root()))
            weakref.finalize(self.stream, shutil.rmtree, str(self.folder), True)  # read until the model goes
        for site, module in factored:
            self.stream.adopt(module, self.folder, f"factors.{site.name}")

    # ------------------------------------------------------------------ run
    def run(self) -> FactorizeResult:
        t0 = time.perf_counter()
        ranks = self.fz.ranks(self, self.kept_ratio)
        t_ranks = time.perf_counter()
        if not self.need_stats and not self.need_comp:
            for sub in self.subs:
                self._settle(self._factor_sub(sub, ranks, None))
        else:
            self._stream(ranks)
        t_end = time.perf_counter()
        self.result.seconds = {"ranks_s": t_ranks - t0, "factorize_s": t_end - t_ranks,
                               "refine_s": sum(r["seconds"] for r in self.result.refinement), "total_s": t_end - t0}
        return self.result

    def _stream(self, ranks: dict) -> None:
        b, ad, pw = self.bench, self.adapter, self.piecewise
        with torch.no_grad():
            dense = [ad.embed(x) for x in pw.batches(b.windows.calib)]
        comp, same = dense, True  # the compressed stream equals the dense one until something changes
        layer_in = comp
        params: list[nn.Parameter] = []
        factored: list[tuple[Site, FactoredLinear]] = []  # this layer's, settled when it is finished
        for i, sub in enumerate(progress(b.subs, desc="factorizing")):
            if i == 0 or b.subs[i - 1].layer != sub.layer:
                layer_in, params, factored = comp, [], []
            original, current = b.originals[sub], ad.module(sub)
            sites = self.sites.get(sub, [])
            grams = None
            if sites and self.need_stats:
                grams = GramSet([s for s, _ in sites], dense=self.fz.statistics == "dense",
                                anchored=self.fz.statistics == "anchored")
            targets = []
            with torch.no_grad(), pw.one_pass():
                for j, h in enumerate(dense):
                    x: dict[Site, torch.Tensor] = {}
                    x_hat: dict[Site, torch.Tensor] = {}
                    with capture_inputs(sites if grams else [], x):
                        y = ad.contribution(sub, h, pw.context(h), original)
                    if grams is not None and self.need_comp and not same:
                        with capture_inputs(sites, x_hat):
                            ad.contribution(sub, comp[j], pw.context(comp[j]), original)
                    if grams is not None:
                        grams.add(x, x_hat or None)
                    targets.append(y)
                done = self._factor_sub(sub, ranks, grams)
                factored += done
                params += [p for _, m in done for p in m.parameters()]
                if self.need_comp:
                    if sites or current is not original or not same:
                        comp = [hc + ad.contribution(sub, hc, pw.context(hc), current) for hc in comp]
                        same = False
                dense = [h + y for h, y in zip(dense, targets)]
                if same:
                    comp = dense
            last_of_layer = i + 1 == len(b.subs) or b.subs[i + 1].layer != sub.layer
            if last_of_layer and self.refine and params and not same:
                with pw.one_pass():  # the layer's streamed weights read once for all steps
                    comp, record = self.fz.refine_layer(self, sub.layer, params, layer_in, dense, comp)
                self.result.refinement.append({"layer": sub.layer, **record})
            if last_of_layer:
                self._settle(factored)


def factorize(bench, factorizer, kept_ratio: float, skip: set[Submodule]) -> FactorizeResult:
    """Factor every linear of every submodule not in ``skip``; the model is left factored
    (``bench.restore()`` undoes it)."""
    return Factorization(bench, factorizer, kept_ratio, skip).run()


# ----------------------------------------------------------------------------- the budget split


def parameter_counts(bench) -> tuple[int, int]:
    """(weights of the decoder's linear layers, all decoder parameters): what a factorizer's total
    budget is measured in. Embeddings and lm_head are not decoder parameters and are never factored."""
    linear = sum(linear_params(bench.originals[s]) for s in bench.subs)
    decoder = sum(bench.adapter.layer_param_count(l) for l in range(bench.adapter.num_layers))
    return linear, decoder


def factorize_rest(bench, factorizer, budget, bypasses: dict) -> FactorizeResult:
    """Factor the linears of the submodules that were not replaced so that, together with the
    removal already done (net of bypass parameters), the total reaches ``budget`` (``params`` unit):
    the factorizer's kept ratio over those linears is 1 - (still to remove) / (their weights)."""
    from subfit_core.engine.surgery import split_bypass_params

    own, shared = split_bypass_params(bypasses)
    removed = budget.report(own, shared)["achieved_params"] * budget.decoder_params
    to_remove = budget.sparsity * budget.decoder_params - removed
    remaining = sum(linear_params(bench.originals[s]) for s in bench.subs if s not in bypasses)
    if to_remove <= 0 or remaining == 0:
        return FactorizeResult(kept_ratio=1.0)
    kept = 1.0 - to_remove / remaining
    if kept <= 0.0:
        raise SubFitError(f"factorizer: removal left {remaining:,} linear weights, "
                          f"fewer than the {to_remove:,.0f} still to remove")
    return factorize(bench, factorizer, kept, set(bypasses))
