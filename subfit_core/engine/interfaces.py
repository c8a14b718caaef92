"""The small protocols every plugin component implements.

A component class declares its recipe parameters as a ``Params`` dataclass; the engine validates the
recipe section against it (unknown key = error naming the nearest valid key) and passes the
instance to ``__init__``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from subfit_core.engine.bypass import Bypass
from subfit_core.errors import SubFitError
from subfit_core.progress import progress

if TYPE_CHECKING:
    import torch

    from subfit_core.engine.adapter import Adapter
    from subfit_core.engine.budget import Budget
    from subfit_core.engine.factorize import Factorization, LinearStats
    from subfit_core.engine.lowrank import Factors
    from subfit_core.engine.stats import SubStats
    from subfit_core.engine.workbench import Workbench


@dataclass(frozen=True, order=True)
class Submodule:
    """One removable submodule: the attention (``attn``) or feed-forward (``ffn``) of a layer."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"L{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name


@dataclass
class NoParams:
    pass


class Component:
    Params: ClassVar[type] = NoParams
    description: ClassVar[str] = ""

    def __init__(self, params: Any = None, plugins: Any = None):
        self.params = params if params is not None else self.Params()
        self.plugins = plugins


@dataclass
class Fitted:
    """What a fitter produced for a selection: a bypass per selected submodule, and ``edits``:
    modules that replace *kept* submodules (same structure and shapes as the original, e.g. a
    down-projection with a linear map folded in) to compensate for what was removed."""

    bypasses: dict[Submodule, Bypass]
    edits: dict[Submodule, nn.Module] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # for the report (e.g. a training loss)


class Fitter(Component):
    """Fits a bypass for a submodule from its statistics (closed form)."""

    # Checked when the recipe is validated, before any work:
    supports_anchored: ClassVar[bool] = True  # can refit on the compressed model's inputs (anchored: true)
    fits_windows: ClassVar[bool] = False  # fits removed windows of whole layers: needs a whole-layer selector

    def fit_selection(self, selected: list[Submodule], bench: Workbench, anchored: bool = False) -> Fitted:
        """Fit the final selection. By default each bypass is fitted on its own from the dense
        statistics (``anchored``: on the compressed model's inputs instead). Fitters that fit a
        removed window as a whole from activations (ReplaceMe, LLM-Streamline) override this."""
        self.prepare(selected, bench.fit_stats)
        if anchored:
            return Fitted(bench.refit_anchored(self, selected))
        return Fitted({s: self.fit(s, bench.fit_stats[s]).to(bench.device, bench.dtype)
                       for s in progress(selected, desc="fitting bypasses")})

    def attach(self, adapter: Adapter) -> None:
        """Called once before selection, for fitters whose bypass size depends on the model."""

    def prepare(self, subs: list[Submodule], stats: Mapping[Submodule, SubStats]) -> None:
        """Called once with the final selection before ``fit``; e.g. to build a shared basis."""

    def fit(self, sub: Submodule, stats: SubStats) -> Bypass:
        raise NotImplementedError

    def estimate_params(self, sub: Submodule, dim: int) -> int:
        """Parameters the bypass for ``sub`` will add, shared tensors amortised (used to rank candidates)."""
        raise NotImplementedError

    def charges(self, subs: list[Submodule], dim: int) -> dict[Submodule, int]:
        """Exact parameters each bypass adds if exactly ``subs`` are replaced; a tensor shared by
        several is charged once (to one of them). Selectors measure the budget with this."""
        return {s: self.estimate_params(s, dim) for s in subs}


class Statistic(Component):
    """A per-submodule quantity accumulated over the calibration tokens in the dense pass, next to
    the Gram matrices, for components that read more than a fit needs (``bench.statistic(name, sub)``).

    ``observe`` gets one batch: the residual stream ``h`` in front of the submodule, its
    contribution ``y`` and the stream ``layer_input`` in front of the submodule's layer (all
    batch x seq x d), and returns this batch's sums, ``width`` float64 numbers. ``value`` turns the
    sums over every token into the number components read (default: the mean over tokens)."""

    width: ClassVar[int] = 1

    def observe(self, sub: Submodule, h: torch.Tensor, y: torch.Tensor, layer_input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value(self, sums: torch.Tensor, tokens: int) -> float:
        return float(sums[0]) / max(tokens, 1)


class Metric(Component):
    """Judges a model on the scoring windows from its next-token logits; lower = closer to the dense
    model. ``total`` returns the metric summed over the judged positions (the engine averages):
    ``logits`` z (windows x positions x vocab, float32), ``lse`` = logsumexp(z), ``labels`` the next
    tokens, and, when ``needs_reference``, the dense model's distribution p and, per window,
    sum p log p."""

    needs_reference: ClassVar[bool] = True

    def total(self, logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
              reference: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        raise NotImplementedError


class Scorer(Component):
    """Scores candidates; lower = cheaper to replace. A scorer implements ``score`` (single
    submodules), or ``score_groups`` and sets ``scores_groups`` (then ``score`` comes free)."""

    scores_groups: ClassVar[bool] = False  # can score a group (a whole layer, a window) at once
    statistics: ClassVar[tuple[str, ...]] = ()  # registered statistics it reads (checked before any work)

    def score(self, candidates: list[Submodule], bench: Workbench, fitter: Fitter) -> dict[Submodule, float]:
        if not self.scores_groups:
            raise NotImplementedError
        return dict(zip(candidates, self.score_groups([(s,) for s in candidates], bench, fitter)))

    def score_groups(self, groups: list[tuple[Submodule, ...]], bench: Workbench, fitter: Fitter) -> list[float]:
        """Scores of replacing each group at once. By default only single-submodule groups, from ``score``."""
        if any(len(g) != 1 for g in groups):
            from subfit_core.errors import ConfigError

            raise ConfigError(f"scorer.name: {type(self).__name__} scores single submodules only, not the layers "
                              "or windows this selector asks for; use a scorer that scores groups")
        singles = self.score([g[0] for g in groups], bench, fitter)
        return [singles[g[0]] for g in groups]


@dataclass
class Replacement:
    sub: Submodule
    score: float | None = None


@dataclass
class Plan:
    """An ordered selection of submodules to replace, plus notes for the report. ``edits`` are
    modules a selector built for kept submodules while searching (LaCo's merged layers); they are
    applied with the bypasses."""

    replacements: list[Replacement] = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    edits: dict[Submodule, nn.Module] = field(default_factory=dict)
    # seconds of work the selector replayed from an earlier run of the session instead of redoing
    # it: counted in compression time, so the time is what a standalone run would take
    reused_seconds: float = 0.0

    @property
    def subs(self) -> list[Submodule]:
        return [r.sub for r in self.replacements]


class Selector(Component):
    """Chooses which submodules to replace within the budget."""

    def select(self, bench: Workbench, scorer: Scorer, fitter: Fitter, budget: Budget) -> Plan:
        raise NotImplementedError

    def needs_group_scores(self) -> bool:
        """Whether this selector asks the scorer for whole layers or windows (checked before any work)."""
        return False

    def selects_whole_layers(self) -> bool:
        """Whether every selection is made of whole layers (what window fitters need; checked before any work)."""
        return False


class Factorizer(Component):
    """Factors the linear layers left after removal into two low-rank matrices each (closed form).

    ``statistics``: what ``factor`` reads, streamed by the factorization stage: ``none`` (weights
    only), ``dense`` (G = X^T X of the dense model's inputs) or ``anchored`` (C = X_hat^T X_hat and
    M = X^T X_hat, X_hat from the partially compressed model). A factorizer also owns its budget
    (``budget``), its rank allocation (``ranks``) and any per-layer adjustment after the closed
    form (``refine_layer``, when ``refines()``).
    """

    statistics: ClassVar[str] = "none"

    def budget(self, linear_params: int, decoder_params: int) -> tuple[float, float]:
        """(total, removal): the run's whole budget as a share of decoder parameters, and the share
        of decoder parameters submodule removal takes before factorization (0: none)."""
        raise NotImplementedError

    def ranks(self, stage: Factorization, kept_ratio: float) -> dict:
        """A rank per site of ``stage`` (``stage.shapes()``; spectra through ``stage.linears()`` or
        ``stage.dense_pass``) keeping ``kept_ratio`` of the sites' weights. Read a linear's weight
        as ``stage.read(linear.weight)``: with streamed weights (``offload``) it is not in memory."""
        raise NotImplementedError

    def factor(self, name: str, weight: torch.Tensor, stats: LinearStats | None, rank: int) -> Factors:
        raise NotImplementedError

    def refines(self) -> bool:
        """Whether ``refine_layer`` changes anything (the stage then carries the compressed stream)."""
        return False

    def refine_layer(self, stage: Factorization, layer: int, params: list, inputs: list, targets: list,
                     outputs: list) -> tuple[list, dict]:
        """Adjust a finished layer's factors ``params`` given the layer's inputs on the compressed
        stream, the dense layer's outputs (``targets``) and its current outputs; returns the outputs
        after adjustment and a record for the report."""
        return outputs, {}


class Runner(Component):
    """Delivers a run other than as one compressed model (a recipe names it in ``runner.name``).

    ``run`` gets the opened session (model, windows, dense reference) and the output folder, already
    claimed (None when ``save`` is false), and returns what results.json holds; it may call
    ``compress`` with ``runner.name: none`` for the static parts. What it writes must go through
    ``atomic_dir`` like every output.
    """

    def run(self, session: Any, cfg: dict, out_dir: Any) -> dict:
        raise NotImplementedError

    def check_offload(self, mode: str) -> None:
        """Called with the resolved ``offload`` mode before the model loads: raise ConfigError if this
        runner cannot work on weights held that way (default: any)."""

    @classmethod
    def load(cls, path: Any, device: Any = "cpu", dtype: Any = None, plugins: Any = None) -> tuple:
        """The folder ``run`` saved, as (model, tokenizer). ``load_compressed`` calls it for a folder
        whose config.json names the runner under ``subfit_runner`` (``dtype``: a torch dtype or None for
        the saved one; ``plugins``: where adapters and bypass kinds come from, None for the installed
        ones); like it, it must run no code from the folder and read weights from safetensors only."""
        raise SubFitError(f"load_compressed: '{path}': runner {cls.__name__} saves no folder that load_compressed loads")
