"""Resuming a streamed statistics pass that was killed part way.

A streamed model's dense pass is the long step of a big run (hours for a 70B model on a CPU). Its
statistics are spilled one file per submodule anyway; here they go to ``.<key>.partial`` next to
the cache entry ``<key>`` instead of a temporary folder, and at a layer boundary, at most every
``SUBFIT_CHECKPOINT_SECONDS`` (default 300), the residual stream of every calibration batch is
written there too, then ``progress.json`` naming the submodules done (written last, renamed into
place: a checkpoint is whole or absent). The next run with the same key continues from the last
checkpoint; a finished pass is published as the cache entry (``SpilledStats.publish``).

One run holds the folder at a time (an advisory lock on ``.<key>.lock``); a second run with the
same key spills to a private temporary folder instead, as before.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import torch

from subfit_core.engine.stats import SpilledStats
from subfit_core.errors import SubFitError

PROGRESS, STREAM = "progress.json", "stream.safetensors"


def interval_seconds() -> float:
    raw = os.environ.get("SUBFIT_CHECKPOINT_SECONDS", "300")
    try:
        return max(float(raw), 0.0)
    except ValueError:
        raise SubFitError(f"SUBFIT_CHECKPOINT_SECONDS: '{raw}' is not a number; give seconds between checkpoints "
                          "of a streamed statistics pass (0: at every layer)") from None


class PassCheckpoint:
    def __init__(self, folder: Path, lock):
        self.folder, self._lock = folder, lock
        self.interval = interval_seconds()
        self._last = time.monotonic()

    @classmethod
    def claim(cls, cache: Path) -> PassCheckpoint | None:
        """The resumable folder of the cache entry ``cache``, locked for this run (None: another
        run holds it)."""
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = open(cache.parent / f".{cache.name}.lock", "a")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return None
        folder = cache.parent / f".{cache.name}.partial"
        folder.mkdir(exist_ok=True)
        return cls(folder, lock)

    def store(self) -> SpilledStats:
        """Where the pass spills each submodule's statistics (kept if the run dies)."""
        return SpilledStats(self.folder, temporary=False)

    def resume(self, subs: list, shapes: dict) -> tuple[SpilledStats, int, list[torch.Tensor]] | None:
        """(the statistics done, how many of ``subs`` (in pass order) that is, the stream after them
        per batch) from the last checkpoint, or None to start over (none, or not of this pass: then
        the folder is cleared)."""
        try:
            progress = json.loads((self.folder / PROGRESS).read_text())
        except (OSError, ValueError):
            self.clear()
            return None
        done = progress.get("done", [])
        if progress.get("format") != 1 or done != [s.name for s in subs[:len(done)]]:
            self.clear()
            return None
        try:
            stats = SpilledStats.open(self.folder, {s: s.name for s in subs[:len(done)]}, shapes)
            from subfit_core.engine.streaming import ShardReader

            reader = ShardReader(self.folder / STREAM)
            stream = [reader.get_tensor(f"b{j}") for j in range(progress["batches"])]
        except (ValueError, OSError, KeyError, SubFitError):
            self.clear()
            return None
        return stats, len(done), stream

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval

    def save(self, done: list[str], stream: list[torch.Tensor]) -> None:
        """A checkpoint after the submodules ``done`` (their statistics already spilled here)."""
        from subfit_core.engine.streaming import write_safetensors

        (self.folder / PROGRESS).unlink(missing_ok=True)  # the old checkpoint ends before its stream is overwritten
        tmp = self.folder / f".{STREAM}"
        write_safetensors(tmp, {f"b{j}": h.cpu() for j, h in enumerate(stream)})
        os.replace(tmp, self.folder / STREAM)
        (self.folder / SpilledStats.INDEX).write_text(json.dumps({"format": 1, "files": done}))
        progress = self.folder / f".{PROGRESS}"
        progress.write_text(json.dumps({"format": 1, "done": done, "batches": len(stream)}))
        os.replace(progress, self.folder / PROGRESS)
        self._last = time.monotonic()

    def finish(self) -> None:
        """The pass is complete: drop the checkpoint (the statistics files stay, to be published)."""
        for name in (PROGRESS, STREAM):
            (self.folder / name).unlink(missing_ok=True)

    def clear(self) -> None:
        """Start over: nothing of an earlier pass is kept."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir()

    def release(self) -> None:
        if self.folder.exists() and not any(self.folder.iterdir()):
            self.folder.rmdir()
        self._lock.close()
