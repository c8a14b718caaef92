"""Per-submodule statistics streamed over calibration tokens, accumulated in float64.

For a submodule with bypass input x (its normed input) and contribution y = f(x), on the residual
stream h: Gram G = [x,1]^T [x,1], cross-Gram H = [x,1]^T y, plus the quantities the local scores
need (rotation 1 - cos(h, h + y), magnitude ||y|| / ||h||). Activations are never stored.
"""

from __future__ import annotations

import torch

from .errors import NumericalError


class SubStats:
    def __init__(self, dim: int, name: str):
        self.name = name
        self.dim = dim
        self.tokens = 0
        self.gram = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)  # last row/col: the constant 1
        self.cross = torch.zeros(dim + 1, dim, dtype=torch.float64)
        self.y_sq = 0.0  # sum ||y||^2
        self.cos_sum = 0.0  # sum cos(h, h + y)
        self.mag_sum = 0.0  # sum ||y|| / ||h||

    def add(self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> None:
        # One batch's products are formed in float32 (twice the speed of float64 GEMM, error ~1e-6
        # relative over a batch) and added into the float64 accumulators, which carry the sum over
        # the whole calibration set and every solve.
        x = x.reshape(-1, self.dim).float()
        y = y.reshape(-1, self.dim).float()
        h = h.reshape(-1, self.dim).float()
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        self.gram += (xa.T @ xa).to("cpu", torch.float64)
        self.cross += (xa.T @ y).to("cpu", torch.float64)
        self.y_sq += float(y.double().square().sum())
        self.cos_sum += float(torch.nn.functional.cosine_similarity(h, h + y, dim=1).double().sum())
        self.mag_sum += float((y.norm(dim=1) / h.norm(dim=1).clamp_min(1e-12)).double().sum())
        self.tokens += x.shape[0]

    def check(self) -> None:
        if not (torch.isfinite(self.gram).all() and torch.isfinite(self.cross).all()):
            raise NumericalError(f"{self.name}: calibration statistics contain NaN/Inf (overflow in this submodule's activations?)")

    @property
    def rotation(self) -> float:
        return 1.0 - self.cos_sum / max(self.tokens, 1)

    @property
    def magnitude(self) -> float:
        return self.mag_sum / max(self.tokens, 1)

    def state(self) -> dict[str, torch.Tensor]:
        scalars = torch.tensor([self.tokens, self.y_sq, self.cos_sum, self.mag_sum], dtype=torch.float64)
        return {"gram": self.gram, "cross": self.cross, "scalars": scalars}

    @classmethod
    def from_state(cls, name: str, state: dict[str, torch.Tensor]) -> "SubStats":
        st = cls(state["cross"].shape[1], name)
        st.gram, st.cross = state["gram"], state["cross"]
        tokens, st.y_sq, st.cos_sum, st.mag_sum = state["scalars"].tolist()
        st.tokens = int(tokens)
        return st
