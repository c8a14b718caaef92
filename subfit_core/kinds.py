"""The component kinds: one table that the hooks, the registries, the recipe schema and
``subfit-plugins`` all read, so a kind has one name everywhere."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str  # the registry's kind, and the recipe section naming one (when ``section``)
    hook: str  # the plugin hook returning {name: component}
    key: str  # the recipe key that names an entry, for messages
    interface: str  # "module:Class" every entry must subclass, or "callable"
    heading: str  # subfit-plugins' label
    section: bool = False  # a recipe section {name: ..., params...} chooses one


KINDS = (
    Kind("adapter", "subfit_model_adapters", "adapter", "subfit_core.engine.adapter:Adapter", "adapters"),
    Kind("scorer", "subfit_scorers", "scorer.name", "subfit_core.engine.interfaces:Scorer", "scorers", True),
    Kind("selector", "subfit_selectors", "selector.name", "subfit_core.engine.interfaces:Selector", "selectors", True),
    Kind("fitter", "subfit_fitters", "fitter.name", "subfit_core.engine.interfaces:Fitter", "fitters", True),
    Kind("factorizer", "subfit_factorizers", "factorizer.name", "subfit_core.engine.interfaces:Factorizer",
         "factorizers", True),
    Kind("runner", "subfit_runners", "runner.name", "subfit_core.engine.interfaces:Runner", "runners", True),
    Kind("statistic", "subfit_statistics", "scorer.statistics", "subfit_core.engine.interfaces:Statistic", "statistics"),
    Kind("metric", "subfit_metrics", "scorer.metric", "subfit_core.engine.interfaces:Metric", "metrics"),
    Kind("bypass kind", "subfit_bypass_kinds", "saved bypass", "subfit_core.engine.bypass:Bypass", "bypass kinds"),
    Kind("dataset", "subfit_datasets", "calib.dataset", "callable", "datasets"),
    Kind("model", "subfit_models", "model", "callable", "models"),
)

SECTIONS = tuple(k.name for k in KINDS if k.section)  # recipe sections that name a component
