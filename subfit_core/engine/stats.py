"""Per-submodule statistics streamed over calibration tokens, accumulated in float64.

For a submodule with bypass input x (its normed input) and contribution y = f(x): Gram
G = [x,1]^T [x,1], cross-Gram H = [x,1]^T y and sum ||y||^2 (what every closed-form fit and its
residual need), plus ``extra``: the sums of the statistics plugins register (``subfit_statistics``),
accumulated in the same pass. Activations are never stored.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

import torch

from subfit_core.errors import NumericalError


class SubStats:
    def __init__(self, dim: int, name: str):
        self.name = name
        self.dim = dim
        self.tokens = 0
        self.gram = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)  # last row/col: the constant 1
        self.cross = torch.zeros(dim + 1, dim, dtype=torch.float64)
        self.y_sq = 0.0  # sum ||y||^2
        self.extra: dict[str, torch.Tensor] = {}  # statistic name -> float64 sums over the tokens

    def add(self, x: torch.Tensor, y: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> None:
        # One batch's products are formed in float32 (twice the speed of float64 GEMM, error ~1e-6
        # relative over a batch) and added into the float64 accumulators, which carry the sum over
        # the whole calibration set and every solve.
        x = x.reshape(-1, self.dim).float()
        y = y.reshape(-1, self.dim).float()
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        self.gram += (xa.T @ xa).cpu()  # float32 added into float64 in place: no float64 copy of the product
        self.cross += (xa.T @ y).cpu()
        self.y_sq += float(y.double().square().sum())
        for name, sums in (extra or {}).items():
            sums = sums.to("cpu", torch.float64).reshape(-1)
            self.extra[name] = self.extra[name] + sums if name in self.extra else sums
        self.tokens += x.shape[0]

    def check(self) -> None:
        tensors = [self.gram, self.cross, *self.extra.values()]
        if not all(torch.isfinite(t).all() for t in tensors):
            raise NumericalError(f"{self.name}: calibration statistics contain NaN/Inf (overflow in this submodule's activations?)")

    def to(self, device: torch.device) -> SubStats:
        """The same statistics on ``device`` (sharing the tensors already there): a fit runs its float64
        algebra where it is fast, which may not be where the sums were accumulated."""
        st = SubStats.__new__(SubStats)  # not __init__: its zero matrices would be allocated only to be replaced
        st.name, st.dim, st.tokens, st.y_sq = self.name, self.dim, self.tokens, self.y_sq
        st.gram, st.cross = self.gram.to(device), self.cross.to(device)
        st.extra = {name: sums.to(device) for name, sums in self.extra.items()}
        return st

    def state(self) -> dict[str, torch.Tensor]:
        scalars = torch.tensor([self.tokens, self.y_sq], dtype=torch.float64)
        return {"gram": self.gram, "cross": self.cross, "scalars": scalars,
                **{f"extra.{name}": sums for name, sums in self.extra.items()}}

    @classmethod
    def from_state(cls, name: str, state: dict[str, torch.Tensor]) -> SubStats:
        st = cls.__new__(cls)  # not __init__: its zero matrices would be allocated only to be replaced
        st.name, st.dim = name, state["cross"].shape[1]
        st.gram, st.cross = state["gram"], state["cross"]
        tokens, st.y_sq = state["scalars"].tolist()
        st.tokens = int(tokens)
        st.extra = {key.removeprefix("extra."): t for key, t in state.items() if key.startswith("extra.")}
        return st


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float, name: str = "?") -> torch.Tensor:
    """W = (G + lam tr(G)/d I)^-1 H for a Gram whose last row/column is the constant input."""
    d = gram.shape[0] - 1
    # d^2 float64 matrices dominate memory at real widths: one copy of G, regularised in place
    a = gram.clone()
    a.diagonal()[:d].add_(ridge * float(torch.trace(gram[:d, :d])) / max(d, 1))
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        del a
        w = torch.cholesky_solve(cross, chol)
    else:  # singular even after the ridge (e.g. a dead input): least squares still gives the minimum-norm fit
        # gelsd (SVD-based, right on rank-deficient input) exists only on the CPU; a rare path, so the copy is cheap
        w = torch.linalg.lstsq(a.cpu(), cross.cpu(), driver="gelsd").solution.to(a.device)
    if not torch.isfinite(w).all():
        raise NumericalError(f"{name}: ridge solve produced NaN/Inf (try a larger ridge)")
    return w


class StatsOn(Mapping):
    """A read-only view of per-submodule statistics that hands each one out on ``device`` (the
    mapping behind it may read them from disk one at a time; so does this view)."""

    def __init__(self, stats: Mapping, device: torch.device):
        self.stats, self.device = stats, device

    def __getitem__(self, key) -> SubStats:
        return self.stats[key].to(self.device)

    def __iter__(self) -> Iterator:
        return iter(self.stats)

    def __contains__(self, key) -> bool:  # without it, Mapping would copy (or read) the statistics to answer
        return key in self.stats

    def __len__(self) -> int:
        return len(self.stats)


class SpilledStats(MutableMapping):
    """Per-submodule statistics kept on disk, one safetensors file each, and read back one at a time
    when a fit or a scorer asks (the last ``keep`` stay in memory). For models whose Gram matrices,
    (d+1)^2 float64 per submodule, would not all fit: memory then holds O(1) of them, not O(depth).

    A run's spill is temporary (deleted with it) until ``publish`` makes it a statistics-cache entry,
    which ``SpilledStats.open`` reads back in a later run. Every file carries a sha256 of its
    tensors, checked whenever a cache entry's file is read: a damaged file is an error, never a fit."""

    INDEX = "index.json"

    def __init__(self, folder: Path, keep: int = 1, temporary: bool = True):
        self.folder, self.keep = folder, keep
        self.folder.mkdir(parents=True, exist_ok=True)
        self._names: dict = {}  # key -> its SubStats name (the file's stem)
        self._recent: OrderedDict = OrderedDict()  # key -> SubStats, most recent last
        self._verify = not temporary  # a cache entry may have been damaged since it was written
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(folder), True) if temporary else None

    def _file(self, key) -> Path:
        return self.folder / f"{self._names[key]}.safetensors"

    def __setitem__(self, key, stats: SubStats) -> None:
        self._names[key] = stats.name
        from subfit_core.engine.cache import digest
        from subfit_core.engine.streaming import write_safetensors

        state = stats.state()
        write_safetensors(self._file(key), state, {"sha256": digest(state)})
        self._recent.pop(key, None)  # written, not kept: the pass that wrote it holds the next one

    def _read(self, key, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        from subfit_core.engine.cache import digest
        from subfit_core.engine.streaming import ShardReader

        reader = ShardReader(self._file(key))
        tensors = {k: reader.get_tensor(k) for k in (names or [k for k in reader.header if k != "__metadata__"])}
        if self._verify and names is None:
            if (reader.header.get("__metadata__") or {}).get("sha256") != digest(tensors):
                raise NumericalError(f"{self._names[key]}: the cached statistics in {self._file(key)} do not match "
                                     f"their checksum (damaged since they were written); delete {self.folder} and run again")
            if not all(torch.isfinite(t).all() for t in tensors.values()):
                raise NumericalError(f"{self._names[key]}: the cached statistics in {self._file(key)} hold NaN or Inf; "
                                     f"delete {self.folder} and run again")
        return tensors

    def __getitem__(self, key) -> SubStats:
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        if key not in self._names:
            raise KeyError(key)
        while self._recent and len(self._recent) >= self.keep:  # make room before reading, not after
            self._recent.popitem(last=False)
        stats = SubStats.from_state(self._names[key], self._read(key))
        self._remember(key, stats)
        return stats

    def summary(self, key) -> tuple[dict[str, torch.Tensor], int]:
        """(the registered statistics' sums, tokens) of ``key`` without reading its Gram matrices."""
        from subfit_core.engine.streaming import ShardReader

        names = [k for k in ShardReader(self._file(key)).header if k.startswith("extra.")]
        tensors = self._read(key, ["scalars", *names])
        return {k.removeprefix("extra."): tensors[k] for k in names}, int(tensors["scalars"][0])

    def publish(self, target: Path) -> bool:
        """Make these statistics the cache entry ``target``: an index naming every file is written
        last, then the folder is renamed into place in one step, so a run killed while writing
        leaves nothing that looks complete. False (and they stay temporary) if another run
        published ``target`` first."""
        (self.folder / self.INDEX).write_text(json.dumps({"format": 1, "files": sorted(self._names.values())}))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.folder, target)  # fails if ``target`` exists: theirs stands
        except OSError:
            return False
        if self._cleanup is not None:
            self._cleanup.detach()
        self.folder = target  # this run wrote them: later runs, which open them, check each file
        return True

    def make_temporary(self) -> None:
        """Delete the folder with this object (statistics that will not be kept after all)."""
        if self._cleanup is None:
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    @classmethod
    def open(cls, folder: Path, names: dict, shapes: dict[str, tuple[int, ...]], keep: int = 1) -> SpilledStats:
        """The cache entry ``folder`` for ``names`` (key -> submodule name) whose files hold
        ``shapes`` (tensor -> shape, float64). Raises ValueError saying why it is not usable."""
        from subfit_core.engine.streaming import ShardReader

        try:
            index = json.loads((folder / cls.INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"no readable {cls.INDEX} ({type(exc).__name__})") from None
        if index.get("format") != 1 or not set(names.values()) <= set(index.get("files", [])):
            raise ValueError("it was written for another model layout")
        store = cls(folder, keep, temporary=False)
        for key, name in names.items():
            try:
                header = ShardReader(folder / f"{name}.safetensors").header
            except (OSError, ValueError) as exc:
                raise ValueError(f"{name}.safetensors is unreadable ({type(exc).__name__})") from None
            for tensor, shape in shapes.items():
                entry = header.get(tensor)
                if entry is None or tuple(entry["shape"]) != shape or entry["dtype"] != "F64":
                    raise ValueError(f"{name}.{tensor} is {entry and (entry['shape'], entry['dtype'])}, expected {shape} F64")
            store._names[key] = name
        return store

    def _remember(self, key, stats: SubStats) -> None:
        self._recent[key] = stats
        self._recent.move_to_end(key)
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)

    def __delitem__(self, key) -> None:
        self._file(key).unlink(missing_ok=True)
        self._recent.pop(key, None)
        del self._names[key]

    def __iter__(self) -> Iterator:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
