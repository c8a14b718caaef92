"""The share of a submodule's contribution its bypass cannot reproduce, weighted by its size:
    score_s = mag_s * ||Y - X W_s||^2 / ||Y||^2
computed from the Gram matrices alone (no forward pass)."""

from __future__ import annotations

import torch

from subfit_core.engine.interfaces import Scorer

from ..fitters.linear import relative_residual


def bypass_as_matrix(bypass, dim: int) -> torch.Tensor:
    """The (d+1) x d matrix W of an affine bypass y = [x, 1] W, read by probing it."""
    probe = torch.cat([torch.eye(dim), torch.zeros(1, dim)])  # unit inputs, then the zero input
    param = next(bypass.parameters(), None)
    if param is not None:
        probe = probe.to(param.device, param.dtype)
    with torch.no_grad():
        out = bypass(probe).double().cpu()
    bias = out[dim]
    return torch.cat([out[:dim] - bias, bias[None]])


class FitResidualScorer(Scorer):
    description = "magnitude x relative residual of the fitted bypass, from Gram matrices"
    statistics = ("magnitude",)

    def score(self, candidates, bench, fitter):
        out = {}
        for s in candidates:
            st = bench.stats[s]
            w = bypass_as_matrix(bench.fit(fitter, s), st.dim)
            out[s] = bench.statistic("magnitude", s) * relative_residual(st, w)
        return out
