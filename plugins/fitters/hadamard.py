"""Orthonormal Hadamard matrices of the widths LLMs use (H H^T = I, every entry +-1/sqrt(n)).

A Hadamard matrix of order n exists only for n = 1, 2 or a multiple of 4; we build
``sylvester(2^k) (x) core(m)`` with n = m 2^k and ``core`` one of Paley's two constructions from a
prime q (order q + 1 for q = 3 mod 4, order 2 (q + 1) for q = 1 mod 4). That covers 576 = 36 x 16,
640 = 20 x 32, 896 = 28 x 32, 3584 = 28 x 128, 5120 = 20 x 256 and every power of two.
"""

from __future__ import annotations

import torch


def is_prime(q: int) -> bool:
    return q > 1 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over Z_q, chi the quadratic character (0 at 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if x in squares else -1 for x in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley(m: int) -> torch.Tensor | None:
    """An unnormalised Hadamard matrix of order m from one of Paley's constructions, or None."""
    if m in (1, 2):
        return sylvester(m)
    q = m - 1
    if is_prime(q) and q % 4 == 3:  # Paley I: I + [[0, 1^T], [-1, Q]], Q antisymmetric
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and is_prime(q) and q % 4 == 1:  # Paley II from the symmetric conference matrix C
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, minus) + torch.kron(torch.eye(m // 2, dtype=torch.float64), plus)
    return None


def sylvester(n: int) -> torch.Tensor:
    """The unnormalised Hadamard matrix of order n = 2^k, by repeated doubling."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int) -> torch.Tensor | None:
    """The orthonormal n x n Hadamard matrix (float64) with the smallest Paley core, or None when
    this construction has none for n."""
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    while power >= 1:  # smallest core first: the largest power of two that leaves a buildable core
        core = paley(n // power)
        if core is not None:
            h = torch.kron(sylvester(power), core)
            return h / n ** 0.5
        power //= 2
    return None
