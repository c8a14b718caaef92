"""The evaluation journal: every scoring evaluation's result appended to a JSON-lines file and
answered from it when asked again, so a run killed during selection resumes where it stopped (the
selector makes the same choices again, fits being deterministic, and finds each evaluation it had
finished). A key hashes the metric, the scoring subset and the weights of every module the
evaluated model has replaced, so a fit that came out different is evaluated, never replayed wrongly.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

from torch import nn

from subfit_core.engine.cache import digest
from subfit_core.engine.interfaces import Submodule


class EvaluationJournal:
    def __init__(self):
        self.path: Path | None = None  # None: nothing is journaled
        self._recorded: dict[str, tuple[float, float]] = {}  # key -> (value, seconds)
        self._earlier: set[str] = set()  # keys recorded before this compression began, not yet asked for
        self._digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> weights digest
        self.replayed = 0  # evaluations answered from earlier work (an interrupted run, an earlier compression)
        self.replayed_seconds = 0.0  # what they took when they ran (compression time counts them)

    def open(self, path: Path) -> int:
        """Journal to ``path``, answering what it already holds; returns how many entries that is."""
        self.path, self._recorded = path, {}
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self._recorded[str(entry["key"])] = (float(entry["value"]), float(entry["seconds"]))
                except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                    continue
        self.begin()
        return len(self._recorded)

    def begin(self) -> None:
        """A compression starts: what is recorded so far is earlier work (an interrupted run's, or an
        earlier compression's in the same session), counted when it is answered."""
        self._earlier = set(self._recorded)

    def _digest(self, module: nn.Module) -> str:
        if module not in self._digests:  # its class and its weights (fitted modules never change)
            self._digests[module] = f"{type(module).__name__}:{digest(module.state_dict())}"
        return self._digests[module]

    def key(self, model: dict[Submodule, nn.Module], metric: str, judged: str) -> str | None:
        """The key of an evaluation of the model whose replaced submodules are ``model`` (the rest
        original), by ``metric`` on the scoring positions ``judged`` describes; None: not journaled."""
        if self.path is None:
            return None
        h = hashlib.sha256(f"{metric}|{judged}".encode())
        for sub in sorted(model):
            h.update(f"|{sub.name}:{self._digest(model[sub])}".encode())
        return h.hexdigest()

    def replay(self, key: str | None) -> float | None:
        """The recorded value of ``key``, or None. The first answer of an evaluation recorded before this
        compression began counts as replayed, with the seconds it took then; an answer to one this
        compression made itself counts nothing (no time was spent on it, now or before)."""
        if key is None or key not in self._recorded:
            return None
        value, seconds = self._recorded[key]
        if key in self._earlier:
            self._earlier.discard(key)
            self.replayed += 1
            self.replayed_seconds += seconds
        return value

    def record(self, key: str | None, value: float, seconds: float) -> None:
        if key is None or self.path is None:
            return
        self._recorded[key] = (value, seconds)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "value": value, "seconds": seconds}) + "\n")
