"""Bypass modules: what a removed submodule's contribution is replaced with.

A bypass maps the submodule's (normed) input x to a stand-in for its contribution f(x).
Each bypass describes itself as a JSON ``spec`` (its ``kind`` plus shapes) and can build an empty
copy of itself from that spec, so a saved model is rebuilt from its config before its weights load.
Kinds are registered through the ``subfit_bypass_kinds`` hook (the built-in plugin registers
these), so a plugin's own bypass class saves and loads like the built-in ones.

A saved model carries the source of every bypass class it uses (``portable_source``) in its own
modeling file, so it loads where SubFit is not installed. That file has ``torch``, ``nn``, ``F``,
``math`` and ``Bypass`` in scope and nothing else: a class body that needs more overrides
``portable_source``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SubFitError


class Bypass(nn.Module):
    kind = "bypass"
    reads_input = True  # False: the bypass ignores its input, so the submodule's pre-norm can go too

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


class SharedBasisBypass(Bypass):
    """y = (x U^T) C^T + b where the input basis U (r x d) is one tensor shared by a group of bypasses.

    When fitted, every member holds the same Parameter. A rebuilt model registers it in the group's
    first member only and the others read it from there (``share_from``), so that a checkpoint,
    ours or ``save_pretrained``'s, stores it once under one name."""

    kind = "shared_basis"

    def __init__(self, basis: nn.Parameter, coef: torch.Tensor, bias: torch.Tensor | None = None, group: str = "basis0"):
        super().__init__()
        self.basis = basis  # the same Parameter object in every member of the group
        self.coef = nn.Parameter(coef, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.group = group
        self.owner: list[SharedBasisBypass] = []  # a list, so the owner is not registered as a submodule

    def share_from(self, owner: SharedBasisBypass) -> None:
        del self._parameters["basis"]
        self.owner = [owner]

    def basis_matrix(self) -> torch.Tensor:
        return self.owner[0].basis if self.owner else self.basis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # .to: with a device_map the group's first member (which holds the basis) may sit elsewhere
        return F.linear(F.linear(x, self.basis_matrix().to(x.device)), self.coef, self.bias)

    @property
    def rank(self) -> int:
        return self.basis_matrix().shape[0]

    def spec(self) -> dict:
        return {"kind": self.kind, "dim": self.basis_matrix().shape[1], "rank": self.rank,
                "bias": self.bias is not None, "group": self.group}

    @classmethod
    def empty(cls, spec, dtype, shared):
        d, r, group = spec["dim"], spec["rank"], spec["group"]
        coef, bias = torch.zeros(d, r, dtype=dtype), cls.zero_bias(spec, dtype)
        if group in shared:  # a later member: reads the basis of the group's first one
            member = cls(shared[group].basis, coef, bias, group)
            member.share_from(shared[group])
            return member
        shared[group] = cls(nn.Parameter(torch.zeros(r, d, dtype=dtype), requires_grad=False), coef, bias, group)
        return shared[group]


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


def bypass_classes(kinds: list[str], plugins=None) -> dict[str, type[Bypass]]:
    """kind -> the class it is registered to (default: by the installed plugins)."""
    if plugins is None:
        from .plugins import get_plugins

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
