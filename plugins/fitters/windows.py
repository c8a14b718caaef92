"""Removed windows: maximal runs of whole consecutive layers in a selection (the unit that
ReplaceMe and LLM-Streamline fit as one)."""

from __future__ import annotations

import torch

from subfit_core.engine.interfaces import Submodule
from subfit_core.errors import ConfigError


def removed_windows(selected: list[Submodule], fitter: str) -> list[tuple[int, int]]:
    """``[(first, last), ...]`` layers of each run of wholly removed layers, in depth order; a layer
    with only one of its submodules selected is an error naming it."""
    layers: dict[int, set[str]] = {}
    for sub in selected:
        layers.setdefault(sub.layer, set()).add(sub.kind)
    partial = [l for l, kinds in sorted(layers.items()) if kinds != {"attn", "ffn"}]
    if partial:
        raise ConfigError(f"fitter.name: {fitter} replaces windows of whole layers, but layer {partial[0]} is "
                          "selected only in part; use selector contiguous or whole-layer")
    windows: list[tuple[int, int]] = []
    for layer in sorted(layers):
        if windows and windows[-1][1] == layer - 1:
            windows[-1] = (windows[-1][0], layer)
        else:
            windows.append((layer, layer))
    return windows


def rows(t: torch.Tensor) -> torch.Tensor:
    """(batch, seq, d) -> (tokens, d)."""
    return t.reshape(-1, t.shape[-1])
