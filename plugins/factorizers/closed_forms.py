"""Closed forms of the built-in factorizers (float64).

Notation (row-major, tokens in rows): a linear layer computes y = x W^T + b with W (m x n).
X holds its inputs in the dense model, X_hat its inputs in the partially compressed model
(both N x n). Every statistic and solve is float64.

* plain SVD:  W' = U_k S_k V_k^T of W.
* whitened (SVD-LLM):  G = X^T X = L L^T (Cholesky, L lower);  W L = U S V^T;
  W' = U_k S_k V_k^T L^-1.  Then ||X W^T - X W'^T||_F = ||(W - W') L||_F = sqrt(sum of the
  dropped sigma^2): the truncation loss is read off the spectrum. Ridge: G + mu I (mu = ridge x
  the mean of diag G) whitens with inputs augmented by sqrt(mu) I, i.e. the loss adds
  mu ||W - W'||_F^2; it trusts the calibration's covariance less (mu -> inf: plain SVD).
* anchored (AA-SVD):  min_{rank W' <= k} ||X W^T - X_hat W'^T||_F^2.  With C = X_hat^T X_hat = L L^T
  and M = X^T X_hat, write W' = Z L^-1; the objective is
      ||X W^T||^2 - 2 <W M L^-T, Z> + ||Z||^2 = ||Z - W M L^-T||_F^2 + const,
  so Z = the rank-k truncated SVD of A = W M L^-T (Eckart-Young), W' = U_k S_k V_k^T L^-1, and the
  excess over the unconstrained optimum is the sum of A's dropped sigma^2. Blending replaces M by
  alpha M + (1 - alpha) C (alpha = 0: match the layer's own output on X_hat). With identical streams
  M = C and A = W L: exactly SVD-LLM. Ridge: adding mu ||W'||_F^2 to the objective (mu = ridge x the
  mean of diag C) only replaces C by C + mu I in L; it keeps the weak directions of X_hat, where
  W M C^-1 is a noisy regression, from being amplified.

W' is stored as two factors: up = U_k S_k^1/2 (m x k) and down = S_k^1/2 V_k^T L^-1 (k x n).
"""

from __future__ import annotations

import torch

from subfit_core.engine.lowrank import Factors, regularised_cholesky
from subfit_core.errors import NumericalError


def _truncate(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of A split into balanced factors: (U_k S_k^1/2, S_k^1/2 V_k^T, all sigma)."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank], S


def factor_plain(weight: torch.Tensor, rank: int) -> Factors:
    up, down, S = _truncate(weight.double(), rank)
    return Factors(up, down, S)


def _with_ridge(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """G + mu I with mu = ridge x mean(diag G): a penalty scaled to the inputs' own energy."""
    if not ridge:
        return gram
    mu = ridge * float(gram.diagonal().mean())
    return gram + mu * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def factor_whitened(weight: torch.Tensor, gram: torch.Tensor, rank: int, name: str = "linear",
                    ridge: float = 0.0) -> Factors:
    """SVD-LLM: truncation-aware with the dense inputs' Gram G = X^T X = S S^T: SVD of W S."""
    S_chol, shift = regularised_cholesky(_with_ridge(gram, ridge), name)
    up, root_vh, S = _truncate(weight.double() @ S_chol, rank)
    down = torch.linalg.solve_triangular(S_chol, root_vh, upper=False, left=False)  # S^1/2 V^T S^-1
    return Factors(up, down, S, shift)


def factor_anchored(weight: torch.Tensor, gram_hat: torch.Tensor, cross: torch.Tensor, rank: int,
                    alpha: float = 1.0, name: str = "linear", ridge: float = 0.0) -> Factors:
    """AA-SVD closed form with C = X_hat^T X_hat (``gram_hat``) and M = X^T X_hat (``cross``)."""
    W = weight.double()
    L, shift = regularised_cholesky(_with_ridge(gram_hat, ridge), name)
    M = alpha * cross + (1.0 - alpha) * gram_hat
    # A = W M L^-T, i.e. A L^T = W M (L^T upper triangular)
    A = torch.linalg.solve_triangular(L.T, W @ M, upper=True, left=False)
    up, root_vh, S = _truncate(A, rank)
    # down = S^1/2 V^T L^-1, i.e. down L = S^1/2 V^T
    down = torch.linalg.solve_triangular(L, root_vh, upper=False, left=False)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise NumericalError(f"{name}: factorization produced NaN/Inf")
    return Factors(up, down, S, shift)


def spectrum_plain(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight.double())


def spectrum_whitened(weight: torch.Tensor, gram: torch.Tensor, name: str = "linear",
                      ridge: float = 0.0) -> torch.Tensor:
    L, _ = regularised_cholesky(_with_ridge(gram, ridge), name)
    return torch.linalg.svdvals(weight.double() @ L)
