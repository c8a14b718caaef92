"""Statistics of how a submodule (or its whole layer) changes the residual stream h, summed over
calibration tokens t in the dense pass (means are read by the scorers):

    rotation      1 - cos(h_t, h_t + y_t)          how much the submodule turns the stream
    magnitude     ||y_t|| / ||h_t||                how much it adds
    layer-cosine  cos(h_in_t, h_t + y_t)           the stream after the submodule against the stream
                                                   in front of its layer (read at the layer's last
                                                   submodule: ShortGPT's layer input vs output)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subfit_core.engine.interfaces import Statistic


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).double().sum().reshape(1)


class Rotation(Statistic):
    description = "mean 1 - cos(h, h + y): how much the submodule turns the residual stream"

    def observe(self, sub, h, y, layer_input):
        return h[..., 0].numel() - _cos_sum(h, h + y)


class Magnitude(Statistic):
    description = "mean ||y|| / ||h||: the contribution's size relative to the residual stream"

    def observe(self, sub, h, y, layer_input):
        ratio = y.float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)
        return ratio.double().sum().reshape(1)


class LayerCosine(Statistic):
    description = "mean cos(layer input, stream after this submodule)"

    def observe(self, sub, h, y, layer_input):
        return _cos_sum(layer_input, h + y)
