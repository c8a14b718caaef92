"""What a saved model carries so that standard tools load it right or not at all.

The output directory is a Hugging Face custom-code model. ``config.json`` names its own
``model_type`` and architecture, so a loader without the code refuses it instead of filling the
replaced submodules with random weights, and ``auto_map`` points at ``modeling_subfit.py``, a file
written next to it that needs only torch and transformers: the family's base classes from
transformers, the portable source of the model's layout (the module defining the adapter's ``layout``), of
``rebuild`` and of every bypass class the model uses, and two subclasses that rebuild the compressed
structure in ``__init__``. ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
therefore builds the same modules as ``load_compressed`` and loads the same weights into them.
"""

from __future__ import annotations

import inspect
import re
from types import ModuleType
from typing import TYPE_CHECKING

from subfit_core.artifact import rebuild as rebuild_module
from subfit_core.engine.bypass import Bypass
from subfit_core.engine.lowrank import FactoredLinear
from subfit_core.errors import SubFitError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FORMAT = 2  # of the ``subfit`` entry in config.json; 1 (before the custom-code layout) no longer loads
MODEL_TYPE = "subfit"
ARCHITECTURE = "SubFitForCausalLM"
MODELING_FILE = "modeling_subfit.py"
AUTO_MAP = {"AutoConfig": "modeling_subfit.SubFitConfig", "AutoModel": "modeling_subfit.SubFitModel",
            "AutoModelForCausalLM": "modeling_subfit.SubFitForCausalLM"}

HEADER = '''"""A SubFit-compressed {architecture}: the submodules listed under "subfit" in config.json are
replaced by small bypasses fitted in closed form, and the linears listed under "factored" are
stored as two low-rank factors. Written by SubFit {version}; needs only torch and transformers.

    AutoModelForCausalLM.from_pretrained(this_folder, trust_remote_code=True)
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import {config_class} as BaseConfig, {base_model} as BaseModel, {architecture} as BaseForCausalLM
'''

FOOTER = '''
BYPASS_CLASSES = {{cls.kind: cls for cls in [{kinds}]}}
LAYOUT = {layout}


class SubFitConfig(BaseConfig):
    model_type = "{model_type}"


class SubFitForCausalLM(BaseForCausalLM):
    """{architecture} with the submodules in ``config.subfit`` replaced: the weights that load
    next are the compressed model's own."""

    config_class = SubFitConfig

    def __init__(self, config):
        super().__init__(config)
        rebuild(self, config.subfit, LAYOUT, BYPASS_CLASSES, FactoredLinear)


class SubFitModel(BaseModel):
    """The same without the language-model head (``AutoModel``; what vLLM's Transformers backend
    builds). The layout addresses a causal LM, so it is given one that holds this model."""

    config_class = SubFitConfig

    def __init__(self, config):
        super().__init__(config)
        holder = SimpleNamespace(**{{BaseForCausalLM.base_model_prefix: self}})
        rebuild(holder, config.subfit, LAYOUT, BYPASS_CLASSES, FactoredLinear)
'''


def base_classes(model: PreTrainedModel) -> tuple[str, str, str]:
    """Names of the model's config, base model and causal-LM classes, all importable from
    transformers (the modeling file subclasses them)."""
    import transformers

    classes = (type(model.config), type(model.base_model), type(model))
    for cls in classes:
        if getattr(transformers, cls.__name__, None) is not cls:
            raise SubFitError(f"save: {type(model).__name__} is not a class of transformers ({cls.__module__}.{cls.__name__}); "
                              "only models that transformers itself defines can be saved as a standard-tools model")
    if model.base_model is model:
        raise SubFitError(f"save: {type(model).__name__} has no base model under a language-model head")
    config_class, base_model, causal_lm = classes
    return config_class.__name__, base_model.__name__, causal_lm.__name__


def base_entry(model: PreTrainedModel) -> dict:
    config_class, _, architecture = base_classes(model)
    return {"model_type": model.config.model_type, "architecture": architecture, "config_class": config_class}


def _portable(source: str) -> str:
    """A module's or class's source without its ``from __future__`` line (the header has one)."""
    return re.sub(r"^from __future__ import .*\n", "", source, flags=re.M).strip() + "\n"


