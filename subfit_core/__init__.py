"""SubFit's engine: recipes, plugin registries, statistics, surgery and artifacts. It knows no
particular compression method; those live in plugins (see ``subfit_plugins``).

What this package exports is the public API: ``compress`` / ``save`` / ``load_compressed`` for
users, and for plugin authors everything docs/writing-plugins.md uses (the hook marker, the
component interfaces, the bypass building blocks, the statistics and the numerical helpers).
Plugins import from here, not from the modules inside, which may move.
"""

__version__ = "0.1.0"

from subfit_core.api import Report, compress, save  # noqa: E402
from subfit_core.artifact.folder import load_compressed  # noqa: E402
from subfit_core.engine.adapter import Adapter  # noqa: E402
from subfit_core.engine.budget import Budget  # noqa: E402
from subfit_core.engine.bypass import Bypass, LinearBypass, LowRankBypass, ZeroBypass  # noqa: E402
from subfit_core.engine.corpus import CorpusText, Windows, split_heldout  # noqa: E402
from subfit_core.engine.factorize import Factorization, LinearStats, Site  # noqa: E402
from subfit_core.engine.interfaces import (  # noqa: E402
    Component,
    Factorizer,
    Fitted,
    Fitter,
    Metric,
    Plan,
    Replacement,
    Scorer,
    Selector,
    Statistic,
    Submodule,
)
from subfit_core.engine.lowrank import FactoredLinear, Factors, allocate_ranks, regularised_cholesky, uniform_rank  # noqa: E402
from subfit_core.engine.stats import SubStats, ridge_solve  # noqa: E402
from subfit_core.engine.workbench import Workbench  # noqa: E402
from subfit_core.errors import ConfigError, NumericalError, SubFitError  # noqa: E402
from subfit_core.hookspecs import hookimpl  # noqa: E402  (__version__ first: the artifact writes it)
from subfit_core.plugins import Plugins, build_component, get_plugins, make_plugin_manager, require  # noqa: E402
from subfit_core.progress import progress  # noqa: E402

__all__ = [
    # using SubFit
    "compress", "save", "load_compressed", "Report", "__version__",
    # writing plugins
    "hookimpl", "Component", "Scorer", "Selector", "Fitter", "Factorizer", "Statistic", "Metric",
    "Submodule", "Plan", "Replacement", "Fitted", "Adapter", "Budget", "Workbench",
    "Bypass", "ZeroBypass", "LinearBypass", "LowRankBypass", "FactoredLinear", "Factors",
    "SubStats", "CorpusText", "Windows", "ridge_solve", "split_heldout", "regularised_cholesky", "progress",
    "Factorization", "Site", "LinearStats", "allocate_ranks", "uniform_rank",
    "Plugins", "get_plugins", "make_plugin_manager", "build_component", "require",
    "SubFitError", "ConfigError", "NumericalError",
]
