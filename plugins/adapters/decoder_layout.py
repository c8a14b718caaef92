"""Where a decoder layer keeps its attention and FFN, and how a bypass takes one's place.

Portable on purpose: it imports torch only, because it is copied verbatim into every saved
model's modeling file (the model then loads where SubFit is not installed), followed by
``LAYOUT = repr(layout)``. The adapters use the same object, so the engine and a saved model do
the surgery with one piece of code.

A decoder layer computes, for each of its submodules in turn,
``h = h + post_norm(module(pre_norm(h)))``, where either norm may be absent. A ``slot`` names the
three attributes of the layer: ``(pre_norm or None, module, post_norm or None)``. A bypass stands
for ``post_norm(module(.))``: it reads the pre-norm's output (or ``h`` itself when there is none)
and the post-norm goes with the module it normalised.
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


class DecoderLayout:
    """The slots of the attention (``attn``) and FFN (``ffn``) in ``model.<base>.layers[i]``."""

    def __init__(self, attn: tuple, ffn: tuple):
        self.slots = {"attn": tuple(attn), "ffn": tuple(ffn)}

    def __repr__(self) -> str:
        return f"DecoderLayout(attn={self.slots['attn']!r}, ffn={self.slots['ffn']!r})"

    @staticmethod
    def base(model: nn.Module) -> nn.Module:
        """The decoder under the language-model head (``model.model`` in transformers' causal LMs)."""
        return model.model

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return self.base(model).layers[layer]

    def submodule(self, model: nn.Module, layer: int, kind: str) -> nn.Module:
        """The module computing (layer, kind): the original, or the bypass standing there."""
        current = getattr(self.block(model, layer), self.slots[kind][1])
        return current.bypass if isinstance(current, AttentionBypass) else current

    def norms(self, model: nn.Module, layer: int, kind: str) -> tuple:
        """The (pre-norm, post-norm) modules at (layer, kind), None where the family has none."""
        block, (pre, _, post) = self.block(model, layer), self.slots[kind]
        return (getattr(block, pre) if pre else None, getattr(block, post) if post else None)

    def set_module(self, model: nn.Module, layer: int, kind: str, module: nn.Module, pre, post) -> None:
        """Put ``module`` and its norms ``pre``/``post`` at (layer, kind), as they are."""
        block, (pre_name, name, post_name) = self.block(model, layer), self.slots[kind]
        for attr, norm in ((pre_name, pre), (post_name, post)):
            if attr:
                setattr(block, attr, norm)
        setattr(block, name, module)

    def install(self, model: nn.Module, layer: int, kind: str, bypass: nn.Module) -> None:
        """Put ``bypass`` at (layer, kind); the post-norm goes (the bypass fits the normalised output).
        One that reads no input (plain removal) takes the pre-norm with it: no weights, no compute;
        so does one that reads the residual stream itself (``reads_stream``: a patch on the stream)."""
        pre, _ = self.norms(model, layer, kind)
        if pre is not None and (not getattr(bypass, "reads_input", True) or getattr(bypass, "reads_stream", False)):
            pre = nn.Identity()
        module = AttentionBypass(bypass) if kind == "attn" else bypass
        self.set_module(model, layer, kind, module, pre, nn.Identity())

    def finalize(self, model: nn.Module) -> None:
        """Give the kept attentions KV-cache slots of their own attention type, lowest first.

        The cache holds one slot per layer, typed by ``config.layer_types`` (full or sliding window);
        a removed attention's slot is never written and costs nothing. transformers reads the
        sequence length from slot 0 and the mask sizes from the first slot of each type, so those
        must belong to kept attentions: the k-th kept attention of a type takes the k-th slot of
        that type (with one type, slots 0..K-1)."""
        base = self.base(model)
        config = base.config
        n = len(base.layers)
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
        free = {t: [i for i in range(n) if types[i] == t] for t in set(types)}
        kept = 0
        for i, block in enumerate(base.layers):
            attn = getattr(block, self.slots["attn"][1])
            if not isinstance(attn, AttentionBypass):
                attn.layer_idx = free[types[i]].pop(0)
                kept += 1
        if kept and free[types[0]][:1] == [0]:  # with no attention left, no position is ever read
            raise ValueError(f"every {types[0]} attention is removed, but the KV cache reads the sequence length from "
                             f"its first slot (layer 0 is {types[0]}); keep at least one")
