"""The adapter for transformers' decoder-only LMs: ``model.model.layers[i]`` holding an attention
and an FFN, each between an optional pre-norm and an optional post-norm (``DecoderLayout``).

A family is a subclass that names its architectures and its layout, and overrides what differs:
how the embeddings, the attention context or the logits are computed, what an FFN costs per token.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from subfit_core.engine.adapter import Adapter
from subfit_core.engine.bypass import Bypass
from subfit_core.engine.interfaces import Submodule
from subfit_core.errors import SubFitError

from .decoder_layout import DecoderLayout

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class DecoderContext:
    """Per attention type (full, sliding window): rotary position embeddings and the additive causal mask."""

    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[str, torch.Tensor]


def causal_mask(seq: int, window: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, seq, seq) additive mask: query i sees key j iff j <= i (and i - j < window)."""
    i = torch.arange(seq, device=device)[:, None]
    j = torch.arange(seq, device=device)[None, :]
    hidden = (j > i) if window is None else (j > i) | (i - j >= window)
    return torch.zeros(seq, seq, dtype=dtype, device=device).masked_fill(hidden, torch.finfo(dtype).min)[None, None]


class DecoderAdapter(Adapter):
    layout: DecoderLayout  # each family sets its own
    stream_bypasses = True  # DecoderLayout.install drops the pre-norm in front of a reads_stream bypass

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.config = model.config
        self.layers = model.model.layers
        self.originals = {s: self.layout.submodule(model, s.layer, s.kind) for s in self.submodules()}
        self.norms = {s: self.layout.norms(model, s.layer, s.kind) for s in self.submodules()}
        # A submodule is its module plus its norms: removing both of a layer removes the whole layer.
        self._sizes = {s: count(self.originals[s]) + sum(count(n) for n in self.norms[s] if n is not None)
                       for s in self.submodules()}
        self._layer_sizes = [count(layer) for layer in self.layers]
        rotary = model.model.rotary_emb
        self._typed_rotary = "layer_type" in inspect.signature(rotary.forward).parameters

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def attention_type(self, layer: int) -> str:
        """``full_attention`` or ``sliding_attention`` (the config's ``layer_types``; full when it has none)."""
        types = getattr(self.config, "layer_types", None)
        return types[layer] if types else FULL

    # --- surgery
    def module(self, sub: Submodule) -> nn.Module:
        return self.layout.submodule(self.model, sub.layer, sub.kind)

    def replace(self, sub: Submodule, module: nn.Module) -> None:
        pre, post = self.norms[sub]
        self.layout.set_module(self.model, sub.layer, sub.kind, self.originals[sub], pre, post)
        if isinstance(module, Bypass):
            self.layout.install(self.model, sub.layer, sub.kind, module)
        else:  # the original, or a module standing in with the original's call signature
            self.layout.set_module(self.model, sub.layer, sub.kind, module, pre, post)

    def finalize(self) -> None:
        try:
            self.layout.finalize(self.model)
        except ValueError as exc:
            raise SubFitError(f"selection: {exc}") from None

    # --- piecewise execution
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)

    def context(self, hidden: torch.Tensor) -> DecoderContext:
        batch, seq = hidden.shape[:2]
        positions = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(batch, -1)
        types = sorted({self.attention_type(layer) for layer in range(self.num_layers)})
        rotary = self.model.model.rotary_emb
        pe = {t: rotary(hidden, positions, t) if self._typed_rotary else rotary(hidden, positions) for t in types}
        window = getattr(self.config, "sliding_window", None)
        masks = {t: causal_mask(seq, window if t == SLIDING else None, hidden.dtype, hidden.device) for t in types}
        return DecoderContext(pe, masks)

    def bypass_input(self, sub: Submodule, hidden: torch.Tensor) -> torch.Tensor:
        pre = self.norms[sub][0]
        return hidden if pre is None else pre(hidden)

    def apply(self, sub: Submodule, module: nn.Module, x: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
        if isinstance(module, Bypass):
            return module(x)
        if sub.kind == "ffn":
            y = module(x)
        else:
            t = self.attention_type(sub.layer)
            y = module(hidden_states=x, position_embeddings=ctx.position_embeddings[t], attention_mask=ctx.masks[t])[0]
        post = self.norms[sub][1]
        return y if post is None else post(y)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.model.model.norm(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # --- what fitters may change
    def fold_output(self, sub: Submodule, module: nn.Module, t: torch.Tensor) -> nn.Module:
        if self.norms[sub][1] is not None:
            raise SubFitError(f"{sub}: its output passes a norm ({self.layout.slots[sub.kind][2]}) after its last linear "
                              f"in {type(self.model).__name__}, so a linear map cannot be folded into it")
        folded = copy.deepcopy(module)
        fold_linear(output_linear(folded, sub), t)
        return folded

    # --- accounting
    def param_count(self, sub: Submodule) -> int:
        return self._sizes[sub]

    def input_params(self, sub: Submodule) -> int:
        pre = self.norms[sub][0]
        return 0 if pre is None else count(pre)

    def layer_param_count(self, layer: int) -> int:
        return self._layer_sizes[layer]

    def ffn_width(self, layer: int) -> int:
        mlp = self.originals[Submodule(layer, "ffn")]
        return int(getattr(mlp, "intermediate_size", 0) or self.config.intermediate_size)

    def kv_bytes_per_token(self, kept: list[int]) -> int:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        itemsize = next(self.model.parameters()).element_size()
        return 2 * cfg.num_key_value_heads * head_dim * itemsize * len(kept)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def output_linear(module: nn.Module, sub: Submodule) -> nn.Linear:
    """The last linear of an attention (``o_proj``) or a dense FFN (``down_proj``)."""
    name = "o_proj" if sub.kind == "attn" else "down_proj"
    linear = getattr(module, name, None)
    if not isinstance(linear, nn.Linear):
        raise SubFitError(f"{sub}: {type(module).__name__} has no {name} linear to fold a map into")
    return linear


@torch.no_grad()
def fold_linear(linear: nn.Linear, t: torch.Tensor) -> None:
    """``linear``'s output becomes its old output times T (rows): W' = T^T W, b' = T^T b."""
    linear.weight.copy_((t.T @ linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((t.T @ linear.bias.double()).to(linear.bias.dtype))
