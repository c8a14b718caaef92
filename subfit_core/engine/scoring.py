"""The scoring set: the residual stream of the small scoring-window set cached at every submodule
boundary, for the dense model and for the model as it is being compressed, and the metrics that
judge a candidate's final residual stream against the dense model.

Next-token distributions are judged at every ``stride``-th position (the hidden states of all
positions are still computed). A registered metric sums its value over those positions from the
candidate's logits z and lse = logsumexp(z), and, if it asks, the dense distribution p with
sum p log p per window (computed once and kept when small enough).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from subfit_core.engine.interfaces import Metric
from subfit_core.engine.piecewise import Piecewise
from subfit_core.errors import ConfigError
from subfit_core.plugins import build_component, require

_MAX_CACHED_REFERENCE_BYTES = 2 * 1024**3


class ScoringSet:
    def __init__(self, piecewise: Piecewise, ids: torch.Tensor, stride: int, plugins):
        self.piecewise, self.ids, self.stride, self.plugins = piecewise, ids, stride, plugins
        self.states: list[list[torch.Tensor]] = []  # [boundary][batch], the model as it stands
        self.dense_states: list[list[torch.Tensor]] = []
        self._dense_refs: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (p, sum p log p) per batch
        self._metrics: dict[str, Metric] = {}
        self.limit: int | None = None  # judge on the first ``limit`` windows only (``subset``)
        self.evaluations = 0  # evaluations run (for cost reports)

    @torch.inference_mode()
    def prepare(self, vocab_size: int) -> None:
        """The dense model's boundary states (and, when small enough, its next-token distributions)."""
        pw = self.piecewise
        with pw.one_pass():
            self.states = [[pw.adapter.embed(b) for b in pw.batches(self.ids)]] + [[]] * len(pw.subs)
        final = pw.run(0, self.states[0], visit=self.keep)
        self.dense_states = list(self.states)
        if self.ids.numel() // self.stride * vocab_size * 4 <= _MAX_CACHED_REFERENCE_BYTES:
            with pw.one_pass():
                self._dense_refs = [self._reference(h) for h in final]

    def keep(self, index: int, hs: list[torch.Tensor]) -> None:
        """Record ``hs`` as the current stream at boundary ``index`` (a ``Piecewise.run`` visitor)."""
        self.states[index] = hs

    def reset(self) -> None:
        """The cached boundaries of the dense model again."""
        if self.states:
            self.states = list(self.dense_states)

    @contextmanager
    def subset(self, windows: int | None):
        """Judge on the first ``windows`` scoring windows only (None: all of them), e.g. for an
        iterative method whose recipe asks for a smaller scoring set. Commits still refresh every
        window's boundary states."""
        available = self.ids.shape[0]
        if windows is not None and not 1 <= windows <= available:
            raise ConfigError(f"selector.scoring_samples: {windows} windows requested, allowed 1..{available} "
                              "(scoring.samples)")
        previous, self.limit = self.limit, windows
        try:
            yield self
        finally:
            self.limit = previous

    def judged(self) -> str:
        """Which positions are judged (for journal keys)."""
        return f"{self.limit}|{self.stride}"

    def _take(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.limit is None:
            return hs
        out, left = [], self.limit
        for h in hs:
            if left <= 0:
                break
            out.append(h[:left])
            left -= h.shape[0]
        return out

    def boundary(self, index: int) -> list[torch.Tensor]:
        """The current model's stream in front of submodule ``index`` (``len(subs)``: after the last)."""
        return self._take(self.states[index])

    def dense_boundary(self, index: int) -> list[torch.Tensor]:
        """Like ``boundary``, for the dense model."""
        return self._take(self.dense_states[index])

    # ------------------------------------------------------------------ metrics
    def _positions(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, :-1][:, :: self.stride]

    def _reference(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense next-token distribution p and, per window, sum p log p."""
        logp = F.log_softmax(self.piecewise.adapter.logits(self._positions(h)).float(), dim=-1)
        p = logp.exp()
        return p, (p * logp).flatten(1).sum(1)

    def metric(self, name: str) -> Metric:
        if name not in self._metrics:
            require(self.plugins, "metric", name, "metric")
            self._metrics[name] = build_component(self.plugins, "metric", {"name": name}, "metric")
        return self._metrics[name]

    @torch.inference_mode()
    def evaluate(self, finals: list[torch.Tensor], name: str) -> float:
        """Metric ``name`` of the final residual streams ``finals`` (one per batch), per judged position."""
        metric = self.metric(name)
        self.evaluations += 1
        total, count = 0.0, 0
        with self.piecewise.one_pass():  # the head's weights, once for every batch
            for j, (h, ids) in enumerate(zip(finals, self.piecewise.batches(self.ids))):
                value, positions = self._batch(metric, j, h, ids)
                total += value
                count += positions
        return total / count

    def _batch(self, metric: Metric, j: int, h: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
        """(the metric summed over batch ``j``'s judged positions, how many there are)."""
        n = h.shape[0]  # a ``subset`` may cut the last batch short
        z = self.piecewise.adapter.logits(self._positions(h)).float()
        lse = torch.logsumexp(z, dim=-1)
        labels = ids[:n, 1:][:, :: self.stride]
        reference = None
        if metric.needs_reference:
            p, neg_entropy = self._dense_refs[j] if self._dense_refs else self._reference(self.dense_states[-1][j])
            reference = (p[:n], neg_entropy[:n])
        return float(metric.total(z, lse, labels, reference)), lse.numel()
