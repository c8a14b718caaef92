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
def forward_seconds(model, windows: torch.Tensor, batch_size: int, device: torch.device,
                    batches: int | None = None) -> float:
    """Seconds of one plain forward pass over ``windows`` (the reference for compression cost).
    ``batches``: time only that many batches and scale to all windows (forward time is linear in
    them), so a large calibration set does not cost a whole extra pass to measure."""
    timed = windows if batches is None else windows[:batches * batch_size]
    _sync(device)
    start = time.perf_counter()
    for batch in progress(timed.split(batch_size), desc="dense forward (timing)"):
        model(input_ids=batch.to(device), use_cache=False)
    _sync(device)
    return (time.perf_counter() - start) * windows.shape[0] / max(timed.shape[0], 1)
