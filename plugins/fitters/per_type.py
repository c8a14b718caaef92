"""One fitter per submodule type, e.g. SubFit's default: low-rank attention, shared-basis FFN."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from subfit_core.engine.bypass import Bypass
from subfit_core.engine.interfaces import Fitter, Submodule
from subfit_core.engine.stats import SubStats
from subfit_core.plugins import build_component


@dataclass
class PerTypeParams:
    attn: dict = field(default_factory=lambda: {"name": "low-rank", "rank": 64})
    ffn: dict = field(default_factory=lambda: {"name": "shared-basis", "rank": 256})


class PerTypeFitter(Fitter):
    Params = PerTypeParams
    description = "delegates attention and FFN submodules to two configured fitters"

    def __init__(self, params=None, plugins=None):
        super().__init__(params, plugins)
        from subfit_core.plugins import get_plugins

        plugins = plugins or get_plugins()
        self.by_kind: dict[str, Fitter] = {
            kind: build_component(plugins, "fitter", {"name": "linear", **getattr(self.params, kind)}, f"fitter.{kind}")
            for kind in ("attn", "ffn")
        }

    def prepare(self, subs: list[Submodule], stats: Mapping[Submodule, SubStats]) -> None:
        for kind, fitter in self.by_kind.items():
            fitter.prepare([s for s in subs if s.kind == kind], stats)

    def fit(self, sub: Submodule, stats: SubStats) -> Bypass:
        return self.by_kind[sub.kind].fit(sub, stats)

    def estimate_params(self, sub: Submodule, dim: int) -> int:
        return self.by_kind[sub.kind].estimate_params(sub, dim)

    def charges(self, subs: list[Submodule], dim: int) -> dict[Submodule, int]:
        out: dict[Submodule, int] = {}
        for kind, fitter in self.by_kind.items():
            out.update(fitter.charges([s for s in subs if s.kind == kind], dim))
        return out
