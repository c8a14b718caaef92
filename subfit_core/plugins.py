"""The plugin manager: loads the ``subfit`` entry points and fills the registries."""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pluggy

from subfit_core import hookspecs
from subfit_core.errors import SubFitError, did_you_mean
from subfit_core.kinds import KINDS
from subfit_core.registry import Registry


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    registers: dict[str, list[str]] = field(default_factory=dict)


class Plugins:
    """Registries of every kind plus the plugins they came from."""

    def __init__(self, pm: PluginManager):
        self.pm = pm
        self.registries = {k.name: Registry(k.name, k.key, k.interface) for k in KINDS}
        self.info: dict[str, PluginInfo] = {}
        self.recipe_dirs: list[tuple[Path, str]] = []  # (folder, origin)
        self.eval_task_dirs: list[tuple[Path, str]] = []  # (folder of lm-eval task YAMLs, origin)
        self.eval_domains: list[tuple[str, str]] = []  # (text source name, origin)
        self.defaults: dict[str, tuple[object, str]] = {}  # dotted key -> (value, origin)
        self._collect()

    def __getattr__(self, kind: str) -> Registry:
        # plugins.scorer, plugins.fitter, ... read as the registry of that kind
        try:
            return self.__dict__["registries"][kind]
        except KeyError:
            raise AttributeError(kind) from None

    def _collect(self) -> None:
        dists = getattr(self.pm, "distributions", {})
        for name, _ in self.pm.list_name_plugin():
            dist_name, version = dists.get(name, ("(not installed)", "-"))
            self.info[name] = PluginInfo(name=name, distribution=dist_name, version=version)
        for k in KINDS:
            kind = k.name
            # Call each implementation on its own so every entry knows which plugin registered it.
            for impl in getattr(self.pm.hook, k.hook).get_hookimpls():
                info = self.info[impl.plugin_name]
                origin = f"plugin '{impl.plugin_name}' ({info.distribution} {info.version})"
                for comp_name, target in (impl.function() or {}).items():
                    self.registries[kind].add(comp_name, target, origin)
                    info.registers.setdefault(kind, []).append(comp_name)
        # (hook, the list of (entry, origin) it fills, the entry's type: Path for folders, str for source names),
        # declared as one shape: else mypy checks each list against the other hooks' entry types
        listed: list[tuple[str, list, Callable[[Any], object]]] = [("subfit_recipe_dirs", self.recipe_dirs, Path),
                                                                   ("subfit_eval_task_dirs", self.eval_task_dirs, Path),
                                                                   ("subfit_eval_domains", self.eval_domains, str)]
        for hook_name, items, as_item in listed:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                info = self.info[impl.plugin_name]
                origin = f"plugin '{impl.plugin_name}' ({info.distribution} {info.version})"
                items.extend((as_item(d), origin) for d in impl.function() or [])
        for impl in self.pm.hook.subfit_defaults.get_hookimpls():
            info = self.info[impl.plugin_name]
            origin = f"plugin '{impl.plugin_name}' ({info.distribution} {info.version})"
            # pluggy types a hook's result as object; subfit_defaults returns a dict (hookspecs)
            for key, value in cast(dict, impl.function() or {}).items():
                if key in self.defaults:
                    raise SubFitError(f"default for '{key}' is set twice: by {self.defaults[key][1]} and by {origin}")
                self.defaults[key] = (value, origin)

    def default(self, key: str, fallback: object = None) -> object:
        """The value a plugin gives ``key`` when the recipe leaves it out (``fallback``: none does)."""
        return self.defaults[key][0] if key in self.defaults else fallback

    def default_domains(self) -> list[str]:
        """The text sources the plugins name for cross-domain perplexity, each once, in order."""
        return list(dict.fromkeys(name for name, _ in self.eval_domains))


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, remembering which distribution (name, version) each plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.distributions: dict[str, tuple[str, str]] = {}


def load_entry_points(pm: PluginManager) -> None:
    """Register every installed ``subfit`` entry point; a plugin that fails to import is named."""
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != hookspecs.PROJECT or pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure of a third-party plugin
                name = dist.metadata["name"]
                raise SubFitError(f"plugin '{ep.name}' ({name} {dist.version}) could not be loaded: "
                                  f"{type(exc).__name__}: {exc}") from None
            pm.register(plugin, name=ep.name)
            pm.distributions[ep.name] = (dist.metadata["name"], dist.version)


def make_plugin_manager(extra_plugins: tuple = ()) -> PluginManager:
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    load_entry_points(pm)
    for plugin in extra_plugins:
        pm.register(plugin)
    try:
        pm.check_pending()  # a misspelled hook in any plugin fails here, at start-up
    except pluggy.PluginValidationError as exc:
        raise SubFitError(f"plugin {pm.get_name(exc.plugin) or exc.plugin}: {str(exc).splitlines()[0]}") from None
    return pm


@functools.lru_cache(maxsize=1)
def get_plugins() -> Plugins:
    """The process-wide registries, built once from the installed entry points."""
    return Plugins(make_plugin_manager())


def build_component(plugins: Plugins, kind: str, section: dict, prefix: str):
    """Instantiate the ``kind`` component named in ``section`` with its validated parameters."""
    from subfit_core.config import validate_params

    cls = plugins.registries[kind].get(section["name"], f"{prefix}.name")
    return cls(validate_params(prefix, section, cls.Params), plugins)


def require(plugins: Plugins | None, kind: str, name: str, key: str):
    """The ``kind`` entry ``name`` that a component's parameter ``key`` names, refused in one line
    (with the nearest registered name) when it is not registered: components call this in
    ``__init__`` so that a bad name fails when the recipe is validated."""
    from subfit_core.errors import ConfigError

    registry = (plugins or get_plugins()).registries[kind]
    if not isinstance(name, str) or name not in registry:
        raise ConfigError(f"{key}: unknown {kind} {name!r}; {did_you_mean(str(name), registry.names())}")
    return registry.get(name, key)
