"""The plugin manager: loads the ``subfit`` entry points and fills the registries."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from . import hookspecs
from .registry import Registry

# hook name -> (registry kind, recipe key used in messages)
COMPONENT_HOOKS = {
    "subfit_model_adapters": ("adapter", "adapter"),
    "subfit_scorers": ("scorer", "scorer.name"),
    "subfit_selectors": ("selector", "selector.name"),
    "subfit_fitters": ("fitter", "fitter.name"),
    "subfit_datasets": ("dataset", "calib.dataset"),
    "subfit_models": ("model", "model"),
}


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    registers: dict[str, list[str]] = field(default_factory=dict)


class Plugins:
    """Registries of every kind plus the plugins they came from."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.registries = {kind: Registry(kind, key) for kind, key in COMPONENT_HOOKS.values()}
        self.info: dict[str, PluginInfo] = {}
        self.recipe_dirs: list[Path] = []
        self._collect()

    def __getattr__(self, kind: str) -> Registry:
        # plugins.scorer, plugins.fitter, ... read as the registry of that kind
        try:
            return self.__dict__["registries"][kind]
        except KeyError:
            raise AttributeError(kind) from None

    def _collect(self) -> None:
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        for name, plugin in self.pm.list_name_plugin():
            dist = dists.get(id(plugin))
            self.info[name] = PluginInfo(
                name=name,
                distribution=dist.project_name if dist else "(not installed)",
                version=dist.version if dist else "-",
            )
        for hook_name, (kind, _) in COMPONENT_HOOKS.items():
            # Call each implementation on its own so every entry knows which plugin registered it.
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                info = self.info[impl.plugin_name]
                origin = f"plugin '{impl.plugin_name}' ({info.distribution} {info.version})"
                for comp_name, target in (impl.function() or {}).items():
                    self.registries[kind].add(comp_name, target, origin)
                    info.registers.setdefault(kind, []).append(comp_name)
        for dirs in self.pm.hook.subfit_recipe_dirs():
            self.recipe_dirs.extend(Path(d) for d in dirs)


def make_plugin_manager(extra_plugins: tuple = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()  # a misspelled hook in any plugin fails here, at start-up
    return pm


@functools.lru_cache(maxsize=1)
def get_plugins() -> Plugins:
    """The process-wide registries, built once from the installed entry points."""
    return Plugins(make_plugin_manager())


def build_component(plugins: Plugins, kind: str, section: dict, prefix: str):
    """Instantiate the ``kind`` component named in ``section`` with its validated parameters."""
    from .config import validate_params

    cls = plugins.registries[kind].get(section["name"])
    return cls(validate_params(prefix, section, cls.Params), plugins)
