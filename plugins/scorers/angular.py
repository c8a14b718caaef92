"""Angular distance across a block (UIDL / Gromov et al., ReplaceMe's window choice):
    d(block) = arccos(mean_t cos(h_in, h_out)) / pi
between the residual stream in front of the block's first submodule and after its last, on the
scoring windows of the current model. A single submodule is a block of one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from subfit_core.engine.interfaces import Scorer


def angular_distance(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    cos = torch.cat([F.cosine_similarity(a.float(), b.float(), dim=-1).flatten() for a, b in zip(before, after)])
    return math.acos(max(-1.0, min(1.0, float(cos.mean())))) / math.pi


class AngularDistanceScorer(Scorer):
    description = "arccos(cos(block input, block output)) / pi on the scoring windows"
    scores_groups = True

    def score_groups(self, groups, bench, fitter):
        out = []
        for group in groups:
            first, last = min(map(bench.position, group)), max(map(bench.position, group))
            out.append(angular_distance(bench.boundary(first), bench.boundary(last + 1)))
        return out
