"""Low-rank factorization of linear layers, the method-independent parts: the factored module,
the uniform rank rule, a regularised Cholesky factor and adaptive rank allocation. The closed forms
(plain SVD, SVD-LLM, AA-SVD) live with their factorizers in ``subfit_plugins.factorizers``.

W' is stored as two factors: up = U_k S_k^1/2 (m x k) and down = S_k^1/2 V_k^T L^-1 (k x n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from subfit_core.errors import NumericalError


class FactoredLinear(nn.Module):
    """y = (x down^T) up^T + b: a linear layer of rank ``rank`` stored as two matrices (bias kept)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)  # k x n
        self.up = nn.Parameter(up, requires_grad=False)  # m x k
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def empty(cls, in_features: int, out_features: int, rank: int, bias: bool, dtype: torch.dtype) -> FactoredLinear:
        return cls(torch.zeros(rank, in_features, dtype=dtype), torch.zeros(out_features, rank, dtype=dtype),
                   torch.zeros(out_features, dtype=dtype) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up, self.bias)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    def spec(self) -> dict:
        return {"in": self.in_features, "out": self.out_features, "rank": self.rank, "bias": self.bias is not None}


@dataclass
class Factors:
    """A rank-k factorization of one weight and what its truncation left out."""

    up: torch.Tensor  # m x k, float64
    down: torch.Tensor  # k x n, float64
    sigma: torch.Tensor  # all singular values of the (whitened / anchored) matrix, descending
    shift: float = 0.0  # diagonal added to make the Gram matrix positive definite (0: none needed)

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def truncation_loss(self) -> float:
        """sqrt(sum of the dropped sigma^2)."""
        return float(self.sigma[self.rank:].square().sum().sqrt())

    def weight(self) -> torch.Tensor:
        return self.up @ self.down


def uniform_rank(kept_ratio: float, m: int, n: int) -> int:
    """k = floor(rho m n / (m + n)): the rank whose two factors hold ``kept_ratio`` of m x n parameters."""
    return max(1, min(min(m, n), math.floor(kept_ratio * m * n / (m + n))))


def regularised_cholesky(gram: torch.Tensor, name: str, max_tries: int = 12) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of a float64 Gram matrix. If it is not positive definite, the diagonal
    is shifted by 1e-10, 1e-9, ... times its mean until it is; returns (L, shift) so that the shift
    can be reported."""
    if not torch.isfinite(gram).all():
        raise NumericalError(f"{name}: Gram matrix contains NaN/Inf")
    L, info = torch.linalg.cholesky_ex(gram)
    if info == 0:
        return L, 0.0
    scale = float(gram.diagonal().abs().mean()) or 1.0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for power in range(-10, -10 + max_tries):
        shift = scale * 10.0**power
        L, info = torch.linalg.cholesky_ex(gram + shift * eye)
        if info == 0:
            return L, shift
    raise NumericalError(f"{name}: Gram matrix not positive definite even after a diagonal shift of {shift:.3g}")


def allocate_ranks(spectra: dict, shapes: dict, kept_ratio: float) -> dict:
    """Adaptive ranks under one parameter budget: kept_ratio x sum of m n over all matrices.

    Each singular value is worth its share of its matrix's energy (sigma_i^2 / sum sigma^2, so
    that matrices of different scale compare), and costs m + n parameters. Greedy by worth per
    parameter; since sigma is sorted, each matrix keeps a prefix. A matrix never gets a rank at
    which its factors would outgrow it (k (m + n) >= m n), and gets at least rank 1.
    """
    budget = kept_ratio * sum(m * n for m, n in shapes.values())
    ranks = {key: 1 for key in spectra}
    spent = sum(m + n for m, n in shapes.values())
    caps = {key: max(1, (m * n - 1) // (m + n)) for key, (m, n) in shapes.items()}
    items: list[tuple[float, object]] = []  # (worth per parameter of one more rank, matrix key)
    for key, sigma in spectra.items():
        energy = sigma.double().square()
        share = (energy / energy.sum().clamp_min(1e-300)).tolist()  # one copy from the device, not one per value
        m, n = shapes[key]
        items.extend((share[i] / (m + n), key) for i in range(1, min(len(share), caps[key])))
    items.sort(key=lambda t: -t[0])
    for _, key in items:
        cost = sum(shapes[key])
        if spent + cost <= budget:
            ranks[key] += 1
            spent += cost
    return ranks
