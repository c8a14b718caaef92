"""SubFit's engine: plugin system, recipes, statistics, surgery and artifacts. It knows no
particular compression method; those live in plugins (see ``subfit_plugins``)."""

__version__ = "0.1.0"

from subfit_core.api import Report, compress, save  # noqa: E402
from subfit_core.artifact.folder import load_compressed  # noqa: E402  (after __version__, which the artifact writes)

__all__ = ["compress", "save", "load_compressed", "Report", "__version__"]
