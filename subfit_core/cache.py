"""On-disk cache of dense calibration statistics, so an interrupted or repeated run resumes
after the most expensive pass. Keyed by everything the statistics depend on, including the
version of their layout; bounded in size (least recently used files go first)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import SubFitError
from .interfaces import Submodule
from .stats import SubStats


# Bump when what the statistics hold, or how they are computed, changes: old files then miss.
STATS_VERSION = 1
DEFAULT_MAX_GB = 20.0


def cache_root() -> Path:
    return Path(os.environ.get("SUBFIT_CACHE", Path.home() / ".cache" / "subfit"))


def max_cache_bytes() -> int:
    """``SUBFIT_CACHE_MAX_GB`` (default 20): the statistics folder is kept under this size."""
    raw = os.environ.get("SUBFIT_CACHE_MAX_GB", str(DEFAULT_MAX_GB))
    try:
        gb = float(raw)
    except ValueError:
        raise SubFitError(f"SUBFIT_CACHE_MAX_GB: '{raw}' is not a number; give a size in GB (0 keeps only the newest)") from None
    return int(max(gb, 0.0) * 1e9)


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> list[float]:
    """Cheap summary of the weights (a sum and an absolute sum per tensor), so statistics of a model
    retrained in place under the same name and config are not reused."""
    return [round(float(v), 6) for p in model.parameters()
            for v in (p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, 1, dtype=torch.float64))]


def stats_key(model_spec: str, model: torch.nn.Module, dtype: str, calib_ids: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([STATS_VERSION, model_spec, model.config.to_dict(), dtype, weights_fingerprint(model)],
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
    evict(path.parent, max_cache_bytes(), keep=path)


def evict(folder: Path, limit: int, keep: Path) -> list[Path]:
    """Delete the least recently used statistics files until the folder holds at most ``limit``
    bytes; ``keep`` (the file just written) is never deleted. Returns what was deleted."""
    files = []
    for f in folder.glob("*.safetensors"):
        try:
            st = f.stat()
        except FileNotFoundError:  # another process evicted it
            continue
        files.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in files)
    gone = []
    for _, size, f in sorted(files):
        if total <= limit:
            break
        if f == keep:
            continue
        try:
            f.unlink()
        except FileNotFoundError:
            pass
        total -= size
        gone.append(f)
    return gone


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
    try:
        os.utime(path)  # used now: the last to be evicted
    except OSError:  # a read-only shared cache is still usable
        pass
    return stats, tensors["layer_cos"].tolist()
