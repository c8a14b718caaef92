"""Adapter for the Llama family (Llama, Mistral, Qwen2, Qwen3): pre-norm decoder layers with
``input_layernorm -> self_attn`` and ``post_attention_layernorm -> mlp`` on the residual stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from subfit_core.engine.adapter import Adapter
from subfit_core.engine.bypass import Bypass
from subfit_core.engine.interfaces import Submodule

from . import llama_layout as layout


@dataclass
class LlamaContext:
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor


class LlamaFamilyAdapter(Adapter):
    name = "llama-family"
    layout = layout
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.layers = model.model.layers
        self.originals = {s: self._current(s) for s in self.submodules()}
        self.norms = {s: self._norm(s) for s in self.submodules()}
        # A submodule is its pre-norm plus its module: removing both of a layer removes the whole layer.
        self._sizes = {s: sum(p.numel() for p in self.originals[s].parameters())
                       + sum(p.numel() for p in self.norms[s].parameters()) for s in self.submodules()}
        self._layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in self.layers]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def _norm(self, sub: Submodule) -> nn.Module:
        return getattr(self.layers[sub.layer], layout.norm_name(sub.kind))

    def _current(self, sub: Submodule) -> nn.Module:
        layer = self.layers[sub.layer]
        return layer.self_attn if sub.kind == "attn" else layer.mlp

    def module(self, sub: Submodule) -> nn.Module:
        return layout.submodule(self.model, sub.layer, sub.kind)

    def replace(self, sub: Submodule, module: nn.Module) -> None:
        layout.set_module(self.model, sub.layer, sub.kind, self.originals[sub], self.norms[sub])
        if isinstance(module, Bypass):
            layout.install(self.model, sub.layer, sub.kind, module)
        else:  # the original, or a module standing in with the original's call signature
            layout.set_module(self.model, sub.layer, sub.kind, module, self.norms[sub])

    def finalize(self) -> None:
        layout.finalize(self.model)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)

    def context(self, hidden: torch.Tensor) -> LlamaContext:
        batch, seq = hidden.shape[:2]
        positions = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(batch, -1)
        pe = self.model.model.rotary_emb(hidden, positions)
        mask = torch.full((seq, seq), torch.finfo(hidden.dtype).min, device=hidden.device, dtype=hidden.dtype)
        mask = torch.triu(mask, diagonal=1)[None, None]
        return LlamaContext(pe, mask)

    def bypass_input(self, sub: Submodule, hidden: torch.Tensor) -> torch.Tensor:
        return self.norms[sub](hidden)

    def apply(self, sub: Submodule, module: nn.Module, x: torch.Tensor, ctx: LlamaContext) -> torch.Tensor:
        if isinstance(module, Bypass) or sub.kind == "ffn":
            return module(x)
        return module(hidden_states=x, position_embeddings=ctx.position_embeddings, attention_mask=ctx.mask)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden))

    def param_count(self, sub: Submodule) -> int:
        return self._sizes[sub]

    def input_params(self, sub: Submodule) -> int:
        return sum(p.numel() for p in self.norms[sub].parameters())

    def layer_param_count(self, layer: int) -> int:
        return self._layer_sizes[layer]

    def kv_bytes_per_token(self, kept_attention: int) -> int:
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        itemsize = next(self.model.parameters()).element_size()
        return 2 * cfg.num_key_value_heads * head_dim * itemsize * kept_attention
