"""The hooks through which plugins extend SubFit.

Every built-in component is registered through these same hooks by the ``subfit_plugins.builtin``
plugin, found through the ``subfit`` entry-point group exactly like a third-party plugin.

Each ``subfit_*`` component hook returns a mapping ``{name: component}``. A component is either the
object itself or a lazy reference ``"package.module:attribute"`` imported on first use, so that
listing plugins stays cheap. Names are global per kind: two plugins registering the same name is an
error that names both.
"""

# The hookspecs below are pluggy specifications: only their signatures and docstrings count, and
# they have no bodies by design, which mypy would otherwise report for each one.
# mypy: disable-error-code="empty-body"

from __future__ import annotations

import pluggy

PROJECT = "subfit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def subfit_model_adapters() -> dict:
    """Adapters that locate attention/FFN submodules in a model family (``subfit_core.engine.adapter.Adapter``)."""


@hookspec
def subfit_scorers() -> dict:
    """Redundancy scorers (``subfit_core.engine.interfaces.Scorer`` subclasses); lower score = remove first."""


@hookspec
def subfit_statistics() -> dict:
    """Statistics (``subfit_core.engine.interfaces.Statistic`` subclasses) accumulated per submodule in the
    dense calibration pass, for scorers that declare them in ``Scorer.statistics``."""


@hookspec
def subfit_metrics() -> dict:
    """Metrics (``subfit_core.engine.interfaces.Metric`` subclasses) that judge a model on the scoring windows
    from its next-token logits; scorers and selectors name them in their parameters."""


@hookspec
def subfit_selectors() -> dict:
    """Selectors (``subfit_core.engine.interfaces.Selector`` subclasses) that turn scores into a Plan."""


@hookspec
def subfit_fitters() -> dict:
    """Bypass fitters (``subfit_core.engine.interfaces.Fitter`` subclasses)."""


@hookspec
def subfit_bypass_kinds() -> dict:
    """Bypass classes (``subfit_core.engine.bypass.Bypass`` subclasses) by their ``kind``, so that a saved
    model whose fitter returned one can be rebuilt by ``load_compressed`` (``Bypass.empty``)."""


@hookspec
def subfit_factorizers() -> dict:
    """Low-rank factorizers of linear layers (``subfit_core.engine.interfaces.Factorizer`` subclasses)."""


@hookspec
def subfit_runners() -> dict:
    """Runners (``subfit_core.engine.interfaces.Runner`` subclasses): a recipe naming one in
    ``runner.name`` is delivered by it (for example a model that chooses per input) instead of as
    one compressed model."""


@hookspec
def subfit_datasets() -> dict:
    """Text sources: callables returning ``subfit_core.engine.corpus.CorpusText``."""


@hookspec
def subfit_eval_domains() -> list:
    """Names of registered text sources (offline ones) on whose held-out text every run also reports
    perplexity unless the recipe sets ``eval.domains``: the calibration domain and those the run did
    not calibrate on, so a fit that only works on its own corpus shows."""


@hookspec
def subfit_models() -> dict:
    """Short model names: callables ``(device, dtype) -> (model, tokenizer, source)``."""


@hookspec
def subfit_defaults() -> dict:
    """Defaults for what a recipe or command line leaves out: dotted recipe keys (``model``,
    ``calib.dataset``, ...) and ``strategy`` (the recipe ``subfit-run`` and ``compress()`` use when
    none is named) -> value. A key set by two plugins is an error naming both."""


@hookspec
def subfit_recipe_dirs() -> list:
    """Folders holding recipe YAML files, searched for ``strategy=<name>``."""


@hookspec
def subfit_eval_task_dirs() -> list:
    """Folders of lm-evaluation-harness task YAMLs (one task per file, named by its ``task`` key) that
    ``eval.tasks=[...]`` finds by name. A relative ``dataset_kwargs.data_files`` path in a YAML is read
    relative to that YAML's folder, so a plugin can ship its task data next to it."""
