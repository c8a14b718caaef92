"""Running a model submodule by submodule: the one streaming interface of the engine.

The Workbench's passes, the factorization stage and plugins that run the model piecewise batch
the windows, build each batch's context once and run a module over every batch inside
``one_pass`` (with streamed weights, that module's weights are then read once, not per batch).
The residual stream h advances by each submodule's contribution: h <- h + f_s(x_s(h)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from subfit_core.engine.adapter import Adapter
from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.streaming import WeightStream


class Piecewise:
    def __init__(self, adapter: Adapter, batch_size: int, device: torch.device, stream: WeightStream | None = None):
        self.adapter, self.batch_size, self.device = adapter, batch_size, device
        self.stream = stream  # weights read per module when the model is not in memory (offload)
        self.subs = adapter.submodules()
        self._order = {s: i for i, s in enumerate(self.subs)}
        self._contexts: dict = {}

    def one_pass(self):
        """A loop of one module over many batches: with streamed weights, read them once for it."""
        return self.stream.keep() if self.stream is not None else nullcontext()

    @contextmanager
    def loaded(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` with every weight in memory within the block, streamed or not: for code that
        reads, copies or edits weights instead of running the module (a copy made inside keeps them)."""
        if self.stream is None:
            yield module
            return
        with self.stream.keep():
            parts = list(module.modules())
            for part in parts:
                self.stream.load(part)
            try:
                yield module
            finally:
                for part in parts:
                    self.stream.drop(part)  # at the end of the keep block

    def position(self, sub: Submodule) -> int:
        """Where ``sub`` sits along the residual stream (its input is boundary ``position(sub)``)."""
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

    def step(self, sub: Submodule, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The residual stream after ``sub``, computed by ``module``."""
        return h + self.adapter.contribution(sub, h, self.context(h), module)

    def run(self, start: int, hs: list[torch.Tensor], override: dict[Submodule, nn.Module] | None = None,
            visit: Callable[[int, list[torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
        """Batches ``hs`` (the stream in front of submodule ``start``) through every later submodule,
        ``override``'s modules in place of the model's; ``visit(position + 1, hs)`` after each."""
        override = override or {}
        for sub in self.subs[start:]:
            module = override[sub] if sub in override else self.adapter.module(sub)
            with self.one_pass():
                hs = [self.step(sub, module, h) for h in hs]
            if visit is not None:
                visit(self.position(sub) + 1, hs)
        return hs

    @torch.inference_mode()
    def trace(self, ids: torch.Tensor, stop: int,
              visit: Callable[[int, Submodule | None, torch.Tensor, torch.Tensor | None], None]) -> None:
        """Run ``ids`` through the model as it stands up to submodule ``stop`` (exclusive), one batch
        at a time, calling ``visit(batch, sub, h, y)`` with the residual stream ``h`` in front of each
        submodule and its contribution ``y`` (when ``stop`` is ``len(subs)``, once more with ``sub``
        and ``y`` None: the final residual stream). One batch's state is alive at a time."""
        for b, batch in enumerate(self.batches(ids)):
            h = self.adapter.embed(batch)
            for sub in self.subs[:stop]:
                y = self.adapter.contribution(sub, h, self.context(h))
                visit(b, sub, h, y)
                h = h + y
            if stop == len(self.subs):
                visit(b, None, h, None)  # the final residual stream
