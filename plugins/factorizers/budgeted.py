"""What the built-in factorizers share: a budget given as the kept share of the linear weights
(optionally split with submodule removal: the hybrid), uniform or adaptive ranks, and optional
block refinement of each decoder layer's factors."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from subfit_core.engine.interfaces import Factorizer
from subfit_core.engine.lowrank import allocate_ranks, uniform_rank


@dataclass
class FactorizerParams:
    """Recipe section ``factorizer``."""

    kept_ratio: float = 0.8  # total budget: share of the decoder's linear-layer weights kept
    removal_share: float = 0.0  # share of the removed parameters taken by submodule removal (hybrid)
    ranks: Literal["uniform", "adaptive"] = "uniform"
    refine_steps: int = 0  # AdamW steps per decoder layer (0: no block refinement)
    refine_lr: float = 1e-4
    refine_batch: int = 2  # windows per refinement step

    def __post_init__(self):
        if not 0.0 < self.kept_ratio < 1.0:
            raise ValueError(f"kept_ratio: {self.kept_ratio} must be in (0, 1)")
        if not 0.0 <= self.removal_share < 1.0:
            raise ValueError(f"removal_share: {self.removal_share} must be in [0, 1)")
        if self.refine_steps < 0 or self.refine_batch < 1 or self.refine_lr <= 0:
            raise ValueError("refine_steps must be >= 0, refine_batch >= 1 and refine_lr > 0")


class BudgetedFactorizer(Factorizer):
    Params = FactorizerParams

    def spectrum(self, name: str, weight: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
        """Singular values whose dropped squares measure the truncation loss (for adaptive ranks)."""
        raise NotImplementedError

    def budget(self, linear_params, decoder_params):
        # keeping kept_ratio of the linear weights removes (1 - kept_ratio) of them; removal takes
        # removal_share of that total first
        total = (1.0 - self.params.kept_ratio) * linear_params / decoder_params
        return total, self.params.removal_share * total

    def ranks(self, stage, kept_ratio):
        shapes = stage.shapes()
        if self.params.ranks == "uniform":
            return {site: uniform_rank(kept_ratio, m, n) for site, (m, n) in shapes.items()}
        spectra = {}
        if self.statistics == "none":
            for site, lin in stage.linears():
                spectra[site] = self.spectrum(site.name, stage.read(lin.weight), None)
        else:  # a dense pre-pass: each layer's Gram gives its spectra, then is dropped
            stage.dense_pass(lambda site, lin, st: spectra.__setitem__(site, self.spectrum(site.name, stage.read(lin.weight), st.gram)))
        return allocate_ranks(spectra, shapes, kept_ratio)

    def refines(self):
        return self.params.refine_steps > 0

    def refine_layer(self, stage, layer, params, inputs, targets, outputs):
        return refine_layer(stage, layer, params, inputs, targets, outputs, self.params)


def refine_layer(stage, layer: int, params: list, inputs: list, targets: list, outputs: list,
                 p: FactorizerParams) -> tuple[list, dict]:
    """Block refinement: AdamW on this layer's factors, MSE between the compressed layer on the
    compressed stream and the dense layer's output. Keeps the result only if it lowers the loss on
    all windows. The optimizer steps float32 copies of the factors: in bf16 a step of lr x ~1 is
    below the weights' rounding and is lost, and in fp16 AdamW's eps rounds to 0."""
    t0 = time.perf_counter()

    def mse(outs):
        return sum(float(F.mse_loss(o.float(), t.float(), reduction="sum")) for o, t in zip(outs, targets))

    before = mse(outputs)
    saved = [q.detach().clone() for q in params]
    chunks = [(x, t) for xs, ts in zip(inputs, targets) for x, t in zip(xs.split(p.refine_batch), ts.split(p.refine_batch))]
    model_params = list(stage.bench.model.parameters())
    grad_flags = [q.requires_grad for q in model_params]
    for q in model_params:
        q.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    masters = [q.detach().float().clone() for q in params]
    opt = torch.optim.AdamW(masters, lr=p.refine_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / p.refine_steps)))
    contexts: dict = {}
    try:
        with torch.enable_grad():
            for step in range(p.refine_steps):
                x, t = chunks[step % len(chunks)]
                key = tuple(x.shape[:2])
                if key not in contexts:  # built outside inference mode, so autograd can use it
                    with torch.no_grad():
                        contexts[key] = stage.adapter.context(x)
                loss = F.mse_loss(stage.layer_forward(layer, x, contexts[key]).float(), t.float())
                loss.backward()
                for master, q in zip(masters, params):
                    master.grad, q.grad = (None if q.grad is None else q.grad.float()), None
                torch.nn.utils.clip_grad_norm_(masters, 1.0)
                opt.step()
                schedule.step()
                with torch.no_grad():
                    for q, master in zip(params, masters):
                        q.copy_(master)
    finally:
        for q in params:
            q.requires_grad_(False)
            q.grad = None
        for q, flag in zip(model_params, grad_flags):
            q.requires_grad_(flag)
    with torch.no_grad():
        refined = [stage.layer_forward(layer, x) for x in inputs]
        after = mse(refined)
        kept = after < before
        if not kept:
            for q, old in zip(params, saved):
                q.copy_(old)
    tokens = sum(t.shape[0] * t.shape[1] for t in targets)
    record = {"mse_before": before / tokens, "mse_after": after / tokens, "kept": kept, "steps": p.refine_steps,
              "seconds": time.perf_counter() - t0}
    return (refined if kept else outputs), record
