"""Where a Llama-family model keeps its attention and FFN, and how a bypass takes one's place.

Portable on purpose: it imports torch only, because it is copied verbatim into every saved
model's modeling file (the model then loads where SubFit is not installed). The adapter uses the
same functions, so the engine and a saved model do the surgery with one piece of code.
"""

from __future__ import annotations

from torch import nn


class AttentionBypass(nn.Module):
    """Stands where ``self_attn`` stood: same call signature, no KV cache, no token mixing."""

    def __init__(self, bypass: nn.Module):
        super().__init__()
        self.bypass = bypass

    def forward(self, hidden_states, *args, **kwargs):
        return self.bypass(hidden_states), None


def submodule(model: nn.Module, layer: int, kind: str) -> nn.Module:
    """The module computing (layer, kind): the original, or the bypass standing there."""
    block = model.model.layers[layer]
    current = block.self_attn if kind == "attn" else block.mlp
    return current.bypass if isinstance(current, AttentionBypass) else current


def norm_name(kind: str) -> str:
    return "input_layernorm" if kind == "attn" else "post_attention_layernorm"


def set_module(model: nn.Module, layer: int, kind: str, module: nn.Module, norm: nn.Module) -> None:
    """Put ``module`` (and its pre-norm ``norm``) at (layer, kind), as they are."""
    block = model.model.layers[layer]
    setattr(block, norm_name(kind), norm)
    setattr(block, "self_attn" if kind == "attn" else "mlp", module)


def install(model: nn.Module, layer: int, kind: str, bypass: nn.Module) -> None:
    """Put ``bypass`` at (layer, kind). One that reads no input (plain removal) takes the pre-norm
    with it: no weights saved, no compute."""
    block = model.model.layers[layer]
    norm = getattr(block, norm_name(kind)) if getattr(bypass, "reads_input", True) else nn.Identity()
    set_module(model, layer, kind, AttentionBypass(bypass) if kind == "attn" else bypass, norm)


def finalize(model: nn.Module) -> None:
    """Kept attentions take KV-cache slots 0..K-1, so the cache holds K layers and slot 0 is always a
    real attention: the cache's sequence length (read from slot 0) stays right even when layer 0's
    attention is removed."""
    kept = [b for b in model.model.layers if not isinstance(b.self_attn, AttentionBypass)]
    for slot, block in enumerate(kept):
        block.self_attn.layer_idx = slot
