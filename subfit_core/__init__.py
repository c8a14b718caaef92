"""SubFit's engine: plugin system, recipes, statistics, surgery and artifacts. It knows no
particular compression method; those live in plugins (see ``subfit_plugins``)."""

from .artifact import load_compressed

__version__ = "0.1.0"
__all__ = ["load_compressed", "__version__"]
