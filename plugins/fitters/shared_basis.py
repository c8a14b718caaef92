"""Shared-basis bypasses for a group of submodules (SubFit's FFN bypass).

Every bypass in the group reads its input through one basis U (r x d), then applies its own
coefficients: y = (x U^T) C_s^T + b_s. U is charged once, so many FFNs can be bypassed at a rank
that would be too expensive per layer.

Choosing U ("responses", the default): in whitened input coordinates z = x Gbar^-1/2 the fitted
response of member s is z B_s with B_s = Gbar^1/2 W_s (W_s its full ridge fit); the rank-r input
subspace that keeps most of every member's fitted response is the top-r eigenvectors of
sum_s B_s B_s^T, mapped back by Gbar^-1/2. ("inputs": top-r principal directions of the inputs.)
Given U, each C_s is a ridge fit on the projected inputs, so it is optimal for that U.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from subfit_core.engine.bypass import Bypass
from subfit_core.engine.interfaces import Fitter, Submodule
from subfit_core.engine.stats import SubStats, ridge_solve

from .linear import centered_gram, gram_of, symmetrized, top_eigvecs


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


@dataclass
class SharedBasisParams:
    rank: int = 256
    ridge: float = 1e-3
    bias: bool = True
    basis: Literal["responses", "inputs"] = "responses"
    expected_group: int = 4  # members the basis is assumed shared by when charging it during selection

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank: {self.rank} must be at least 1")


def _sqrt_and_inv_sqrt(m: torch.Tensor, floor: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(symmetrized(m))
    vals = vals.clamp_min(floor * float(vals.max().clamp_min(1e-30)))
    return (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T


class SharedBasisFitter(Fitter):
    Params = SharedBasisParams
    description = "one input basis shared by the group, per-member coefficients (closed form)"

    def __init__(self, params=None, plugins=None):
        super().__init__(params, plugins)
        self._basis: torch.Tensor | None = None  # (d x r), columns span the shared input subspace
        self._shared: nn.Parameter | None = None
        self._members: set[Submodule] = set()

    def basis_for(self, subs: list[Submodule], stats: Mapping[Submodule, SubStats]) -> torch.Tensor:
        """The group's basis, reading one member's statistics at a time (a streamed run keeps them on
        disk, d^2 each): memory does not grow with the group, and so not with the model's depth."""
        first = stats[subs[0]]
        d, device = first.dim, first.gram.device
        del first
        r = min(self.params.rank, d)
        # mean input covariance (centred when there is an intercept: the mean is the bias's job)
        # d^2 float64 matrices dominate memory at real widths: accumulate in place, free each one when done
        mean_moment = torch.zeros(d, d, dtype=torch.float64, device=device)
        for sub in subs:
            s = stats[sub]
            mean_moment.add_(centered_gram(s.gram) if self.params.bias else s.gram[:d, :d], alpha=1 / max(s.tokens, 1))
        mean_moment /= len(subs)
        if self.params.basis == "inputs":
            return top_eigvecs(mean_moment, r)
        root, inv_root = _sqrt_and_inv_sqrt(mean_moment)
        del mean_moment
        m = torch.zeros(d, d, dtype=torch.float64, device=device)
        for sub in subs:
            s = stats[sub]
            gram, cross = gram_of(s, self.params.bias)
            w = ridge_solve(gram, cross, self.params.ridge, s.name)[:d] / max(s.tokens, 1) ** 0.5
            del gram, cross, s
            b = root @ w
            del w
            m.addmm_(b, b.T)
            del b
        del root
        return inv_root @ top_eigvecs(m, r)

    def prepare(self, subs: list[Submodule], stats: Mapping[Submodule, SubStats]) -> None:
        self._members = set(subs)
        if subs:
            self._basis = self.basis_for(subs, stats)
            self._shared = nn.Parameter(self._basis.T.contiguous().float(), requires_grad=False)

    def fit(self, sub: Submodule, stats: SubStats) -> SharedBasisBypass:
        if sub in self._members:
            basis, shared, group = self._basis, self._shared, f"shared-{sub.kind}"
        else:  # alone (e.g. while candidates are scored): a basis of its own, same rank
            basis = self.basis_for([sub], {sub: stats})
            shared, group = nn.Parameter(basis.T.contiguous().float(), requires_grad=False), f"own-{sub.name}"
        r = basis.shape[1]
        gram, cross = gram_of(stats, self.params.bias)
        proj = torch.zeros(stats.dim + 1, r + 1, dtype=torch.float64, device=basis.device)  # [x,1] -> [x U, 1]
        proj[:-1, :r] = basis
        proj[-1, r] = 1.0
        c = ridge_solve(proj.T @ gram @ proj, proj.T @ cross, self.params.ridge, sub.name)
        bias = c[r].float() if self.params.bias else None
        return SharedBasisBypass(shared, c[:r].T.contiguous().float(), bias, group)

    def _own_params(self, dim: int) -> int:
        return dim * min(self.params.rank, dim) + (dim if self.params.bias else 0)

    def estimate_params(self, sub: Submodule, dim: int) -> int:
        return self._own_params(dim) + dim * min(self.params.rank, dim) // max(self.params.expected_group, 1)

    def charges(self, subs: list[Submodule], dim: int) -> dict[Submodule, int]:
        out = {s: self._own_params(dim) for s in subs}
        if subs:
            out[min(subs)] += dim * min(self.params.rank, dim)  # the shared basis, once
        return out
