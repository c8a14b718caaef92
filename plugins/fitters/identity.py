"""Plain removal: the bypass adds nothing (what deletion-based methods do)."""

from __future__ import annotations

from subfit_core.bypass import ZeroBypass
from subfit_core.interfaces import Fitter, Submodule
from subfit_core.stats import SubStats


class IdentityFitter(Fitter):
    description = "no bypass: the submodule is removed and the residual stream passes unchanged"

    def fit(self, sub: Submodule, stats: SubStats) -> ZeroBypass:
        return ZeroBypass()

    def estimate_params(self, sub: Submodule, dim: int) -> int:
        return 0
