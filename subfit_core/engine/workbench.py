"""The workbench: runs a model submodule by submodule over calibration and scoring windows.

* ``collect`` streams the calibration set through the dense model one submodule at a time (the
  calibration set's residual stream is held at the current boundary and at its layer's input,
  never at every depth) and accumulates float64 statistics per submodule. For the small scoring
  set it keeps the residual stream at every submodule boundary.
* ``metric_with`` judges a candidate replacement from the cached boundary state in front of it, so
  only the submodules after it are re-run; ``commit`` makes a replacement and refreshes the cached
  boundaries downstream of it.
* ``refit_anchored`` re-fits bypasses on inputs from the partially compressed model against
  targets from the dense one, in one pass.
* ``journal_evaluations`` records every scoring evaluation on disk and answers repeats from it, so
  a run killed during selection resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import weakref
from collections.abc import Callable, MutableMapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from subfit_core.engine.adapter import Adapter
from subfit_core.engine.bypass import Bypass
from subfit_core.engine.cache import digest, load_stats, save_stats, spill_root
from subfit_core.engine.corpus import Windows
from subfit_core.engine.interfaces import Fitter, Metric, Statistic, Submodule
from subfit_core.engine.stats import SpilledStats, SubStats
from subfit_core.engine.streaming import WeightStream
from subfit_core.errors import ConfigError, did_you_mean
from subfit_core.plugins import build_component, require
from subfit_core.progress import progress

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_MAX_CACHED_REFERENCE_BYTES = 2 * 1024**3


def source_digest(cls: type) -> str:
    """A hash of a class's source, so an edited statistic (same name and version) misses the cache."""
    import inspect

    try:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()[:16]
    except (OSError, TypeError):  # defined where its source cannot be read: its name and version decide
        return "-"


