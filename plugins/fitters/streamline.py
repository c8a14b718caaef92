"""LLM-Streamline (Chen et al., 2024): a removed window of whole layers becomes one lightweight
feed-forward network trained to reproduce the window's effect on the residual stream.

For a window of layers i..j with h_i the stream in front of it and h_{j+1} behind it, the
replacement stands at layer i's attention (reading its pre-norm input x = norm(h_i)) and is
trained with MSE:  min || (h_i + FFN(x)) - h_{j+1} ||^2  on the calibration windows, by AdamW,
starting from layer i's own FFN weights with the output projection zeroed, so training starts
from plain removal and only improves on it. Its parameters are charged to the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from subfit_core.engine.bypass import Bypass, ZeroBypass
from subfit_core.engine.interfaces import Fitted, Fitter, Submodule
from subfit_core.errors import ConfigError, NumericalError
from subfit_core.progress import progress

from .windows import removed_windows, rows


class MLPBypass(Bypass):
    """y = W_down (silu(W_gate x) * W_up x): a gated feed-forward network standing in for a whole
    removed window (LLM-Streamline's lightweight replacement), trained rather than solved."""

    kind = "mlp"

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate = nn.Parameter(gate, requires_grad=False)  # hidden x d
        self.up = nn.Parameter(up, requires_grad=False)  # hidden x d
        self.down = nn.Parameter(down, requires_grad=False)  # d x hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = nn.functional
        return f.linear(f.silu(f.linear(x, self.gate)) * f.linear(x, self.up), self.down)

    def spec(self) -> dict:
        return {"kind": self.kind, "dim": self.gate.shape[1], "hidden": self.gate.shape[0]}

    @classmethod
    def empty(cls, spec, dtype, shared):
        d, hidden = spec["dim"], spec["hidden"]
        return cls(torch.zeros(hidden, d, dtype=dtype), torch.zeros(hidden, d, dtype=dtype), torch.zeros(d, hidden, dtype=dtype))


@dataclass
class StreamlineParams:
    epochs: int = 10  # passes over the calibration tokens
    lr: float = 1e-3  # AdamW learning rate (cosine schedule)
    batch_tokens: int = 1024  # tokens per step
    weight_decay: float = 0.0


class GatedFFN(nn.Module):
    """Trainable twin of MLPBypass: y = W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate, self.up, self.down = (nn.Parameter(w.detach().clone().float()) for w in (gate, up, down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = nn.functional
        return f.linear(f.silu(f.linear(x, self.gate)) * f.linear(x, self.up), self.down)


def train_ffn(ffn: GatedFFN, x: torch.Tensor, target: torch.Tensor, p: StreamlineParams, name: str) -> float:
    """AdamW on MSE(ffn(x), target), rows are tokens; returns the final epoch's mean loss."""
    opt = torch.optim.AdamW(ffn.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    steps = p.epochs * -(-x.shape[0] // p.batch_tokens)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(0)
    last = float("nan")
    with torch.enable_grad():
        for _ in progress(range(p.epochs), desc=f"{name} training"):
            total, count = 0.0, 0
            for idx in torch.randperm(x.shape[0], generator=gen).split(p.batch_tokens):
                idx = idx.to(x.device)
                loss = nn.functional.mse_loss(ffn(x[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(ffn.parameters(), 1.0)
                opt.step()
                sched.step()
                total, count = total + float(loss.detach()) * len(idx), count + len(idx)
            last = total / count
    if last != last or last == float("inf"):
        raise NumericalError(f"{name}: LLM-Streamline training diverged (try a smaller fitter.lr)")
    return last


class StreamlineFitter(Fitter):
    Params = StreamlineParams
    description = "removed window -> one FFN trained on hidden-state MSE (LLM-Streamline)"
    supports_anchored = False  # fits on the dense model
    fits_windows = True

    hidden = 0

    def attach(self, adapter):
        self.hidden = adapter.ffn_width(0)

    def fit(self, sub, stats):
        return ZeroBypass()  # while selecting, the window is judged as plain removal

    def ffn_params(self, dim: int) -> int:
        return 3 * dim * self.hidden  # gate, up and down

    def estimate_params(self, sub, dim):
        return self.ffn_params(dim) if sub.kind == "attn" else 0  # windows start at an attention

    def charges(self, subs, dim):
        firsts = {Submodule(first, "attn") for first, _ in removed_windows(subs, "llm-streamline")} if subs else set()
        return {s: self.ffn_params(dim) if s in firsts else 0 for s in subs}

    def fit_selection(self, selected, bench, anchored=False):
        if anchored:
            raise ConfigError("anchored: true is not supported by fitter llm-streamline (it trains on the dense model)")
        bypasses, losses = {s: ZeroBypass() for s in selected}, {}
        for first, last in removed_windows(selected, "llm-streamline"):
            name, head, tail = f"L{first}-L{last}", Submodule(first, "attn"), Submodule(last, "ffn")
            xs, targets = [], []

            def visit(batch, sub, h, y):
                if sub == head:
                    xs.append(rows(bench.adapter.bypass_input(sub, h)).float())
                    targets.append(-rows(h).float())
                elif sub == tail:
                    targets[batch] += rows(h + y).float()  # h_{j+1} - h_i

            bench.calibration_trace(bench.position(tail) + 1, visit)
            with bench.loaded(bench.originals[Submodule(first, "ffn")]) as mlp:  # GatedFFN copies what it starts from
                ffn = GatedFFN(*initial_weights(mlp, bench.adapter.hidden_size, self.hidden)).to(bench.device)
            x, target = torch.cat(xs), torch.cat(targets)
            removal_mse = float(target.pow(2).mean())  # what plain removal leaves (the untrained start)
            losses[name] = {"removal_mse": removal_mse, "final_mse": train_ffn(ffn, x, target, self.params, name)}
            bypasses[head] = MLPBypass(*(w.detach().to(bench.dtype) for w in (ffn.gate, ffn.up, ffn.down)))
        return Fitted(bypasses, notes={"streamline_final_mse": losses})


def initial_weights(mlp: nn.Module, dim: int, hidden: int) -> tuple[torch.Tensor, ...]:
    """The first removed layer's gate and up projections (a small random init for other FFN shapes)
    and a zero output projection: the untrained replacement adds nothing, like plain removal (the
    layer's own FFN read through the attention's pre-norm would add a large wrong term instead)."""
    if hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
        gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    else:
        gen = torch.Generator().manual_seed(0)
        gate, up = (torch.randn(hidden, dim, generator=gen) / dim**0.5 for _ in range(2))
    return gate, up, torch.zeros(dim, hidden, dtype=gate.dtype, device=gate.device)