def bypass_lineage(kinds: list[type[Bypass]]) -> list[type[Bypass]]:
    """The bypass classes to write, each after the bypass classes it derives from."""
    out: list[type[Bypass]] = []
    for cls in kinds:
        for base in reversed(cls.__mro__):
            if isinstance(base, type) and issubclass(base, Bypass) and base is not Bypass and base not in out:
                out.append(base)
    return out


def check_exportable(model: PreTrainedModel, layout: object) -> tuple[str, str, str]:
    """Fail (before any work, when a run will save) on a model whose artifact standard tools could not load."""
    if layout is None:
        raise SubFitError(f"save: the adapter for {type(model).__name__} has no portable layout module, "
                          "so the saved model could not be loaded by standard tools")
    return base_classes(model)


def layout_source(layout) -> tuple[str, str, str]:
    """(module name, module source, expression that rebuilds ``layout`` in that module): a layout is a
    portable module, or an instance of a class defined in one whose repr() is its constructor call."""
    if isinstance(layout, ModuleType):
        return layout.__name__, inspect.getsource(layout), \
            "SimpleNamespace(submodule=submodule, install=install, finalize=finalize)"
    module = inspect.getmodule(type(layout))
    if module is None:
        raise SubFitError(f"save: the layout {layout!r} has no module whose source could be copied")
    return module.__name__, inspect.getsource(module), repr(layout)


def modeling_source(model: PreTrainedModel, layout, kinds: list[type[Bypass]], version: str) -> str:
    """The text of ``modeling_subfit.py`` for ``model`` (family ``layout``, bypass classes ``kinds``)."""
    config_class, base_model, architecture = check_exportable(model, layout)
    classes = bypass_lineage(kinds)
    layout_module, layout_text, layout_expr = layout_source(layout)
    parts = [
        HEADER.format(architecture=architecture, base_model=base_model, config_class=config_class, version=version),
        f"# ---- where the model keeps its submodules ({layout_module})\n", _portable(layout_text),
        f"# ---- rebuilding the compressed structure ({rebuild_module.__name__})\n", _portable(inspect.getsource(rebuild_module)),
        "# ---- bypasses\n", _portable(Bypass.portable_source()),
        *(_portable(cls.portable_source()) for cls in classes),
        "# ---- low-rank factored linears\n", _portable(inspect.getsource(FactoredLinear)),
        FOOTER.format(kinds=", ".join(c.__name__ for c in classes if c in kinds), architecture=architecture,
                      model_type=MODEL_TYPE, layout=layout_expr),
    ]
    source = "\n\n".join(p.strip("\n") + "\n" for p in parts)
    try:
        compile(source, MODELING_FILE, "exec")
    except SyntaxError as exc:
        raise SubFitError(f"save: the generated {MODELING_FILE} does not compile (line {exc.lineno}: {exc.msg}); "
                          "a bypass class's portable_source() is at fault") from None
    return source


def check_modeling_source(source: str, info: dict, dim: int) -> None:
    """Run the generated file as transformers would, and build and call every saved bypass kind on
    the meta device (no memory): a class whose portable source needs a name the file lacks fails
    here, at save time, not in a user's forward."""
    import torch

    namespace: dict = {"__name__": "subfit_modeling_check"}
    try:
        exec(compile(source, MODELING_FILE, "exec"), namespace)  # noqa: S102 - our own generated code
        shared: dict = {}
        with torch.device("meta"):
            for r in info["replacements"]:
                spec = r["bypass"]
                bypass = namespace["BYPASS_CLASSES"][spec["kind"]].empty(spec, torch.float32, shared)
                bypass(torch.zeros(1, 2, spec.get("dim", dim)))
    except Exception as exc:  # noqa: BLE001 - any failure means standard tools could not load the model
        raise SubFitError(f"save: the generated {MODELING_FILE} does not work ({type(exc).__name__}: "
                          f"{str(exc).strip()[:200]}); a bypass class's portable_source() is at fault") from None


def export_config(model: PreTrainedModel, info: dict) -> dict:
    """config.json of the saved model: the source model's fields under the SubFit model type."""
    cfg = model.config.to_dict()
    cfg.pop("subfit", None)
    cfg.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], auto_map=dict(AUTO_MAP),
               subfit={"format": FORMAT, "base": base_entry(model), **info})
    return cfg
