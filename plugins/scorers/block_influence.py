"""Block Influence (ShortGPT): BI_l = 1 - mean_t cos(h_l, h_{l+1}), the input and output of a
whole decoder layer on the calibration set. Every submodule of layer l gets its layer's BI."""

from __future__ import annotations

from subfit_core.engine.interfaces import Scorer


class BlockInfluenceScorer(Scorer):
    description = "1 - cos(layer input, layer output) of the submodule's whole layer (ShortGPT)"
    statistics = ("layer-cosine",)

    def score(self, candidates, bench, fitter):
        last = {group[-1].layer: group[-1] for group in bench.layer_groups()}  # each layer's last submodule
        return {s: 1.0 - bench.statistic("layer-cosine", last[s.layer]) for s in candidates}
