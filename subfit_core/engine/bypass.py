"""Bypass modules: what a removed submodule's contribution is replaced with.

A bypass maps the submodule's (normed) input x to a stand-in for its contribution f(x).
Each bypass describes itself as a JSON ``spec`` (its ``kind`` plus shapes) and can build an empty
copy of itself from that spec, so a saved model is rebuilt from its config before its weights load.
Kinds are registered through the ``subfit_bypass_kinds`` hook (the built-in plugin registers
the three general ones here, and the fitters that need their own register theirs), so a plugin's
own bypass class saves and loads like the built-in ones.

A saved model carries the source of every bypass class it uses (``portable_source``) in its own
modeling file, so it loads where SubFit is not installed. That file has ``torch``, ``nn``, ``F``,
``math`` and ``Bypass`` in scope and nothing else: a class body that needs more overrides
``portable_source``.
"""

from __future__ import annotations

import torch
from torch import nn

from subfit_core.errors import SubFitError


class Bypass(nn.Module):
    kind = "bypass"
    reads_input = True  # False: the bypass ignores its input, so the submodule's pre-norm can go too
    reads_stream = False  # True: it reads the residual stream itself, not the pre-norm's output (a patch on the stream)

    def spec(self) -> dict:
        return {"kind": self.kind}

    @staticmethod
    def zero_bias(spec: dict, dtype: torch.dtype | None) -> torch.Tensor | None:
        return torch.zeros(spec["dim"], dtype=dtype) if spec.get("bias") else None

    @classmethod
    def portable_source(cls) -> str:
        """This class's Python source, written into a saved model's modeling file."""
        import inspect

        return inspect.getsource(cls)

    @classmethod
    def empty(cls, spec: dict, dtype: torch.dtype, shared: dict) -> Bypass:
        """A bypass of ``spec``'s shapes with zero weights (the saved weights are loaded into it).
        ``shared`` is one dict per model, for tensors several bypasses share (a shared basis)."""
        raise NotImplementedError(f"bypass kind '{cls.kind}' ({cls.__name__}) does not define empty(spec, dtype, shared)")


class ZeroBypass(Bypass):
    """Plain removal: the submodule contributes nothing."""

    kind = "zero"
    reads_input = False

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
        return cls(torch.zeros(d, d, dtype=dtype), cls.zero_bias(spec, dtype))


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
        return cls(torch.zeros(r, d, dtype=dtype), torch.zeros(d, r, dtype=dtype), cls.zero_bias(spec, dtype))


def bypass_classes(kinds: list[str], plugins=None) -> dict[str, type[Bypass]]:
    """kind -> the class it is registered to (default: by the installed plugins)."""
    if plugins is None:
        from subfit_core.plugins import get_plugins

        plugins = get_plugins()
    out = {}
    for kind in kinds:
        cls = plugins.registries["bypass kind"].get(kind)
        if cls.kind != kind:
            raise SubFitError(f"bypass kind '{kind}' is registered to {cls.__name__}, whose kind is '{cls.kind}'")
        out[kind] = cls
    return out


def build_bypasses(specs: list[dict], dtype: torch.dtype, plugins=None) -> list[Bypass]:
    """Empty bypasses with the shapes in ``specs`` (weights are loaded afterwards), each built by the
    class its kind is registered to (default: the installed plugins)."""
    classes = bypass_classes([spec["kind"] for spec in specs], plugins)
    shared: dict = {}
    return [classes[spec["kind"]].empty(spec, dtype, shared) for spec in specs]
