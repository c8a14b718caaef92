"""Adapter for the Llama family (Llama, Mistral, Qwen2, Qwen3): pre-norm decoder layers with
``input_layernorm -> self_attn`` and ``post_attention_layernorm -> mlp`` on the residual stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from subfit_core.adapter import Adapter
from subfit_core.bypass import Bypass, ZeroBypass
from subfit_core.interfaces import Submodule


class AttentionBypass(nn.Module):
    """Stands where ``self_attn`` stood: same call signature, no KV cache, no token mixing."""

    def __init__(self, bypass: Bypass):
        super().__init__()
        self.bypass = bypass

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.bypass(hidden_states), None


@dataclass
class LlamaContext:
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor


class LlamaFamilyAdapter(Adapter):
    name = "llama-family"
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
        layer = self.layers[sub.layer]
        return layer.input_layernorm if sub.kind == "attn" else layer.post_attention_layernorm

    def _set_norm(self, sub: Submodule, norm: nn.Module) -> None:
        setattr(self.layers[sub.layer], "input_layernorm" if sub.kind == "attn" else "post_attention_layernorm", norm)

    def _current(self, sub: Submodule) -> nn.Module:
        layer = self.layers[sub.layer]
        return layer.self_attn if sub.kind == "attn" else layer.mlp

    def module(self, sub: Submodule) -> nn.Module:
        current = self._current(sub)
        return current.bypass if isinstance(current, AttentionBypass) else current

    def replace(self, sub: Submodule, module: nn.Module) -> None:
        # A plain removal reads no input, so its pre-norm goes too (no weights saved, no compute).
        self._set_norm(sub, nn.Identity() if isinstance(module, ZeroBypass) else self.norms[sub])
        layer = self.layers[sub.layer]
        if sub.kind == "attn":
            layer.self_attn = AttentionBypass(module) if isinstance(module, Bypass) else module
        else:
            layer.mlp = module

    def finalize(self) -> None:
        # Kept attentions take cache slots 0..K-1, so slot 0 is always a real attention: the cache's
        # sequence length (read from slot 0) stays right even when layer 0's attention is removed.
        kept = [l for l in self.layers if not isinstance(l.self_attn, AttentionBypass)]
        for slot, layer in enumerate(kept):
            layer.self_attn.layer_idx = slot

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
