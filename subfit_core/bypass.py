"""Bypass modules: what a removed submodule's contribution is replaced with.

A bypass maps the submodule's (normed) input x to a stand-in for its contribution f(x).
Each bypass can describe itself as a JSON ``spec`` so a saved model can be rebuilt from its config.
"""

from __future__ import annotations

import torch
from torch import nn


class Bypass(nn.Module):
    kind = "bypass"

    def spec(self) -> dict:
        return {"kind": self.kind}


class ZeroBypass(Bypass):
    """Plain removal: the submodule contributes nothing."""

    kind = "zero"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


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


def unique_param_count(modules) -> int:
    """Parameters of ``modules`` with shared tensors (a shared basis) counted once."""
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def build_bypasses(specs: list[dict], dtype: torch.dtype) -> list[Bypass]:
    """Empty bypasses with the shapes in ``specs`` (weights are loaded afterwards)."""
    shared: dict[str, nn.Parameter] = {}
    out = []
    for spec in specs:
        kind, d = spec["kind"], spec.get("dim")
        bias = torch.zeros(d, dtype=dtype) if spec.get("bias") else None
        if kind == "zero":
            out.append(ZeroBypass())
        elif kind == "linear":
            out.append(LinearBypass(torch.zeros(d, d, dtype=dtype), bias))
        elif kind == "lowrank":
            r = spec["rank"]
            out.append(LowRankBypass(torch.zeros(r, d, dtype=dtype), torch.zeros(d, r, dtype=dtype), bias))
        elif kind == "shared_basis":
            r, group = spec["rank"], spec["group"]
            if group not in shared:
                shared[group] = nn.Parameter(torch.zeros(r, d, dtype=dtype), requires_grad=False)
            out.append(SharedBasisBypass(shared[group], torch.zeros(d, r, dtype=dtype), bias, group))
        elif kind == "mlp":
            hidden = spec["hidden"]
            out.append(MLPBypass(torch.zeros(hidden, d, dtype=dtype), torch.zeros(hidden, d, dtype=dtype),
                                 torch.zeros(d, hidden, dtype=dtype)))
        else:
            raise ValueError(f"unknown bypass kind '{kind}' in saved config")
    return out
