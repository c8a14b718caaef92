"""ReplaceMe (Shopkhoev et al., 2025): a removed window of whole layers becomes one linear map T
folded into the output projection of the FFN in front of it (the adapter's ``fold_output``), so
nothing is added to the model.

With X the MLP output of the last kept layer i (tokens as rows), h_i the residual stream after
that layer and h_{i+n} the stream after the window, the stream after the window is approximated
by the attention part of h_i plus the transformed MLP output:
    h_{i+n} ~ (h_i - X) + X T.
Least squares ("ls"):  T = (X^T X + a I)^-1 X^T Y  with  Y = h_{i+n} - h_i + X,  streamed as
float64 Gram matrices over the calibration windows (a = ridge * mean diagonal of X^T X).
Cosine ("cosine"):  minimise mean_t 1 - cos((h_i - X) + X T, h_{i+n}) with Adam, starting from
the least-squares T (``init: ls``) or from T = I (``init: identity``, i.e. from plain removal;
with few Adam steps that start stays close to removal).
Folding: X = a W^T for the MLP's last activation a, so X T = a (T^T W)^T and W_down' = T^T W_down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from subfit_core.engine.bypass import ZeroBypass
from subfit_core.engine.interfaces import Fitted, Fitter, Submodule
from subfit_core.errors import ConfigError, NumericalError
from subfit_core.progress import progress

from .windows import removed_windows, rows


@dataclass
class ReplaceMeParams:
    loss: Literal["ls", "cosine"] = "ls"
    ridge: float = 1e-4  # least squares: a = ridge * mean diagonal of X^T X
    init: Literal["ls", "identity"] = "ls"  # cosine: start from the least-squares map, or from T = I
    epochs: int = 10  # cosine: passes over the calibration tokens
    lr: float = 1e-4  # cosine: Adam learning rate
    batch_tokens: int = 1024  # cosine: tokens per Adam step


def solve_transform(gram: torch.Tensor, cross: torch.Tensor, ridge: float, name: str) -> torch.Tensor:
    """T = (G + a I)^-1 H in float64, a = ridge * mean diagonal of G."""
    d = gram.shape[0]
    a = gram + ridge * float(torch.trace(gram)) / d * torch.eye(d, dtype=gram.dtype)
    chol, info = torch.linalg.cholesky_ex(a)
    t = torch.cholesky_solve(cross, chol) if int(info) == 0 else torch.linalg.lstsq(a, cross, driver="gelsd").solution
    if not torch.isfinite(t).all():
        raise NumericalError(f"{name}: ReplaceMe transform has NaN/Inf (try a larger fitter.ridge)")
    return t


def fit_cosine(x: torch.Tensor, attn: torch.Tensor, target: torch.Tensor, p: ReplaceMeParams,
               name: str, start: torch.Tensor | None = None) -> torch.Tensor:
    """T minimising mean 1 - cos(attn + x T, target) (rows are tokens), Adam from ``start`` (default I)."""
    d = x.shape[1]
    t0 = torch.eye(d) if start is None else start
    t = t0.to(device=x.device, dtype=torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([t], lr=p.lr)
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for _ in progress(range(p.epochs), desc=f"{name} cosine fit"):
            for idx in torch.randperm(x.shape[0], generator=gen).split(p.batch_tokens):
                idx = idx.to(x.device)
                pred = attn[idx].float() + x[idx].float() @ t
                loss = (1 - F.cosine_similarity(pred, target[idx].float(), dim=-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    t = t.detach().double()
    if not torch.isfinite(t).all():
        raise NumericalError(f"{name}: ReplaceMe cosine fit diverged (try a smaller fitter.lr)")
    return t


class ReplaceMeFitter(Fitter):
    Params = ReplaceMeParams
    description = "removed window -> one linear map folded into the preceding FFN's output projection (ReplaceMe; ls or cosine)"
    supports_anchored = False  # fits on the dense model
    fits_windows = True

    def fit(self, sub, stats):
        return ZeroBypass()  # while selecting, the window is judged as plain removal

    def estimate_params(self, sub, dim):
        return 0

    def fit_selection(self, selected, bench, anchored=False):
        if anchored:
            raise ConfigError("anchored: true is not supported by fitter replaceme (it fits on the dense model)")
        windows = removed_windows(selected, "replaceme")
        if windows and windows[0][0] == 0:
            raise ConfigError("fitter.name: replaceme folds its map into the layer in front of the window, but the "
                              "window starts at layer 0; use selector.keep_first: true")
        edits = {}
        for first, last in windows:
            name = f"L{first}-L{last}"
            if self.params.loss == "ls":
                normal = NormalEquations(bench.adapter.hidden_size)
                normal.stream(bench, first, last)
                t = solve_transform(*normal.result(name), self.params.ridge, name)
            else:
                batches = []  # the cosine loss is not quadratic: its fit needs the rows themselves
                window_rows(bench, first, last, lambda *r: batches.append(r))
                x, h_i, h_out = (torch.cat(col) for col in zip(*batches))
                start = None
                if self.params.init == "ls":
                    normal = NormalEquations(bench.adapter.hidden_size)
                    for row in batches:
                        normal.add(*row)
                    start = solve_transform(*normal.result(name), self.params.ridge, name)
                t = fit_cosine(x, h_i - x, h_out, self.params, name, start)
            mlp = Submodule(first - 1, "ffn")
            with bench.loaded(bench.originals[mlp]) as original:  # the edited copy keeps its weights
                edits[mlp] = bench.adapter.fold_output(mlp, original, t.to(bench.device))
        return Fitted({s: ZeroBypass() for s in selected}, edits)


def window_rows(bench, first: int, last: int, each) -> None:
    """For each calibration batch, ``each(X, h_i, h_{i+n})`` with tokens as rows: X the MLP output of
    layer first-1, h_i the stream after that layer and h_{i+n} after layer ``last`` (dense model)."""
    before, after = Submodule(first - 1, "ffn"), Submodule(last, "ffn")
    state = {}

    def visit(batch, sub, h, y):
        if sub == before:
            state["x"], state["h_i"] = rows(y).float(), rows(h + y).float()
        elif sub == after:
            each(state["x"], state["h_i"], rows(h + y).float())

    bench.calibration_trace(bench.position(after) + 1, visit)


class NormalEquations:
    """X^T X and X^T Y, Y = h_{i+n} - h_i + X, accumulated batch by batch in float64."""

    def __init__(self, dim: int):
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)
        self.cross = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, x: torch.Tensor, h_i: torch.Tensor, h_out: torch.Tensor) -> None:
        xd = x.double().cpu()
        self.gram += xd.T @ xd
        self.cross += xd.T @ (h_out.double().cpu() - h_i.double().cpu() + xd)

    def stream(self, bench, first: int, last: int) -> None:
        window_rows(bench, first, last, self.add)

    def result(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not (torch.isfinite(self.gram).all() and torch.isfinite(self.cross).all()):
            raise NumericalError(f"{name}: calibration activations have NaN/Inf")
        return self.gram, self.cross
