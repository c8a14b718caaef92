"""How selectors measure and spend the last of a budget (shared by the built-in selectors)."""

from __future__ import annotations


def achieved(budget, fitter, subs, dim: int) -> float:
    """Exact sparsity of replacing ``subs`` with this fitter's bypasses (shared tensors charged once)."""
    return budget.achieved(fitter.charges(list(subs), dim))


def marginal(budget, fitter, chosen, candidates, dim: int) -> dict:
    """What each candidate (a submodule, or a tuple of them) would add to the sparsity of ``chosen``."""
    base = achieved(budget, fitter, chosen, dim)
    return {c: achieved(budget, fitter, [*chosen, *(c if isinstance(c, tuple) else (c,))], dim) - base
            for c in candidates}


def pick(remaining, key, scores, saving, need):
    """Best of ``remaining`` by ``key``. Near the end (``need`` given) only candidates that do not
    overshoot the budget are considered, and when none is left, the one with the lowest score that
    completes it, so the achieved sparsity lands within one small candidate of the request."""
    if need is None:
        return min(remaining, key=key)
    fitting = [c for c in remaining if saving[c] <= need + 1e-12]
    return min(fitting, key=key) if fitting else min(remaining, key=lambda c: scores[c])
