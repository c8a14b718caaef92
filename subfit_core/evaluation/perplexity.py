"""Measurements on whole models: held-out perplexity and forward-pass time."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from subfit_core.progress import progress


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int, device: torch.device, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over fixed-length windows, each scored independently."""
    nll, count = 0.0, 0
    for batch in progress(windows.split(batch_size), desc=desc):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


@torch.inference_mode()
def forward_seconds(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds of one plain forward pass over ``windows`` (the reference for compression cost)."""
    _sync(device)
    start = time.perf_counter()
    for batch in progress(windows.split(batch_size), desc="dense forward (timing)"):
        model(input_ids=batch.to(device), use_cache=False)
    _sync(device)
    return time.perf_counter() - start
