"""Batch sizes from free memory (``calib.batch_size: auto``, ``eval.batch_size: auto``).

A window's working memory in a forward pass is estimated from the model's shapes, counting what
one submodule call holds at its peak (the engine runs one submodule over a batch at a time) and
the float32 logits the metrics and perplexity form:

    residual stream, input, contribution, q/k/v/o    ~ 7 T d           (weights' dtype)
    FFN gate, up and their product                    ~ 3 T f           (weights' dtype)
    attention scores and probabilities                ~ 2 H T^2         (float32, eager worst case)
    float32 copies for the Gram products              ~ 3 T d           (float32)
    logits, log-softmax, one more temporary           ~ 3 T V           (float32)

for T tokens, hidden size d, FFN width f, H heads and vocabulary V. The batch is the number of
windows whose estimate fits in ``SHARE`` of the memory free after the model loaded (the rest is
for statistics, cached boundary states and the allocator), between 1 and ``MAX_AUTO``.
"""

from __future__ import annotations

from typing import Any

import torch

from subfit_core.engine.adapter import Adapter
from subfit_core.engine.streaming import available_memory

SHARE = 0.25
MAX_AUTO = 64  # beyond this a bigger batch buys no speed, and the cached states grow with it


def window_bytes(adapter: Adapter, seq_len: int, dtype: torch.dtype) -> int:
    """Estimated peak working memory of one window of ``seq_len`` tokens (see the module's docstring)."""
    config: Any = adapter.model.config
    d, t = adapter.hidden_size, seq_len
    try:
        f = max(adapter.ffn_width(layer) for layer in range(adapter.num_layers))
    except NotImplementedError:  # an adapter that does not say: the common 4x
        f = 4 * d
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    vocab = int(config.vocab_size)
    size = torch.finfo(dtype).bits // 8
    return (7 * t * d + 3 * t * f) * size + (2 * heads * t * t + 3 * t * d + 3 * t * vocab) * 4


def resolve_batch_size(value: int | str, adapter: Adapter, seq_len: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """``value`` itself, or for ``"auto"`` the windows per batch that fit in free memory now."""
    if value != "auto":
        return int(value)
    fits = int(available_memory(device) * SHARE) // max(window_bytes(adapter, seq_len, dtype), 1)
    return max(1, min(MAX_AUTO, fits))
