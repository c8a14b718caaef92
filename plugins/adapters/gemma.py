"""Adapters for Gemma 2 / Gemma 3 and OLMo 2, whose submodules normalise their own output.

Gemma ("sandwich" norms): ``input_layernorm -> self_attn -> post_attention_layernorm`` and
``pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm``; embeddings scaled by sqrt(d)
inside ``embed_tokens``; sliding-window and global attentions interleaved (``config.layer_types``);
Gemma 2's logits soft-capped. OLMo 2: no pre-norms, ``self_attn -> post_attention_layernorm`` and
``mlp -> post_feedforward_layernorm``. A bypass stands for the module and its post-norm together.
"""

from __future__ import annotations

from .decoder import DecoderAdapter
from .decoder_layout import DecoderLayout


class GemmaAdapter(DecoderAdapter):
    name = "gemma"
    layout = DecoderLayout(attn=("input_layernorm", "self_attn", "post_attention_layernorm"),
                           ffn=("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"))
    architectures = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


class Olmo2Adapter(DecoderAdapter):
    name = "olmo2"
    layout = DecoderLayout(attn=(None, "self_attn", "post_attention_layernorm"),
                           ffn=(None, "mlp", "post_feedforward_layernorm"))
    architectures = ("Olmo2ForCausalLM",)
