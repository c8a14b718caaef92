"""Adapter for mixture-of-experts decoders (Mixtral, Qwen3-MoE): pre-norm layers like Llama's whose
FFN submodule is the whole sparse block, router (``gate``) and experts (``experts``: stacked
``gate_up_proj`` and ``down_proj`` tensors). A bypass for it is dense. The budget counts every expert;
``active_param_count`` counts what one token runs (the router and its top-k experts), which is
what decides speed."""

from __future__ import annotations

import copy

import torch
from torch import nn

from subfit_core.engine.interfaces import Submodule

from .decoder import DecoderAdapter, count, fold_linear, output_linear
from .llama import PRE_NORM


def experts_of(module: nn.Module) -> nn.Module | None:
    """The stacked experts of a sparse block; None for a dense FFN (Qwen3-MoE's ``mlp_only_layers``)."""
    experts = getattr(module, "experts", None)
    return experts if experts is not None and hasattr(experts, "down_proj") else None


class MoEAdapter(DecoderAdapter):
    name = "moe"
    layout = PRE_NORM
    architectures = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")

    @property
    def top_k(self) -> int:
        return int(self.config.num_experts_per_tok)

    def active_param_count(self, sub: Submodule) -> int:
        experts = experts_of(self.originals[sub])
        if sub.kind == "attn" or experts is None:
            return self.param_count(sub)
        per_expert = count(experts) // experts.num_experts
        return self.param_count(sub) - count(experts) + self.top_k * per_expert

    def ffn_width(self, layer: int) -> int:
        experts = experts_of(self.originals[Submodule(layer, "ffn")])
        if experts is None:
            return super().ffn_width(layer)
        return self.top_k * int(experts.down_proj.shape[-1])  # a dense FFN as wide as what a token runs

    def fold_output(self, sub: Submodule, module: nn.Module, t: torch.Tensor) -> nn.Module:
        """Every expert's output times T: the routing weights are scalars, so T passes through their sum."""
        experts = experts_of(module)
        if sub.kind == "attn" or experts is None:
            return super().fold_output(sub, module, t)
        folded = copy.deepcopy(module)
        down = experts_of(folded).down_proj  # (experts, hidden, width): out = down[e] @ act
        with torch.no_grad():
            down.copy_(torch.einsum("ho,eow->ehw", t.T, down.double()).to(down.dtype))
        for name in ("shared_expert", "shared_experts"):  # blocks with always-on experts fold theirs too
            if getattr(folded, name, None) is not None:
                fold_linear(output_linear(getattr(folded, name), sub), t)
        return folded
