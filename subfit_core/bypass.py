"""Bypass modules: what a removed submodule's contribution is replaced with.

A bypass maps the submodule's (normed) input x to a stand-in for its contribution f(x).
Each bypass describes itself as a JSON ``spec`` (its ``kind`` plus shapes) and can build an empty
copy of itself from that spec, so a saved model is rebuilt from its config before its weights load.
Kinds are registered through the ``subfit_bypass_kinds`` hook (the built-in plugin registers
these), so a plugin's own bypass class saves and loads like the built-in ones.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SubFitError


class Bypass(nn.Module):
    kind = "bypass"

    def spec(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def empty(cls, spec: dict, dtype: torch.dtype, shared: dict) -> Bypass:
        """A bypass of ``spec``'s shapes with zero weights (the saved weights are loaded into it).
        ``shared`` is one dict per model, for tensors several bypasses share (a shared basis)."""
        raise NotImplementedError(f"bypass kind '{cls.kind}' ({cls.__name__}) does not define empty(spec, dtype, shared)")


def _bias(spec: dict, dtype: torch.dtype) -> torch.Tensor | None:
    return torch.zeros(spec["dim"], dtype=dtype) if spec.get("bias") else None


class ZeroBypass(Bypass):
    """Plain removal: the submodule contributes nothing."""

    kind = "zero"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    @classmethod
    def empty(cls, spec, dtype, shared):
        return cls()


class LinearBypass(Bypass):
    """y = x W^T + b, full rank."""

    kind = "linear"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def spec(self) -> dict:
        return {"kind": self.kind, "dim": self.weight.shape[1], "bias": self.bias is not None}

    @classmethod
    def empty(cls, spec, dtype, shared):
        d = spec["dim"]
        return cls(torch.zeros(d, d, dtype=dtype), _bias(spec, dtype))


class LowRankBypass(Bypass):
    """y = (x A^T) B^T + b with A: r x d (down), B: d x r (up)."""

    kind = "lowrank"

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up, self.bias)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def spec(self) -> dict:
        return {"kind": self.kind, "dim": self.down.shape[1], "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def empty(cls, spec, dtype, shared):
        d, r = spec["dim"], spec["rank"]
        return cls(torch.zeros(r, d, dtype=dtype), torch.zeros(d, r, dtype=dtype), _bias(spec, dtype))


class SharedBasisBypass(Bypass):
    """y = (x U^T) C^T + b where the input basis U (r x d) is one tensor shared by a group of bypasses."""

    kind = "shared_basis"

    def __init__(self, basis: nn.Parameter, coef: torch.Tensor, bias: torch.Tensor | None = None, group: str = "basis0"):
        super().__init__()
        self.basis = basis  # the same Parameter object in every member of the group
        self.coef = nn.Parameter(coef, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.basis), self.coef, self.bias)

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def spec(self) -> dict:
        return {"kind": self.kind, "dim": self.basis.shape[1], "rank": self.rank,
                "bias": self.bias is not None, "group": self.group}

    @classmethod
    def empty(cls, spec, dtype, shared):
        d, r, group = spec["dim"], spec["rank"], spec["group"]
        if group not in shared:  # one Parameter for the whole group, as when it was fitted
            shared[group] = nn.Parameter(torch.zeros(r, d, dtype=dtype), requires_grad=False)
        return cls(shared[group], torch.zeros(d, r, dtype=dtype), _bias(spec, dtype), group)


class MLPBypass(Bypass):
    """y = W_down (silu(W_gate x) * W_up x): a gated feed-forward network standing in for a whole
    removed window (LLM-Streamline's lightweight replacement), trained rather than solved."""

    kind = "mlp"

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate = nn.Parameter(gate, requires_grad=False)  # hidden x d
        self.up = nn.Parameter(up, requires_grad=False)  # hidden x d
        self.down = nn.Parameter(down, requires_grad=False)  # d x hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = nn.functional
        return f.linear(f.silu(f.linear(x, self.gate)) * f.linear(x, self.up), self.down)

    def spec(self) -> dict:
        return {"kind": self.kind, "dim": self.gate.shape[1], "hidden": self.gate.shape[0]}

    @classmethod
    def empty(cls, spec, dtype, shared):
        d, hidden = spec["dim"], spec["hidden"]
        return cls(torch.zeros(hidden, d, dtype=dtype), torch.zeros(hidden, d, dtype=dtype), torch.zeros(d, hidden, dtype=dtype))


def unique_param_count(modules) -> int:
    """Parameters of ``modules`` with shared tensors (a shared basis) counted once."""
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def build_bypasses(specs: list[dict], dtype: torch.dtype, plugins=None) -> list[Bypass]:
    """Empty bypasses with the shapes in ``specs`` (weights are loaded afterwards), each built by the
    class its kind is registered to (default: the installed plugins)."""
    if plugins is None:
        from .plugins import get_plugins

        plugins = get_plugins()
    shared: dict = {}
    out = []
    for spec in specs:
        cls = plugins.registries["bypass kind"].get(spec["kind"])
        if cls.kind != spec["kind"]:
            raise SubFitError(f"bypass kind '{spec['kind']}' is registered to {cls.__name__}, whose kind is '{cls.kind}'")
        out.append(cls.empty(spec, dtype, shared))
    return out
