"""On-disk cache of dense calibration statistics, so an interrupted or repeated run resumes
after the most expensive pass. Keyed by everything the statistics depend on, including the
version of their layout; bounded in size (least recently used files go first)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.stats import SpilledStats, SubStats
from subfit_core.errors import SubFitError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Bump when what the statistics hold, or how they are computed, changes: old files then miss.
STATS_VERSION = 3  # 2: files carry a sha256 of their tensors; 3: plugins' statistics per submodule
DEFAULT_MAX_GB = 20.0


def cache_root() -> Path:
    return Path(os.environ.get("SUBFIT_CACHE", Path.home() / ".cache" / "subfit"))


def spill_root() -> Path:
    """Where statistics too big for memory wait during a run (deleted when the run ends)."""
    root = cache_root() / "spill"
    root.mkdir(parents=True, exist_ok=True)
    return root


def max_cache_bytes() -> int:
    """``SUBFIT_CACHE_MAX_GB`` (default 20): the statistics folder is kept under this size."""
    raw = os.environ.get("SUBFIT_CACHE_MAX_GB", str(DEFAULT_MAX_GB))
    try:
        gb = float(raw)
    except ValueError:
        raise SubFitError(f"SUBFIT_CACHE_MAX_GB: '{raw}' is not a number; give a size in GB (0 keeps only the newest)") from None
    return int(max(gb, 0.0) * 1e9)


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter's values in order, so the statistics, samples and evaluations of a model
    changed in place under the same name and config (retrained, converted again, rows permuted: sums
    would not see that) are never reused. One tensor at a time on the host; about 1 s per GB."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself, not a copy of its bytes
    return h.hexdigest()


def stats_key(model_spec: str, model: PreTrainedModel, dtype: str, calib_ids: torch.Tensor,
              statistics: Sequence[str] = (), weights: list | None = None) -> str:
    """``statistics``: what the plugins' statistics are (``Workbench.statistics_signature``);
    ``weights``: what identifies weights that are not in memory (default: a summary of the model's)."""
    h = hashlib.sha256()
    fingerprint = weights if weights is not None else weights_fingerprint(model)
    h.update(json.dumps([STATS_VERSION, model_spec, model.config.to_dict(), dtype, fingerprint,
                         sorted(statistics)],
                        sort_keys=True, default=str).encode())
    h.update(calib_ids.numpy().tobytes())
    return h.hexdigest()[:24]


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_stats(path: Path, stats: Mapping[Submodule, SubStats]) -> None:
    tensors = {f"{s.name}.{k}": v.contiguous() for s, st in stats.items() for k, v in st.state().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"sha256": digest(tensors)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    evict(path.parent, max_cache_bytes(), keep=path)


def evict(folder: Path, limit: int, keep: Path) -> list[Path]:
    """Delete the least recently used statistics entries (files, and the folders of streamed runs)
    until the folder holds at most ``limit`` bytes; ``keep`` (the entry just written) is never
    deleted. Returns what was deleted."""
    entries = []
    for f in folder.iterdir():
        if f.name.startswith("."):  # being written
            continue
        try:
            if f.is_dir():
                size = sum(p.stat().st_size for p in f.iterdir())
            elif f.suffix == ".safetensors":
                size = f.stat().st_size
            else:
                continue
            entries.append((f.stat().st_mtime, size, f))
        except FileNotFoundError:  # another process evicted it
            continue
    total = sum(size for _, size, _ in entries)
    gone = []
    for _, size, f in sorted(entries):
        if total <= limit:
            break
        if f == keep:
            continue
        try:
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        except FileNotFoundError:
            pass
        total -= size
        gone.append(f)
    return gone


def state_shapes(dim: int, widths: dict[str, int] | None) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in one submodule's saved statistics (``SubStats.state``)."""
    return {"gram": (dim + 1, dim + 1), "cross": (dim + 1, dim), "scalars": (2,),
            **{f"extra.{name}": (width,) for name, width in (widths or {}).items()}}


def load_spilled(folder: Path, subs: list[Submodule], dim: int, widths: dict[str, int] | None = None) -> SpilledStats | None:
    """The statistics a streamed run published at ``folder`` (one file per submodule, read when a
    fit asks; each checked against its sha256 then), or None to recompute them: missing, or (said
    in one line on stderr) incomplete, unreadable or of the wrong shapes."""
    if not folder.is_dir():
        return None
    shapes = state_shapes(dim, widths)
    try:
        stats = SpilledStats.open(folder, {s: s.name for s in subs}, shapes)
    except ValueError as exc:
        shutil.rmtree(folder, ignore_errors=True)  # so this run can publish a complete one in its place
        return _reject(folder, str(exc))
    try:
        os.utime(folder)  # used now: the last to be evicted
    except OSError:
        pass
    return stats


def publish_spilled(folder: Path, stats: SpilledStats) -> None:
    """Keep a streamed run's spilled statistics as the cache entry ``folder`` (bounded like the rest)."""
    if stats.publish(folder):
        evict(folder.parent, max_cache_bytes(), keep=folder)


def load_stats(path: Path, subs: list[Submodule], dim: int,
               widths: dict[str, int] | None = None) -> dict[Submodule, SubStats] | None:
    """The cached statistics of ``subs`` (hidden size ``dim``, with the registered statistics
    ``widths``: name -> numbers per submodule), or None to recompute them: missing, or (said in one
    line on stderr) unreadable, not matching their checksum, of the wrong shapes or not finite.
    Garbage never reaches a fit."""
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            expected = (f.metadata() or {}).get("sha256")
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is recomputed, not fatal
        return _reject(path, f"unreadable ({type(exc).__name__})")
    if expected != digest(tensors):
        return _reject(path, "its checksum does not match its contents" if expected else "it has no checksum")
    shapes = state_shapes(dim, widths)
    try:
        state = {s: {k: tensors[f"{s.name}.{k}"] for k in shapes} for s in subs}
    except KeyError as exc:
        return _reject(path, f"it lacks {exc.args[0]} (written for another model layout or other statistics)")
    for s, parts in state.items():
        for k, t in parts.items():
            if tuple(t.shape) != shapes[k] or t.dtype != torch.float64:
                return _reject(path, f"{s.name}.{k} has shape {tuple(t.shape)} {t.dtype}, expected {shapes[k]} float64")
            if not torch.isfinite(t).all():
                return _reject(path, f"{s.name}.{k} holds NaN or Inf")
    stats = {s: SubStats.from_state(s.name, parts) for s, parts in state.items()}
    try:
        os.utime(path)  # used now: the last to be evicted
    except OSError:  # a read-only shared cache is still usable
        pass
    return stats


def _reject(path: Path, why: str) -> Any:  # always None, typed for `return _reject(...)`
    print(f"statistics cache: {path} is not usable ({why}); recomputing", file=sys.stderr)
    return None
