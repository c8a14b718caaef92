"""Finding and reading recipes: ``strategy=<name>`` searches the plugins' recipe folders,
``strategy=<path>.yaml`` reads a user's file. YAML is read with ``safe_load`` only."""

from __future__ import annotations

from pathlib import Path

import yaml

from subfit_core.config import ConfigError, did_you_mean
from subfit_core.plugins import Plugins


def available(plugins: Plugins) -> dict[str, Path]:
    """Recipe name -> file; two plugins shipping the same name is an error naming both."""
    found: dict[str, tuple[Path, str]] = {}
    for folder, origin in plugins.recipe_dirs:
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            if path.stem in found and found[path.stem][0] != path:
                raise ConfigError(f"recipe '{path.stem}' is provided twice: by {found[path.stem][1]} ({found[path.stem][0]}) "
                                  f"and by {origin} ({path})")
            found[path.stem] = (path, origin)
    return {name: path for name, (path, _) in found.items()}


def read_recipe(plugins: Plugins, strategy: str) -> tuple[dict, Path]:
    path = Path(strategy)
    if path.suffix not in (".yaml", ".yml"):
        recipes = available(plugins)
        if strategy not in recipes:
            raise ConfigError(f"strategy: unknown recipe '{strategy}'; {did_you_mean(strategy, recipes)}, or a path to a .yaml file")
        path = recipes[strategy]
    if not path.is_file():
        raise ConfigError(f"strategy: recipe file '{path}' not found")
    return load_yaml(path, "strategy"), path


def load_yaml(path: Path, key: str) -> dict:
    """A YAML mapping read with ``safe_load``; anything else is a one-line ConfigError naming ``key``."""
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read '{path}': {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{key}: '{path}' is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: '{path}' must hold a mapping of recipe keys")
    return data
