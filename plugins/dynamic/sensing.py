"""Compressed sensing of per-prompt harm: which candidate submodules THIS prompt needs.

A probe bypasses a random subset S_j of the n candidates at once and measures one number,
y_j = harm(S_j), the KL divergence of the probed model's next-token distributions from the
dense model's on the prompt. For small subsets harm is close to additive:

    y = A h + e,   A[j, i] = 1 if candidate i is in S_j,   h_i = harm of bypassing i alone.

A prompt's harm is the calibration average (the prior h0) plus a deviation d that is sparse:
most candidates behave on this prompt as on average, a few matter much more (or less). So the
m probes are recovered as

    d = argmin 0.5 |y - A h0 - A d|^2 + lam |d|_1,   h = max(h0 + d, 0)

which needs m of the order of k log(n / k) probes for k deviations, not n (one probe each); the
deviations the L1 penalty keeps are then refitted by least squares (the penalty shrinks them).
With no probes the estimate is the prior: a static choice.

Portable on purpose (it imports torch only): a saved per-prompt model's modeling file carries a
verbatim copy, so standard tools choose as SubFit does.
"""

from __future__ import annotations

import torch


def probe_design(probes: int, candidates: int, share: float, generator: torch.Generator) -> torch.Tensor:
    """(probes, candidates) 0/1 matrix, float64: each candidate is bypassed in round(share * probes)
    probes (at least one) chosen at random. A fixed count per candidate (not a coin per entry) leaves
    no candidate unmeasured; random placement keeps the columns incoherent."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share: {share} must be in (0, 1]")
    per = max(1, round(share * probes))
    a = torch.zeros(probes, candidates, dtype=torch.float64)
    for i in range(candidates):
        a[torch.randperm(probes, generator=generator)[:per], i] = 1.0
    return a


def lasso(a: torch.Tensor, y: torch.Tensor, lam: float, sweeps: int = 200, tol: float = 1e-10) -> torch.Tensor:
    """argmin_d 0.5 |y - A d|^2 + lam |d|_1 by cyclic coordinate descent (float64)."""
    a, y = a.double(), y.double()
    d = torch.zeros(a.shape[1], dtype=torch.float64)
    col = (a * a).sum(0)
    r = y.clone()  # residual y - A d
    for _ in range(sweeps):
        biggest = 0.0
        for i in range(a.shape[1]):
            if col[i] == 0:
                continue
            rho = float(a[:, i] @ r) + float(col[i]) * float(d[i])
            new = max(abs(rho) - lam, 0.0) * (1.0 if rho >= 0 else -1.0) / float(col[i])
            step = new - float(d[i])
            if step != 0.0:
                r -= step * a[:, i]
                d[i] = new
                biggest = max(biggest, abs(step))
        if biggest < tol:
            break
    return d


def omp(a: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Orthogonal matching pursuit: at most ``k`` nonzeros, least squares on the chosen support."""
    a, y = a.double(), y.double()
    norms = a.norm(dim=0).clamp_min(1e-30)
    support: list[int] = []
    x = torch.zeros(a.shape[1], dtype=torch.float64)
    r = y.clone()
    for _ in range(min(k, a.shape[0], a.shape[1])):
        corr = (a.T @ r).abs() / norms
        corr[support] = -1.0
        support.append(int(corr.argmax()))
        sol = torch.linalg.lstsq(a[:, support], y[:, None]).solution[:, 0]
        x.zero_()
        x[support] = sol
        r = y - a @ x
        if float(r.norm()) <= 1e-12 * max(float(y.norm()), 1e-30):
            break
    return x


def recover(a: torch.Tensor, y: torch.Tensor, prior: torch.Tensor, solver: str, lam: float, k: int) -> torch.Tensor:
    """Per-candidate harm from probe measurements ``y`` of design ``a``, around ``prior``."""
    rest = y.double() - a.double() @ prior.double()
    if solver == "lasso":
        # lam is relative: a share of the largest correlation, above which everything would be zero
        scale = float((a.double().T @ rest).abs().max()) if rest.numel() else 0.0
        d = lasso(a, rest, lam * scale)
        support = d.nonzero().flatten()
        if 0 < support.numel() <= a.shape[0]:  # the L1 penalty shrinks what it keeps: refit it unpenalised
            d[support] = torch.linalg.lstsq(a.double()[:, support], rest[:, None]).solution[:, 0]
    elif solver == "omp":
        d = omp(a, rest, k)
    else:
        raise ValueError(f"solver: {solver!r} is not one of lasso, omp")
    return (prior.double() + d).clamp_min(0.0)


def choose(harm: torch.Tensor, savings: list[float], budget: float, allowed) -> list[int]:
    """Indices of the candidates to skip: the least harm per unit of budget saved first, until
    ``budget`` is met. Near the end only candidates that do not overshoot are taken, and when none
    is left, the least harmful one that completes it (as the static selectors do). A candidate that
    saves nothing is never taken; one the model cannot skip together with those chosen
    (``allowed(indices)`` is False) is passed over."""
    left = sorted((i for i in range(len(savings)) if savings[i] > 0), key=lambda i: float(harm[i]) / savings[i])
    chosen: list[int] = []
    saved = 0.0
    while left and saved < budget - 1e-9:
        need = budget - saved
        fitting = [i for i in left if savings[i] <= need + 1e-12]
        i = fitting[0] if fitting else min(left, key=lambda c: float(harm[c]))
        left.remove(i)
        if allowed([*chosen, i]):
            chosen.append(i)
            saved += savings[i]
    return chosen
