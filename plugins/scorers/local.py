"""Local redundancy scores read from the dense statistics (no extra forward passes; the two
statistics are registered by ``subfit_plugins.statistics``).

    rot_s = 1 - mean_t cos(h_t, h_t + f_s(x_t))    how much the submodule turns the residual stream
    mag_s = mean_t ||f_s(x_t)|| / ||h_t||           how much it adds
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from subfit_core.engine.interfaces import Scorer, Submodule


def rank_of(values: dict[Submodule, float]) -> dict[Submodule, float]:
    order = sorted(values, key=values.get)
    return {s: float(i) for i, s in enumerate(order)}


@dataclass
class RotationParams:
    combine: Literal["rot*mag", "rot", "mag", "rank-sum"] = "rot*mag"


class RotationMagnitudeScorer(Scorer):
    Params = RotationParams
    description = "how much each submodule rotates and rescales the residual stream"
    statistics = ("rotation", "magnitude")

    def score(self, candidates, bench, fitter):
        rot = {s: bench.statistic("rotation", s) for s in candidates}
        mag = {s: bench.statistic("magnitude", s) for s in candidates}
        combine = self.params.combine
        if combine == "rot":
            return rot
        if combine == "mag":
            return mag
        if combine == "rank-sum":
            rr, mr = rank_of(rot), rank_of(mag)
            return {s: rr[s] + mr[s] for s in candidates}
        return {s: rot[s] * mag[s] for s in candidates}
