"""Adapter for the Llama family (Llama, Mistral, Qwen2, Qwen3) and Phi-3/Phi-4: pre-norm decoder
layers with ``input_layernorm -> self_attn`` and ``post_attention_layernorm -> mlp`` on the residual
stream. Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` are plain linears to the engine."""

from __future__ import annotations

from .decoder import DecoderAdapter
from .decoder_layout import DecoderLayout

PRE_NORM = DecoderLayout(attn=("input_layernorm", "self_attn", None), ffn=("post_attention_layernorm", "mlp", None))


class LlamaFamilyAdapter(DecoderAdapter):
    name = "llama-family"
    layout = PRE_NORM
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class Phi3Adapter(DecoderAdapter):
    name = "phi3"
    layout = PRE_NORM
    architectures = ("Phi3ForCausalLM",)
