"""On-disk cache of dense calibration statistics, so an interrupted or repeated run resumes
after the most expensive pass. Keyed by everything the statistics depend on."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .interfaces import Submodule
from .stats import SubStats


def cache_root() -> Path:
    return Path(os.environ.get("SUBFIT_CACHE", Path.home() / ".cache" / "subfit"))


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> list[float]:
    """Cheap summary of the weights (a sum and an absolute sum per tensor), so statistics of a model
    retrained in place under the same name and config are not reused."""
    return [round(float(v), 6) for p in model.parameters()
            for v in (p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, 1, dtype=torch.float64))]


def stats_key(model_spec: str, model: torch.nn.Module, dtype: str, calib_ids: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([model_spec, model.config.to_dict(), dtype, weights_fingerprint(model)],
                        sort_keys=True, default=str).encode())
    h.update(calib_ids.numpy().tobytes())
    return h.hexdigest()[:24]


def save_stats(path: Path, stats: dict[Submodule, SubStats], layer_cos: list[float]) -> None:
    tensors = {f"{s.name}.{k}": v.contiguous() for s, st in stats.items() for k, v in st.state().items()}
    tensors["layer_cos"] = torch.tensor(layer_cos, dtype=torch.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_stats(path: Path, subs: list[Submodule]) -> tuple[dict[Submodule, SubStats], list[float]] | None:
    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
    except Exception:  # noqa: BLE001 - a truncated or foreign file is recomputed, not fatal
        return None
    try:
        stats = {s: SubStats.from_state(s.name, {k: tensors[f"{s.name}.{k}"] for k in ("gram", "cross", "scalars")})
                 for s in subs}
    except KeyError:
        return None  # written for another model layout: recompute
    return stats, tensors["layer_cos"].tolist()
