"""The budget: how much of the decoder to remove, in one of two exact units.

``params``: (removed decoder parameters - added bypass parameters) / decoder-layer parameters.
``layers``: layer-equivalents; a submodule counts (its params - its bypass params) / its layer's
params, and sparsity = layer-equivalents / number of layers. Embeddings and lm_head are excluded.
A submodule's params include its pre-norm; a bypass that has weights reads the normed input, so
the pre-norm it keeps is charged to it (plain removal drops the norm too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from subfit_core.engine.adapter import Adapter
from subfit_core.engine.interfaces import Submodule

UNITS = ("layers", "params")


@dataclass
class Budget:
    sparsity: float
    unit: str
    adapter: Adapter

    @property
    def decoder_params(self) -> int:
        return sum(self.adapter.layer_param_count(l) for l in range(self.adapter.num_layers))

    def saving(self, sub: Submodule, bypass_params: int) -> float:
        """Share of the decoder saved by replacing ``sub`` with a bypass of ``bypass_params``."""
        kept_input = self.adapter.input_params(sub) if bypass_params > 0 else 0
        net = self.adapter.param_count(sub) - bypass_params - kept_input
        if self.unit == "params":
            return net / self.decoder_params
        return net / self.adapter.layer_param_count(sub.layer) / self.adapter.num_layers

    def achieved(self, removed: dict[Submodule, int]) -> float:
        """Sparsity of a selection ``{sub: bypass params charged}``."""
        return sum(self.saving(s, p) for s, p in removed.items())

    def report(self, removed: dict[Submodule, int], shared_params: int = 0,
               saved_per_layer: dict[int, int] | None = None) -> dict:
        """Achieved sparsity in both units (shared bypass tensors charged once via ``shared_params``;
        ``saved_per_layer``: parameters saved inside kept submodules, e.g. by factorization)."""
        out: dict[str, Any] = {"requested": self.sparsity, "unit": self.unit}
        saved_per_layer = saved_per_layer or {}
        for unit in UNITS:
            b = Budget(self.sparsity, unit, self.adapter)
            extra = shared_params / b.decoder_params if unit == "params" else (
                shared_params / (b.decoder_params / self.adapter.num_layers) / self.adapter.num_layers)
            if unit == "params":
                inside = sum(saved_per_layer.values()) / b.decoder_params
            else:
                inside = sum(n / self.adapter.layer_param_count(l) for l, n in saved_per_layer.items()) / self.adapter.num_layers
            out[f"achieved_{unit}"] = b.achieved(removed) - extra + inside
        out["layer_equivalents"] = out["achieved_layers"] * self.adapter.num_layers
        return out
