"""Rebuilding a compressed model's structure from the ``subfit`` entry of its config.

Portable on purpose (it imports torch only): ``load_compressed`` runs it, and every saved model's
modeling file carries a verbatim copy, so SubFit and a standard tool build the same structure
before the same weights load into it.
"""

from __future__ import annotations

from torch import nn


def set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def rebuild(model: nn.Module, info: dict, layout, bypass_classes: dict, factored_linear, dtype=None) -> None:
    """Put empty bypasses and low-rank factors of the recorded shapes where ``info`` says.

    ``layout``: the model family's ``submodule``/``install``/``finalize`` functions;
    ``bypass_classes``: kind -> class; ``factored_linear``: the factored linear class;
    ``dtype`` None: torch's default (set by ``from_pretrained`` while it builds the model).
    """
    shared: dict = {}  # one entry per shared-basis group
    for r in info["replacements"]:
        spec = r["bypass"]
        layout.install(model, r["layer"], r["kind"], bypass_classes[spec["kind"]].empty(spec, dtype, shared))
    layout.finalize(model)
    for r in info.get("factored", []):
        empty = factored_linear.empty(r["in"], r["out"], r["rank"], r["bias"], dtype)
        set_child(layout.submodule(model, r["layer"], r["kind"]), r["linear"], empty)
