"""The workbench: compresses a model step by step, judging each candidate replacement cheaply.

It brings together four parts, each with one job:

* ``Piecewise`` (``bench.piecewise``) runs the model submodule by submodule, streamed weights read
  once per pass; the engine's one streaming interface, which the factorization stage uses too.
* ``DenseStatistics`` (``bench.dense``) holds the dense model's calibration statistics (what every
  closed-form fit and every registered statistic reads), from one pass or from the cache.
* ``ScoringSet`` (``bench.scoring``) caches the small scoring set's residual stream at every
  submodule boundary and judges a final stream by a registered metric against the dense model.
* ``EvaluationJournal`` (``bench.journal``) records every evaluation on disk and answers repeats,
  so a run killed during selection resumes where it stopped.

The workbench itself edits the model and keeps the parts consistent with it: ``metric_with``
judges a candidate from the cached boundary in front of it (only what follows is re-run);
``commit`` makes a replacement and refreshes the boundaries downstream; ``restore`` makes the
model dense again. ``fit`` memoises fits per fitter; ``refit_anchored`` re-fits bypasses on inputs
from the partially compressed model against targets from the dense one, in one pass; ``reanchor``
does the same mid-selection and fits the candidates still to be judged that way too.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from subfit_core.engine.adapter import Adapter
from subfit_core.engine.bypass import Bypass
from subfit_core.engine.corpus import Windows
from subfit_core.engine.dense_statistics import DenseStatistics
from subfit_core.engine.interfaces import Fitter, Statistic, Submodule
from subfit_core.engine.journal import EvaluationJournal
from subfit_core.engine.piecewise import Piecewise
from subfit_core.engine.scoring import ScoringSet
from subfit_core.engine.stats import StatsOn, SubStats
from subfit_core.engine.streaming import WeightStream
from subfit_core.errors import SubFitError
from subfit_core.progress import progress

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Workbench:
    def __init__(self, model: PreTrainedModel, adapter: Adapter, windows: Windows, batch_size: int, device: torch.device,
                 stride: int = 1, plugins=None, stream: WeightStream | None = None):
        if plugins is None:
            from subfit_core.plugins import get_plugins

            plugins = get_plugins()
        self.plugins = plugins
        self.model, self.adapter, self.windows = model, adapter, windows
        self.stride, self.batch_size, self.device = stride, batch_size, device
        self.dtype = next(model.parameters()).dtype
        self.piecewise = Piecewise(adapter, batch_size, device, stream)
        self.dense = DenseStatistics(self.piecewise, plugins)
        self.scoring = ScoringSet(self.piecewise, windows.scoring, stride, plugins)
        self.journal = EvaluationJournal()
        self.subs = self.piecewise.subs
        self.originals = {s: adapter.module(s) for s in self.subs}
        self.replaced: dict[Submodule, nn.Module] = {}
        self.factored: dict[tuple[Submodule, str], nn.Module] = {}  # (sub, linear path) -> the original linear
        self._fits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fitter -> {sub: bypass}
        # Selectors' own memo for the session (the dense model never changes within it), e.g. the
        # iterative selector's scores per step, which a later run at a higher sparsity replays.
        self.memo: dict = {}
        # streamed scoring: how much scoring-set state may be in flight at once (candidates run together)
        self.in_flight_bytes = 2 * 1024**3
        # where fits run their float64 algebra (``compress`` sets it from the recipe's ``fit_device``)
        self.fit_device = torch.device("cpu")
        # the share of the stream's drift an anchored refit also fits (``compress`` sets it from the recipe)
        self.drift_correction = 0.0

    # ------------------------------------------------------------------ the parts, as plugins see them
    @property
    def stream(self) -> WeightStream | None:
        return self.piecewise.stream

    @property
    def stats(self) -> MutableMapping[Submodule, SubStats]:
        """The dense calibration statistics per submodule (for streamed weights: read one at a time)."""
        return self.dense.stats

    @property
    def fit_stats(self) -> Mapping[Submodule, SubStats]:
        """The dense statistics as fitters read them: each on ``fit_device``, one at a time."""
        return StatsOn(self.dense.stats, self.fit_device)

    @property
    def statistics(self) -> dict[str, Statistic]:
        return self.dense.statistics

    @property
    def evaluations(self) -> int:
        """Scoring-set evaluations run (for cost reports)."""
        return self.scoring.evaluations

    @property
    def replayed(self) -> int:
        return self.journal.replayed

    @property
    def replayed_seconds(self) -> float:
        return self.journal.replayed_seconds

    def one_pass(self):
        return self.piecewise.one_pass()

    def loaded(self, module: nn.Module):
        """``with bench.loaded(module):`` its weights are in memory inside the block, even when the
        model's weights are streamed (for fitters that read or copy weights instead of running them)."""
        return self.piecewise.loaded(module)

    def position(self, sub: Submodule) -> int:
        return self.piecewise.position(sub)

    def batches(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return self.piecewise.batches(ids)

    def context(self, h: torch.Tensor):
        return self.piecewise.context(h)

    def layer_groups(self) -> list[tuple[Submodule, ...]]:
        """The submodules of each layer, in depth order (whole-layer and window selectors)."""
        return [tuple(s for s in self.subs if s.layer == layer) for layer in range(self.adapter.num_layers)]

    def statistic(self, name: str, sub: Submodule) -> float:
        """The registered statistic ``name`` of ``sub`` over the calibration tokens (dense model)."""
        return self.dense.value(name, sub)

    def statistics_signature(self) -> list[str]:
        return self.dense.signature()

    def boundary(self, index: int) -> list[torch.Tensor]:
        """The current model's residual stream on the scoring windows in front of submodule
        ``index`` (``len(subs)``: after the last one), one tensor per batch."""
        return self.scoring.boundary(index)

    def dense_boundary(self, index: int) -> list[torch.Tensor]:
        return self.scoring.dense_boundary(index)

    @contextmanager
    def subset(self, windows: int | None):
        """Judge candidates on the first ``windows`` scoring windows only (None: all of them)."""
        with self.scoring.subset(windows):
            yield self

    def journal_evaluations(self, path: Path) -> int:
        """Journal every scoring evaluation to ``path`` and answer those already there from it
        (see ``EvaluationJournal``); returns how many it holds."""
        return self.journal.open(path)

    def calibration_trace(self, stop: int, visit: Callable[[int, Submodule | None, torch.Tensor, torch.Tensor | None], None]) -> None:
        """``Piecewise.trace`` of the calibration windows through the current model (window-level
        fitters keep what they need: a few boundaries, or Gram matrices)."""
        self.piecewise.trace(self.windows.calib, stop, visit)

    # ------------------------------------------------------------------ the dense pass
    @torch.inference_mode()
    def collect(self, cache: Path | None = None) -> bool:
        """Dense statistics (from ``cache`` when present, else one pass, written there) and the
        scoring set's boundary states. Returns whether the statistics came from the cache."""
        cached = self.dense.collect(self.windows.calib, cache)
        self.scoring.prepare(self.model.config.vocab_size)
        return cached

    # ------------------------------------------------------------------ judging candidates
    def check_model(self) -> None:
        """The cached boundary states and the journal's keys describe the originals plus ``replaced``.
        A module swapped into the model behind the workbench's back (e.g. a per-prompt choice left
        installed) would make every evaluation, and every journal entry, silently wrong: refuse."""
        for sub in self.subs:
            if self.adapter.module(sub) is not self.replaced.get(sub, self.originals[sub]):
                raise SubFitError(f"{sub.name}: the model holds a {type(self.adapter.module(sub)).__name__} the "
                                  "workbench did not install; put the module back before scoring (Workbench.restore "
                                  "undoes only what the workbench did)")

    def _key(self, modules: dict[Submodule, nn.Module], metric: str) -> str | None:
        if self.factored:  # factored linears are not in the key: never journaled
            return None
        return self.journal.key({**self.replaced, **modules}, metric, self.scoring.judged())

    def _journaled(self, modules: dict[Submodule, nn.Module], metric: str, evaluate: Callable[[], float]) -> float:
        self.check_model()
        key = self._key(modules, metric)
        value = self.journal.replay(key)
        if value is None:
            t0 = time.perf_counter()
            value = evaluate()
            self.journal.record(key, value, time.perf_counter() - t0)
        return value

    def metric(self, metric: str) -> float:
        """The current (partially compressed) model's metric on the scoring set."""
        return self._journaled({}, metric, lambda: self.scoring.evaluate(self.boundary(len(self.subs)), metric))

    def metric_with(self, sub: Submodule, module: nn.Module, metric: str) -> float:
        """The metric if ``sub`` were replaced by ``module``, re-running only what follows it."""
        return self.metric_with_many({sub: module}, metric)

    @torch.inference_mode()
    def states_with(self, modules: dict[Submodule, nn.Module]) -> list[torch.Tensor]:
        """The final residual stream on the scoring windows if every submodule in ``modules`` were
        replaced, re-running from the first of them onward."""
        start = min(self.position(s) for s in modules)
        return self.piecewise.run(start, self.boundary(start), modules)

    def metric_with_many(self, modules: dict[Submodule, nn.Module], metric: str) -> float:
        """The metric if every submodule in ``modules`` were replaced (e.g. a whole layer or a
        window), re-running from the first of them onward."""
        return self._journaled(modules, metric, lambda: self.scoring.evaluate(self.states_with(modules), metric))

    def metrics_with_each(self, candidates: list[dict[Submodule, nn.Module]], metric: str) -> list[float]:
        """``metric_with_many`` of each candidate. With streamed weights the candidates run together,
        layer by layer, so each layer's weights are read once per round, not once per candidate (their
        scoring-set states are in flight together, up to ``in_flight_bytes``); in memory they run one
        after another. The numbers are the same either way."""
        if self.stream is None:
            return [self.metric_with_many(c, metric) for c in progress(candidates, desc="scoring candidates")]
        self.check_model()
        keys = [self._key(c, metric) for c in candidates]
        values = [self.journal.replay(k) for k in keys]
        todo = [i for i, v in enumerate(values) if v is None]
        state_bytes = sum(h.numel() * h.element_size() for h in self.boundary(0))
        chunk = max(1, self.in_flight_bytes // max(state_bytes, 1))
        for part in progress([todo[i:i + chunk] for i in range(0, len(todo), chunk)], desc="scoring candidates"):
            t0 = time.perf_counter()
            finals = self._run_together([candidates[i] for i in part])
            with self.one_pass():  # the head's weights, once for every candidate
                fresh = [self.scoring.evaluate(f, metric) for f in finals]
            seconds = (time.perf_counter() - t0) / len(part)
            for i, value in zip(part, fresh):
                self.journal.record(keys[i], value, seconds)
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
                        states[i] = [self.piecewise.step(sub, module, h) for h in hs]
        return [hs for hs in states if hs is not None]

    # ------------------------------------------------------------------ changing the model
    @torch.inference_mode()
    def commit(self, sub: Submodule, module: nn.Module) -> None:
        """Replace ``sub`` by ``module`` and refresh the cached boundaries downstream of it."""
        self.check_model()
        self.adapter.replace(sub, module)
        self.replaced[sub] = module
        self._refresh_from(self.position(sub))

    def _refresh_from(self, start: int) -> None:
        """Re-run the scoring windows through the model as it stands from boundary ``start`` on,
        keeping every boundary state downstream of it."""
        self.piecewise.run(start, self.scoring.states[start], visit=self.scoring.keep)

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
        if self.stream is not None:  # the factors it streamed are no longer the model's
            self.stream.forget_adopted()
        self.adapter.finalize()
        self.scoring.reset()

    # ------------------------------------------------------------------ fits
    def fit(self, fitter: Fitter, sub: Submodule) -> Bypass:
        """Fit from dense statistics, memoised: the same fitter and submodule give the same bypass
        (after ``reanchor``: the anchored fit it made for the submodule)."""
        fits = self._fits.setdefault(fitter, {})
        if sub not in fits:
            fits[sub] = fitter.fit(sub, self.fit_stats[sub]).to(self.device, self.dtype)
        return fits[sub]

    @torch.inference_mode()
    def refit_anchored(self, fitter: Fitter, selected: list[Submodule]) -> dict[Submodule, Bypass]:
        """Fit each selected bypass on the compressed model's inputs against dense targets, in depth order,
        so later bypasses correct the drift left by earlier ones. Leaves the model compressed.

        The target is the dense contribution y plus ``drift_correction`` (a) times the drift d = h - h_hat
        of the compressed stream from the dense one at the submodule: with a = 1 the bypass is fitted to
        restore the dense stream (h_hat + b = h + y), with a = 0 to reproduce y only. Part of the drift
        is specific to the calibration text, so a full correction holds less well off its domain."""
        return self._anchored(fitter, selected, [])[0]

    @torch.inference_mode()
    def reanchor(self, fitter: Fitter, selected: list[Submodule], candidates: list[Submodule]) -> None:
        """Mid-selection: refit ``selected`` as ``refit_anchored`` does and refresh the scoring boundaries
        behind them; fit each of ``candidates`` the same way (on the inputs the compressed model gives it,
        the model left unchanged there), and let ``fit`` return those from now on. The next scoring then
        judges every candidate with the bypass an anchored run would give it, not its fit to the dense model."""
        fits, probes = self._anchored(fitter, selected, candidates)
        if fits:
            self._refresh_from(min(self.position(s) for s in fits))
        self._fits.setdefault(fitter, {}).update(probes)

    def _anchored(self, fitter: Fitter, selected: list[Submodule], candidates: list[Submodule]
                  ) -> tuple[dict[Submodule, Bypass], dict[Submodule, Bypass]]:
        """One calibration pass of the dense and the compressed stream side by side: each selected
        submodule is fitted and replaced in depth order; each candidate is fitted and left in place.
        Returns both sets of fits."""
        self.restore()
        chosen, probes = set(selected), set(candidates) - set(selected)
        fits: dict[Submodule, Bypass] = {}
        probed: dict[Submodule, Bypass] = {}
        dim, a = self.adapter.hidden_size, self.drift_correction
        with self.one_pass():
            dense = [self.adapter.embed(b) for b in self.batches(self.windows.calib)]
        comp = list(dense)
        for sub in progress(self.subs, desc="anchored refit"):
            original = self.originals[sub]
            with self.one_pass():
                targets = [self.adapter.contribution(sub, h, self.context(h), original) for h in dense]
                if sub in chosen or sub in probes:
                    st = SubStats(dim, sub.name)
                    for h, hc, y in zip(dense, comp, targets):
                        st.add(self.adapter.bypass_input(sub, hc), y + a * (h - hc) if a else y)
                    st.check()
                    fit = fitter.fit(sub, st.to(self.fit_device)).to(self.device, self.dtype)
                    (fits if sub in chosen else probed)[sub] = fit
                if sub in chosen:
                    self.adapter.replace(sub, fits[sub])
                    self.replaced[sub] = fits[sub]
                if len(fits) == len(chosen) and len(probed) == len(probes):
                    break  # the streams past the deepest fit feed no other
                if fits:
                    comp = [self.piecewise.step(sub, fits.get(sub, original), hc) for hc in comp]
            dense = [h + y for h, y in zip(dense, targets)]
            if not fits:  # nothing replaced yet: the compressed stream is still the dense one
                comp = dense
        return fits, probed
