"""Plain removal: the bypass adds nothing (what deletion-based methods do)."""

from __future__ import annotations

from subfit_core.engine.bypass import ZeroBypass
from subfit_core.engine.interfaces import Fitter, Submodule
from subfit_core.engine.stats import SubStats


class IdentityFitter(Fitter):
    description = "no bypass: the submodule is removed and the residual stream passes unchanged"

    def fit(self, sub: Submodule, stats: SubStats) -> ZeroBypass:
        return ZeroBypass()

    def estimate_params(self, sub: Submodule, dim: int) -> int:
        return 0
