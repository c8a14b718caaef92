"""The dense model's calibration statistics: per submodule the float64 Gram and cross-Gram every
closed-form fit needs (``SubStats``), plus the sums of every registered plugin statistic, all
accumulated in one pass that streams the calibration windows through the model one submodule at
a time (the residual stream is held at the current boundary and at its layer's input, never at
every depth). Read from / written to the statistics cache when one is given.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

import torch

from subfit_core.engine.cache import load_spilled, load_stats, publish_spilled, save_stats, spill_root, state_shapes
from subfit_core.engine.checkpoint import PassCheckpoint
from subfit_core.engine.interfaces import Statistic, Submodule
from subfit_core.engine.piecewise import Piecewise
from subfit_core.engine.stats import SpilledStats, SubStats
from subfit_core.errors import ConfigError, did_you_mean
from subfit_core.plugins import build_component
from subfit_core.progress import progress


def source_digest(cls: type) -> str:
    """A hash of a class's source, so an edited statistic (same name and version) misses the cache."""
    import inspect

    try:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()[:16]
    except (OSError, TypeError):  # defined where its source cannot be read: its name and version decide
        return "-"


class DenseStatistics:
    def __init__(self, piecewise: Piecewise, plugins):
        self.piecewise, self.plugins = piecewise, plugins
        # every registered statistic is accumulated in the dense pass (each is a few sums per token)
        self.statistics: dict[str, Statistic] = {
            name: build_component(plugins, "statistic", {"name": name}, "statistic")
            for name in plugins.registries["statistic"].names()}
        # streamed models are the big ones: their statistics wait on disk, read back one at a time
        self.stats: MutableMapping[Submodule, SubStats] = {} if piecewise.stream is None else SpilledStats(
            Path(tempfile.mkdtemp(prefix="stats-", dir=spill_root())))
        self._extras: dict[Submodule, tuple[dict[str, torch.Tensor], int]] = {}  # the statistics' sums, tokens

    @torch.inference_mode()
    def collect(self, calib: torch.Tensor, cache: Path | None = None) -> bool:
        """The statistics of the calibration windows ``calib``, read from ``cache`` when present, else
        streamed and written there (a file, or for streamed weights a folder of one file per
        submodule). Returns whether they came from the cache."""
        subs, dim = self.piecewise.subs, self.piecewise.adapter.hidden_size
        widths = {name: stat.width for name, stat in self.statistics.items()}
        cached: MutableMapping[Submodule, SubStats] | None = None
        if cache is not None and self.piecewise.stream is None:  # one file, read whole
            if (whole := load_stats(cache, subs, dim, widths)) is not None:
                cached, self._extras = whole, {s: (st.extra, st.tokens) for s, st in whole.items()}
        elif cache is not None:  # a folder, one file per submodule, read when a fit asks
            if (spilled := load_spilled(cache, subs, dim, widths)) is not None:
                cached, self._extras = spilled, {s: spilled.summary(s) for s in subs}
        if cached is not None:
            self.stats = cached
            return True
        if cache is None or not isinstance(self.stats, SpilledStats):
            self.accumulate(calib)
            if cache is not None:
                save_stats(cache, self.stats)
            return False
        checkpoint = PassCheckpoint.claim(cache)  # a streamed pass can resume where a killed one stopped
        try:
            self.accumulate(calib, checkpoint, state_shapes(dim, widths))
            if checkpoint is not None:
                checkpoint.finish()
            publish_spilled(cache, self.stats)
            if self.stats.folder != cache:  # another run published this entry first: ours goes with the run
                self.stats.make_temporary()
        finally:
            if checkpoint is not None:
                checkpoint.release()
        return False

    def accumulate(self, ids: torch.Tensor, checkpoint: PassCheckpoint | None = None, shapes: dict | None = None) -> None:
        """The calibration pass: each submodule over every batch, then the next (from the last
        ``checkpoint`` of a killed run when there is one, saving new ones at layer boundaries)."""
        pw, adapter = self.piecewise, self.piecewise.adapter
        start, calib = 0, []
        if checkpoint is not None:
            resumed = checkpoint.resume(pw.subs, shapes or {})
            if resumed is None:
                self.stats = checkpoint.store()
            else:
                self.stats, start, stream = resumed
                self._extras = {s: self.stats.summary(s) for s in pw.subs[:start]}
                sizes = [len(b) for b in pw.batches(ids)]
                calib = [h.to(pw.device) for h in stream] if [len(h) for h in stream] == sizes else \
                    [h.to(pw.device) for h in torch.cat(stream).split(pw.batch_size)]  # another batch size now
                print(f"statistics: resuming the dense pass at {pw.subs[start].name} ({start} of {len(pw.subs)} "
                      f"submodules done, from {checkpoint.folder})", file=sys.stderr)
        if start == 0:
            with pw.one_pass():
                calib = [adapter.embed(b) for b in pw.batches(ids)]
        layer_input: list[torch.Tensor] = []
        bar = progress(pw.subs[start:], desc="calibration statistics", initial=start, total=len(pw.subs))
        for i, sub in enumerate(bar, start=start):
            if i == start or pw.subs[i - 1].layer != sub.layer:
                if checkpoint is not None and i > start and checkpoint.due():
                    checkpoint.save([s.name for s in pw.subs[:i]], calib)
                layer_input = list(calib)
            st = SubStats(adapter.hidden_size, sub.name)
            module = adapter.module(sub)
            with pw.one_pass():
                for j, h in enumerate(calib):
                    x = adapter.bypass_input(sub, h)
                    y = adapter.apply(sub, module, x, pw.context(h))
                    st.add(x, y, {name: stat.observe(sub, h, y, layer_input[j]) for name, stat in self.statistics.items()})
                    calib[j] = h + y
            st.check()
            self.stats[sub] = st
            self._extras[sub] = (st.extra, st.tokens)
            del st  # before the next submodule's matrices are allocated (spilled statistics are not kept)

    def signature(self) -> list[str]:
        """What the statistics depend on besides the model and the data: each registered statistic's
        class and the plugin (and version) that registered it, for the cache key."""
        entry = self.plugins.registries["statistic"].entry
        return [f"{name}={type(stat).__module__}.{type(stat).__qualname__}|{entry(name).origin}|{source_digest(type(stat))}"
                for name, stat in self.statistics.items()]

    def value(self, name: str, sub: Submodule) -> float:
        """The registered statistic ``name`` of ``sub`` over the calibration tokens."""
        if name not in self.statistics:
            raise ConfigError(f"statistic {name!r} is not registered; {did_you_mean(name, list(self.statistics))}")
        extra, tokens = self._extras[sub]  # kept apart from the Gram matrices, which may wait on disk
        return self.statistics[name].value(extra[name], tokens)
