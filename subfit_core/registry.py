"""Typed, lazy registries of named components, each entry remembering which plugin gave it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from subfit_core.errors import SubFitError, did_you_mean


@dataclass
class Entry:
    name: str
    target: Any  # the object, or a lazy "module:attr" reference
    origin: str  # "plugin-name (distribution version)"
    kind: str = "component"
    interface: str | None = None  # "module:Class" every entry must subclass; "callable": any callable
    _loaded: Any = field(default=None, repr=False)

    def load(self) -> Any:
        if self._loaded is None:
            obj = _resolve(self.target) if isinstance(self.target, str) else self.target
            self._check(obj)
            self._loaded = obj
        return self._loaded

    def _check(self, obj: Any) -> None:
        """A registered object that does not implement its kind's interface is named at first use."""
        if self.interface is None:
            return
        if self.interface == "callable":
            ok, what = callable(obj), "a callable"
        else:
            base = _resolve(self.interface)
            ok, what = isinstance(obj, type) and issubclass(obj, base), f"a {base.__name__} subclass"
        if not ok:
            raise SubFitError(f"{self.kind} '{self.name}' registered by {self.origin} is {obj!r}, not {what}")


def _resolve(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SubFitError(f"cannot import registered component '{ref}': {exc}") from exc
    return obj


class Registry:
    """Components of one kind ("scorer", "fitter", ...) by name."""

    def __init__(self, kind: str, config_key: str | None = None, interface: str | None = None):
        self.kind = kind
        self.config_key = config_key or kind  # which recipe key names entries of this kind, for messages
        self.interface = interface  # what every entry must be (see Entry.interface)
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, target: Any, origin: str) -> None:
        if name in self._entries:
            first = self._entries[name].origin
            raise SubFitError(f"{self.kind} '{name}' is registered twice: by {first} and by {origin}")
        self._entries[name] = Entry(name, target, origin, self.kind, self.interface)

    def get(self, name: str, key: str | None = None) -> Any:
        return self.entry(name, key).load()

    def entry(self, name: str, key: str | None = None) -> Entry:
        """``key``: the recipe key that named it, for the message (default: this kind's usual key)."""
        if not isinstance(name, str):
            raise SubFitError(f"{key or self.config_key}: {name!r} is not a {self.kind} name; "
                              f"{did_you_mean(str(name), self._entries)}")
        try:
            return self._entries[name]
        except KeyError:
            raise SubFitError(
                f"{key or self.config_key}: unknown {self.kind} '{name}'; {did_you_mean(name, self._entries)}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries
