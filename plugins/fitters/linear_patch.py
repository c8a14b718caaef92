"""LinearPatch (Chen et al., NeurIPS 2025): after deleting a window of whole layers, the residual
stream entering the cut is patched with one symmetric matrix P = H D H^T so that its per-channel
magnitudes match the stream the deleted layers would have produced.

H is an orthonormal Hadamard rotation (it spreads the massive outliers of a few tokens over all
channels, so one scale per channel fits every token) and D the channel-wise scaling in the rotated
basis, from the dense model's calibration activations: for the stream x entering the window and y
leaving it (x = input of the first deleted layer, y = input of the first kept one),
    D_c = mean over sequences of  mean_t |(y H)_{t,c}| / mean_t |(x H)_{t,c}|.
The patch is training-free and closed form; the paper's optional distillation of P is not run.

As in the paper's code, P is one d x d matrix multiply on the stream at the cut (d^2 parameters per
window, charged to the budget); it cannot be folded into a pre-norm model's weights, because the
stream feeds the residual sum as well as the next layer's norm. Here it is the bypass of the
window's last FFN, reading the stream itself (``reads_stream``): h + h (P - I) = h P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from subfit_core.engine.bypass import Bypass, ZeroBypass
from subfit_core.engine.interfaces import Fitted, Fitter, Submodule
from subfit_core.errors import ConfigError, NumericalError

from .hadamard import hadamard
from .windows import removed_windows


@dataclass
class LinearPatchParams:
    rotation: Literal["hadamard", "random", "none"] = "hadamard"  # none: channel scaling alone (the paper's ablation)
    seed: int = 0  # rotation: random (for widths with no Hadamard construction here)


class PatchBypass(Bypass):
    """h -> h P - h on the residual stream: the stream after it is h P (P = H D H^T, symmetric)."""

    kind = "patch"
    reads_stream = True

    def __init__(self, patch: torch.Tensor):
        super().__init__()
        self.patch = nn.Parameter(patch, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.patch - x

    def spec(self) -> dict:
        return {"kind": self.kind, "dim": self.patch.shape[0]}

    @classmethod
    def empty(cls, spec, dtype, shared):
        return cls(torch.zeros(spec["dim"], spec["dim"], dtype=dtype))


def rotation(dim: int, kind: str, seed: int) -> torch.Tensor:
    """The d x d orthonormal rotation H (float64)."""
    if kind == "none":
        return torch.eye(dim, dtype=torch.float64)
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))  # Haar-distributed
    h = hadamard(dim)
    if h is None:
        raise ConfigError(f"fitter.rotation: hadamard has no construction here for hidden size {dim} "
                          "(it needs 2^k times 1, 2, q + 1 or 2 (q + 1) for a prime q); use random or none")
    return h


class ChannelScales:
    """Sum over sequences of mean_t |y H| / mean_t |x H| per channel (float64), and the count."""

    def __init__(self, rot: torch.Tensor):
        self.rot = rot
        self.pending: dict[int, torch.Tensor] = {}  # batch -> mean_t |x H| (the stream itself is not kept)
        self.total = torch.zeros(rot.shape[0], dtype=torch.float64)
        self.sequences = 0

    def magnitudes(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, seq, d) -> (batch, d): mean over tokens of |h H|."""
        return (h.double() @ self.rot.to(h.device)).abs().mean(dim=1).cpu()

    def before(self, batch: int, x: torch.Tensor) -> None:
        self.pending[batch] = self.magnitudes(x)

    def after(self, batch: int, y: torch.Tensor) -> None:
        ratio = self.magnitudes(y) / self.pending.pop(batch).clamp_min(torch.finfo(torch.float64).tiny)
        self.total += ratio.sum(0)
        self.sequences += ratio.shape[0]

    def result(self, name: str) -> torch.Tensor:
        scales = self.total / max(self.sequences, 1)
        if not torch.isfinite(scales).all():
            raise NumericalError(f"{name}: LinearPatch channel scales have NaN/Inf (a channel of the stream is zero)")
        return scales


def patch_matrix(rot: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """P = H diag(D) H^T."""
    return (rot * scales) @ rot.T


class LinearPatchFitter(Fitter):
    Params = LinearPatchParams
    description = "removed window of whole layers -> a Hadamard-rotated channel scaling of the stream at the cut (LinearPatch)"
    supports_anchored = False  # the patch is measured on the dense model
    fits_windows = True

    def fit(self, sub, stats):
        return ZeroBypass()  # while selecting, the window is judged as plain removal (the deletion method's own)

    def estimate_params(self, sub, dim):
        return dim * dim if sub.kind == "ffn" else 0  # a window ends at an FFN

    def charges(self, subs, dim):
        lasts = {Submodule(last, "ffn") for _, last in removed_windows(subs, "linear-patch")} if subs else set()
        return {s: dim * dim if s in lasts else 0 for s in subs}

    def fit_selection(self, selected, bench, anchored=False):
        if anchored:
            raise ConfigError("anchored: true is not supported by fitter linear-patch (it measures the dense model)")
        if not getattr(bench.adapter, "stream_bypasses", False):
            raise ConfigError(f"fitter.name: linear-patch patches the residual stream, which adapter "
                              f"{type(bench.adapter).__name__} cannot feed a bypass (stream_bypasses is false)")
        dim = bench.adapter.hidden_size
        rot = rotation(dim, self.params.rotation, self.params.seed)
        bypasses: dict[Submodule, Bypass] = {s: ZeroBypass() for s in selected}
        scales = {}
        for first, last in removed_windows(selected, "linear-patch"):
            name, head, tail = f"L{first}-L{last}", Submodule(first, "attn"), Submodule(last, "ffn")
            acc = ChannelScales(rot)

            def visit(batch, sub, h, y, head=head, tail=tail, acc=acc):
                if sub == head:
                    acc.before(batch, h)
                elif sub == tail:
                    acc.after(batch, h + y)

            bench.calibration_trace(bench.position(tail) + 1, visit)
            d = acc.result(name)
            scales[name] = {"min": float(d.min()), "mean": float(d.mean()), "max": float(d.max())}
            bypasses[tail] = PatchBypass(patch_matrix(rot, d).to(bench.device, bench.dtype))
        return Fitted(bypasses, notes={"channel_scales": scales})