class Workbench:
    def __init__(self, model: PreTrainedModel, adapter: Adapter, windows: Windows, batch_size: int, device: torch.device,
                 stride: int = 1, plugins=None, stream: WeightStream | None = None):
        if plugins is None:
            from subfit_core.plugins import get_plugins

            plugins = get_plugins()
        self.plugins = plugins
        # every registered statistic is accumulated in the dense pass (each is a few sums per token)
        self.statistics: dict[str, Statistic] = {
            name: build_component(plugins, "statistic", {"name": name}, "statistic")
            for name in plugins.registries["statistic"].names()}
        self._metrics: dict[str, Metric] = {}
        self._extras: dict[Submodule, tuple[dict[str, torch.Tensor], int]] = {}  # the statistics' sums, tokens
        self.model, self.adapter, self.windows = model, adapter, windows
        self.stream = stream  # weights read per module when the model is not in memory (offload)
        self.stride = stride
        self.batch_size, self.device = batch_size, device
        self.dtype = next(model.parameters()).dtype
        self.subs = adapter.submodules()
        self._order = {s: i for i, s in enumerate(self.subs)}
        self.originals = {s: adapter.module(s) for s in self.subs}
        # streamed models are the big ones: their statistics wait on disk, read back one at a time
        self.stats: MutableMapping[Submodule, SubStats] = {} if stream is None else SpilledStats(
            Path(tempfile.mkdtemp(prefix="stats-", dir=spill_root())))
        self.replaced: dict[Submodule, nn.Module] = {}
        self.factored: dict[tuple[Submodule, str], nn.Module] = {}  # (sub, linear path) -> the original linear
        self._states: list[list[torch.Tensor]] = []  # [boundary][batch] scoring residual stream
        self._contexts: dict = {}
        self._dense_refs: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (p, sum p log p) per batch
        self._fits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fitter -> {sub: bypass}
        self.evaluations = 0  # scoring-set evaluations run (for cost reports)
        self.replayed = 0  # evaluations answered from the journal of an earlier, interrupted run
        self.replayed_seconds = 0.0  # what they took when they ran (compression time counts them)
        self._journal: Path | None = None
        self._recorded: dict[str, tuple[float, float]] = {}  # key -> (value, seconds)
        self._digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> weights digest
        self._limit: int | None = None  # judge on the first _limit scoring windows only (``subset``)
        # Selectors' own memo for the session (the dense model never changes within it), e.g. the
        # iterative selector's scores per step, which a later run at a higher sparsity replays.
        self.memo: dict = {}
        # streamed scoring: how much scoring-set state may be in flight at once (candidates run together)
        self.in_flight_bytes = 2 * 1024**3

    # ------------------------------------------------------------------ helpers
    # The streaming interface: the Workbench's own passes, the factorization stage and plugins that
    # run the model piecewise batch the windows, build each batch's context once and run a module
    # over every batch inside ``one_pass`` (its streamed weights are then read once, not per batch).
    def one_pass(self):
        """A loop of one module over many batches: with streamed weights, read them once for it."""
        return self.stream.keep() if self.stream is not None else nullcontext()

    def position(self, sub: Submodule) -> int:
        """Where ``sub`` sits along the residual stream; ``boundary(position(sub))`` is its input."""
        return self._order[sub]

    def batches(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """``ids`` split into batches on the device."""
        return [b.to(self.device) for b in ids.split(self.batch_size)]

    def context(self, h: torch.Tensor):
        """What every submodule call needs for this batch shape (built once per shape)."""
        key = (tuple(h.shape[:2]), h.dtype, h.device)
        if key not in self._contexts:
            self._contexts[key] = self.adapter.context(h)
        return self._contexts[key]

    def _step(self, sub: Submodule, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + self.adapter.apply(sub, module, self.adapter.bypass_input(sub, h), self.context(h))

    def _run(self, start: int, hs: list[torch.Tensor], override: dict | None = None,
             record: bool = False) -> list[torch.Tensor]:
        override = override or {}
        for sub in self.subs[start:]:
            module = override[sub] if sub in override else self.adapter.module(sub)
            with self.one_pass():
                hs = [self._step(sub, module, h) for h in hs]
            if record:
                self._states[self.position(sub) + 1] = hs
        return hs

    # ------------------------------------------------------------------ dense pass
    @torch.inference_mode()
    def collect(self, cache: Path | None = None) -> bool:
        """Dense statistics (read from ``cache`` when present, else streamed and written there)
        and the scoring set's boundary states. Returns whether the statistics came from the cache."""
        widths = {name: stat.width for name, stat in self.statistics.items()}
        cached = load_stats(cache, self.subs, self.adapter.hidden_size, widths) if cache is not None else None
        if cached is not None:
            self.stats = cached
            self._extras = {s: (st.extra, st.tokens) for s, st in cached.items()}
        else:
            self._collect_calibration()
            if cache is not None:
                save_stats(cache, self.stats)
        with self.one_pass():
            self._states = [[self.adapter.embed(b) for b in self.batches(self.windows.scoring)]] + [[]] * len(self.subs)
        score = self._run(0, self._states[0], record=True)
        self._dense_states = list(self._states)
        positions = self.windows.scoring.numel() // self.stride
        if positions * self.model.config.vocab_size * 4 <= _MAX_CACHED_REFERENCE_BYTES:
            with self.one_pass():
                self._dense_refs = [self._reference(h) for h in score]
        return cached is not None

    def _collect_calibration(self) -> None:
        dim = self.adapter.hidden_size
        with self.one_pass():
            calib = [self.adapter.embed(b) for b in self.batches(self.windows.calib)]
        layer_input: list[torch.Tensor] = []
        for i, sub in enumerate(progress(self.subs, desc="calibration statistics")):
            if i == 0 or self.subs[i - 1].layer != sub.layer:
                layer_input = list(calib)
            st = SubStats(dim, sub.name)
            module = self.adapter.module(sub)
            with self.one_pass():
                for j, h in enumerate(calib):
                    x = self.adapter.bypass_input(sub, h)
                    y = self.adapter.apply(sub, module, x, self.context(h))
                    st.add(x, y, {name: stat.observe(sub, h, y, layer_input[j]) for name, stat in self.statistics.items()})
                    calib[j] = h + y
            st.check()
            self.stats[sub] = st
            self._extras[sub] = (st.extra, st.tokens)
            del st  # before the next submodule's matrices are allocated (spilled statistics are not kept)

    def statistics_signature(self) -> list[str]:
        """What the statistics depend on besides the model and the data: each registered statistic's
        class and the plugin (and version) that registered it, for the cache key."""
        entry = self.plugins.registries["statistic"].entry
        return [f"{name}={type(stat).__module__}.{type(stat).__qualname__}|{entry(name).origin}|{source_digest(type(stat))}"
                for name, stat in self.statistics.items()]

    def statistic(self, name: str, sub: Submodule) -> float:
        """The registered statistic ``name`` of ``sub`` over the calibration tokens (dense model)."""
        if name not in self.statistics:
            raise ConfigError(f"statistic {name!r} is not registered; "
                              f"{did_you_mean(name, list(self.statistics))}")
        extra, tokens = self._extras[sub]  # kept apart from the Gram matrices, which may wait on disk
        return self.statistics[name].value(extra[name], tokens)

    # ------------------------------------------------------------------ metrics on the scoring set
    # Next-token distributions are judged at every ``stride``-th position (the hidden states of all
    # positions are still computed). A registered metric sums its value over those positions from
    # the candidate's logits z and lse = logsumexp(z), and, if it asks, the dense distribution p
    # with sum p log p per window (computed once and kept when small enough).
    def _positions(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, :-1][:, :: self.stride]

    def _reference(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense next-token distribution p and, per window, sum p log p."""
        logp = F.log_softmax(self.adapter.logits(self._positions(h)).float(), dim=-1)
        p = logp.exp()
        return p, (p * logp).flatten(1).sum(1)

    def _metric_named(self, name: str) -> Metric:
        if name not in self._metrics:
            require(self.plugins, "metric", name, "metric")
            self._metrics[name] = build_component(self.plugins, "metric", {"name": name}, "metric")
        return self._metrics[name]

    @torch.inference_mode()
    def _metric(self, finals: list[torch.Tensor], name: str) -> float:
        metric = self._metric_named(name)
        self.evaluations += 1
        total, count = 0.0, 0
        with self.one_pass():  # the head's weights, once for every batch
            for j, (h, ids) in enumerate(zip(finals, self.batches(self.windows.scoring))):
                value, positions = self._metric_batch(metric, j, h, ids)
                total += value
                count += positions
        return total / count

    def _metric_batch(self, metric: Metric, j: int, h: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
        """(the metric summed over batch ``j``'s judged positions, how many there are)."""
        n = h.shape[0]  # a ``subset`` may cut the last batch short
        z = self.adapter.logits(self._positions(h)).float()
        lse = torch.logsumexp(z, dim=-1)
        labels = ids[:n, 1:][:, :: self.stride]
        reference = None
        if metric.needs_reference:
            p, neg_entropy = self._dense_refs[j] if self._dense_refs else self._reference(self._dense_states[-1][j])
            reference = (p[:n], neg_entropy[:n])
        return float(metric.total(z, lse, labels, reference)), lse.numel()

    def layer_groups(self) -> list[tuple[Submodule, ...]]:
        """The submodules of each layer, in depth order (whole-layer and window selectors)."""
        return [tuple(s for s in self.subs if s.layer == layer) for layer in range(self.adapter.num_layers)]

    @contextmanager
    def subset(self, windows: int | None):
        """Judge candidates on the first ``windows`` scoring windows only (None: all of them), e.g.
        for an iterative method whose recipe asks for a smaller scoring set. Commits still refresh
        every window's boundary states."""
        available = self.windows.scoring.shape[0]
        if windows is not None and not 1 <= windows <= available:
            raise ConfigError(f"selector.scoring_samples: {windows} windows requested, allowed 1..{available} "
                              "(scoring.samples)")
        previous, self._limit = self._limit, windows
        try:
            yield self
        finally:
            self._limit = previous

    def _take(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._limit is None:
            return hs
        out, left = [], self._limit
        for h in hs:
            if left <= 0:
                break
            out.append(h[:left])
            left -= h.shape[0]
        return out

    def boundary(self, index: int) -> list[torch.Tensor]:
        """The current model's residual stream on the scoring windows in front of submodule
        ``index`` (``len(subs)``: after the last one), one tensor per batch."""
        return self._take(self._states[index])

    def dense_boundary(self, index: int) -> list[torch.Tensor]:
        """Like ``boundary``, for the dense model."""
        return self._take(self._dense_states[index])

    def metric(self, metric: str) -> float:
        """The current (partially compressed) model's metric on the scoring set."""
        return self._journaled({}, metric, lambda: self._metric(self.boundary(len(self.subs)), metric))

    def metric_with(self, sub: Submodule, module: nn.Module, metric: str) -> float:
        """The metric if ``sub`` were replaced by ``module``, re-running only what follows it."""
        return self.metric_with_many({sub: module}, metric)

    @torch.inference_mode()
    def states_with(self, modules: dict[Submodule, nn.Module]) -> list[torch.Tensor]:
        """The final residual stream on the scoring windows if every submodule in ``modules`` were
        replaced, re-running from the first of them onward."""
        start = min(self.position(s) for s in modules)
        return self._run(start, self.boundary(start), modules)

    def metric_with_many(self, modules: dict[Submodule, nn.Module], metric: str) -> float:
        """The metric if every submodule in ``modules`` were replaced (e.g. a whole layer or a
        window), re-running from the first of them onward."""
        return self._journaled(modules, metric, lambda: self._metric(self.states_with(modules), metric))

    def metrics_with_each(self, candidates: list[dict[Submodule, nn.Module]], metric: str) -> list[float]:
        """``metric_with_many`` of each candidate. With streamed weights the candidates run together,
        layer by layer, so each layer's weights are read once per round, not once per candidate (their
        scoring-set states are in flight together, up to ``in_flight_bytes``); in memory they run one
        after another. The numbers are the same either way."""
        if self.stream is None:
            return [self.metric_with_many(c, metric) for c in progress(candidates, desc="scoring candidates")]
        keys = [self._key(c, metric) for c in candidates]
        values = [self._replayed(k) for k in keys]
        todo = [i for i, v in enumerate(values) if v is None]
        state_bytes = sum(h.numel() * h.element_size() for h in self.boundary(0))
        chunk = max(1, self.in_flight_bytes // max(state_bytes, 1))
        for part in progress([todo[i:i + chunk] for i in range(0, len(todo), chunk)], desc="scoring candidates"):
            t0 = time.perf_counter()
            finals = self._run_together([candidates[i] for i in part])
            with self.one_pass():  # the head's weights, once for every candidate
                fresh = [self._metric(f, metric) for f in finals]
            seconds = (time.perf_counter() - t0) / len(part)
            for i, value in zip(part, fresh):
                self._record(keys[i], value, seconds)
                values[i] = value
        return [float(v) for v in values if v is not None]

    @torch.inference_mode()
    def _run_together(self, candidates: list[dict[Submodule, nn.Module]]) -> list[list[torch.Tensor]]:
        """The final scoring-set residual stream of each candidate, every module run inside one pass."""
        starts = [min(self.position(s) for s in c) for c in candidates]
        states: list[list[torch.Tensor] | None] = [None] * len(candidates)
        for p in range(min(starts), len(self.subs)):
            sub = self.subs[p]
            with self.one_pass():  # this module's weights, once for every candidate
                for i, c in enumerate(candidates):
                    if starts[i] == p:
                        states[i] = self.boundary(p)
                    hs = states[i]
                    if hs is not None:
                        module = c[sub] if sub in c else self.adapter.module(sub)
                        states[i] = [self._step(sub, module, h) for h in hs]
        return [hs for hs in states if hs is not None]

    # ------------------------------------------------------------------ resuming
    def journal_evaluations(self, path: Path) -> int:
        """Append every scoring evaluation's result to ``path`` (JSON lines) and answer those already
        there from it; returns how many it holds. A run killed during selection then resumes where
        it stopped: the selector makes the same choices again (fits are deterministic) and finds
        each evaluation it had finished. A key hashes the weights of every module the evaluated
        model has replaced, so a fit that came out different is evaluated, never replayed wrongly."""
        self._journal, self._recorded = path, {}
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self._recorded[str(entry["key"])] = (float(entry["value"]), float(entry["seconds"]))
                except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                    continue
        return len(self._recorded)

    def _digest(self, module: nn.Module) -> str:
        if module not in self._digests:  # its class and its weights (fitted modules never change)
            self._digests[module] = f"{type(module).__name__}:{digest(module.state_dict())}"
        return self._digests[module]

    def _key(self, modules: dict[Submodule, nn.Module], metric: str) -> str | None:
        """The journal key of an evaluation (None: not journaled)."""
        if self._journal is None or self.factored:
            return None
        model = {**self.replaced, **modules}  # the model this evaluation sees, besides the originals
        h = hashlib.sha256(f"{metric}|{self._limit}|{self.stride}".encode())
        for sub in sorted(model):
            h.update(f"|{sub.name}:{self._digest(model[sub])}".encode())
        return h.hexdigest()

    def _replayed(self, key: str | None) -> float | None:
        if key is None or key not in self._recorded:
            return None
        value, seconds = self._recorded[key]
        self.replayed += 1
        self.replayed_seconds += seconds
        return value

    def _record(self, key: str | None, value: float, seconds: float) -> None:
        if key is None or self._journal is None:
            return
        self._recorded[key] = (value, seconds)
        self._journal.parent.mkdir(parents=True, exist_ok=True)
        with self._journal.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "value": value, "seconds": seconds}) + "\n")

    def _journaled(self, modules: dict[Submodule, nn.Module], metric: str, evaluate: Callable[[], float]) -> float:
        key = self._key(modules, metric)
        value = self._replayed(key)
        if value is None:
            t0 = time.perf_counter()
            value = evaluate()
            self._record(key, value, time.perf_counter() - t0)
        return value

    # ------------------------------------------------------------------ changing the model
    @torch.inference_mode()
    def commit(self, sub: Submodule, module: nn.Module) -> None:
        self.adapter.replace(sub, module)
        self.replaced[sub] = module
        self._run(self.position(sub), self._states[self.position(sub)], record=True)

    def apply(self, bypasses: dict[Submodule, nn.Module]) -> None:
        """Swap ``bypasses`` into the model (recorded, so ``restore`` undoes them) and fix the
        KV-cache slots. The cached scoring boundaries are not refreshed (use ``commit`` for that)."""
        for sub, module in bypasses.items():
            self.adapter.replace(sub, module)
            self.replaced[sub] = module
        self.adapter.finalize()

    def restore(self) -> None:
        """Put every original module back: the model and the cached boundaries are dense again."""
        for sub in list(self.replaced):
            self.adapter.replace(sub, self.originals[sub])
        self.replaced.clear()
        for (sub, path), linear in self.factored.items():  # undo a factorization stage
            parent, _, child = path.rpartition(".")
            setattr(self.originals[sub].get_submodule(parent) if parent else self.originals[sub], child, linear)
        self.factored.clear()
        self.adapter.finalize()
        if self._states:
            self._states = list(self._dense_states)

    @torch.inference_mode()
    def calibration_trace(self, stop: int, visit: Callable[[int, Submodule | None, torch.Tensor, torch.Tensor | None], None]) -> None:
        """Run the calibration windows through the current model up to submodule ``stop`` (exclusive),
        one batch at a time, calling ``visit(batch, sub, h, y)`` with the residual stream ``h`` in
        front of each submodule and its contribution ``y`` (when ``stop`` is ``len(subs)``, once more
        with ``sub`` and ``y`` None: the final residual stream). Only one batch's state is alive at a
        time; window-level fitters keep what they need (a few boundaries, or Gram matrices)."""
        for b, ids in enumerate(self.batches(self.windows.calib)):
            h = self.adapter.embed(ids)
            for sub in self.subs[:stop]:
                y = self.adapter.contribution(sub, h, self.context(h))
                visit(b, sub, h, y)
                h = h + y
            if stop == len(self.subs):
                visit(b, None, h, None)  # the final residual stream

    def fit(self, fitter: Fitter, sub: Submodule) -> Bypass:
        """Fit from dense statistics, memoised: the same fitter and submodule always give the same bypass."""
        fits = self._fits.setdefault(fitter, {})
        if sub not in fits:
            fits[sub] = fitter.fit(sub, self.stats[sub]).to(self.device, self.dtype)
        return fits[sub]

    @torch.inference_mode()
    def refit_anchored(self, fitter: Fitter, selected: list[Submodule]) -> dict[Submodule, Bypass]:
        """Fit each selected bypass on the compressed model's inputs against dense targets, in depth order,
        so later bypasses correct the drift left by earlier ones. Leaves the model compressed."""
        self.restore()
        chosen, fits = set(selected), {}
        dim = self.adapter.hidden_size
        with self.one_pass():
            dense = [self.adapter.embed(b) for b in self.batches(self.windows.calib)]
        comp = list(dense)
        for sub in progress(self.subs, desc="anchored refit"):
            original = self.originals[sub]
            with self.one_pass():
                targets = [self.adapter.contribution(sub, h, self.context(h), original) for h in dense]
                if sub in chosen:
                    st = SubStats(dim, sub.name)
                    for hc, y in zip(comp, targets):
                        st.add(self.adapter.bypass_input(sub, hc), y)
                    st.check()
                    fits[sub] = fitter.fit(sub, st).to(self.device, self.dtype)
                    self.adapter.replace(sub, fits[sub])
                    self.replaced[sub] = fits[sub]
                    comp = [self._step(sub, fits[sub], hc) for hc in comp]
                elif fits:
                    comp = [self._step(sub, original, hc) for hc in comp]
            dense = [h + y for h, y in zip(dense, targets)]
            if not fits:  # nothing replaced yet: the compressed stream is still the dense one
                comp = dense
        return fits
