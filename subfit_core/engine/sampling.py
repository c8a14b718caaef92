"""Calibration text sampled from the dense model itself.

A user's calibration corpus covers one domain; a bypass fitted and a selection judged on it alone
learn that domain (measured in docs/guide.md, "Generalisation"). Windows sampled from the dense
model at temperature 1 follow the model's own distribution, which spans what it was trained on, so
mixing them into the calibration and scoring sets keeps fits and choices honest on other text.
Sampling is seeded and cached next to the statistics, keyed by the model's weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from subfit_core.engine.cache import weights_fingerprint
from subfit_core.progress import progress

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SAMPLES_VERSION = 1


def start_token(tokenizer, fallback: int) -> int:
    """The token a document starts with: the tokenizer's BOS, else its EOS (a document separator), else
    ``fallback`` (a token of the calibration text) for a tokenizer that has neither."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return int(fallback)


def samples_key(model: PreTrainedModel, start: int, count: int, seq_len: int, seed: int, batch_size: int,
                weights: list | None = None) -> str:
    """``batch_size``: the text sampled depends on it (the random draws are taken batch by batch);
    ``weights``: what identifies weights that are not in memory (streamed: their files; default: a
    summary of the model's, which a streamed model's meta parameters do not have)."""
    fingerprint = weights if weights is not None else weights_fingerprint(model)
    h = hashlib.sha256(json.dumps([SAMPLES_VERSION, model.config.to_dict(), fingerprint,
                                   start, count, seq_len, seed, batch_size], sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


@torch.inference_mode()
def sample_windows(model: PreTrainedModel, start: int, count: int, seq_len: int, seed: int, batch_size: int,
                   device: torch.device, cache: Path | None = None, weights: list | None = None) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens: ``start``, then pure samples (temperature 1, no top-k /
    top-p truncation) from ``model``. Read from ``cache`` (a folder) when there; ``weights`` as in
    ``samples_key``."""
    path = (cache / f"{samples_key(model, start, count, seq_len, seed, batch_size, weights)}.safetensors"
            if cache is not None else None)
    if path is not None and path.exists():
        ids = load_file(path).get("ids")
        if ids is not None and tuple(ids.shape) == (count, seq_len):
            return ids
    from transformers import GenerationConfig

    out = []
    # pure samples: generate would fill what the call leaves unset from the model's own generation_config
    # (a repetition penalty, suppressed tokens, ...), which the key does not cover; a blank one stands in
    own, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            batches = [min(batch_size, count - i) for i in range(0, count, batch_size)]
            for n in progress(batches, desc="sampling calibration text"):
                prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
                # causal LMs get generate from GenerationMixin, which PreTrainedModel's annotations do not include
                ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,  # type: ignore[operator]
                                     temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=seq_len - 1,
                                     max_new_tokens=seq_len - 1, pad_token_id=start, eos_token_id=None)
                out.append(ids[:, :seq_len].cpu())
    finally:
        model.generation_config = own
    ids = torch.cat(out)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"ids": ids.contiguous()}, str(tmp))
        tmp.replace(path)
    return ids
