"""Applying bypasses to a model and accounting for what changed."""

from __future__ import annotations

from collections import Counter

from torch import nn

from subfit_core.engine.adapter import Adapter
from subfit_core.engine.bypass import Bypass
from subfit_core.engine.interfaces import Submodule


def apply_bypasses(adapter: Adapter, bypasses: dict[Submodule, Bypass]) -> None:
    for sub, bypass in bypasses.items():
        adapter.replace(sub, bypass)
    adapter.finalize()


def records(bypasses: dict[Submodule, Bypass]) -> list[dict]:
    """What config.json stores to rebuild the model: one entry per replaced submodule, in depth order."""
    return [{"layer": s.layer, "kind": s.kind, "bypass": bypasses[s].spec()} for s in sorted(bypasses)]


def split_bypass_params(bypasses: dict[Submodule, nn.Module]) -> tuple[dict[Submodule, int], int]:
    """Per-submodule own bypass parameters, and parameters shared by several bypasses (counted once)."""
    owners = Counter(id(p) for b in bypasses.values() for p in b.parameters())
    own = {s: sum(p.numel() for p in b.parameters() if owners[id(p)] == 1) for s, b in bypasses.items()}
    seen, shared = set(), 0
    for b in bypasses.values():
        for p in b.parameters():
            if owners[id(p)] > 1 and id(p) not in seen:
                seen.add(id(p))
                shared += p.numel()
    return own, shared
