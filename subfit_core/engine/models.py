"""Resolving ``model=``, ``device=`` and ``dtype=``, and finding the adapter for a model."""

from __future__ import annotations

from pathlib import Path

import torch

from subfit_core.engine.adapter import Adapter
from subfit_core.errors import SubFitError, did_you_mean
from subfit_core.plugins import Plugins
from subfit_core.progress import quiet_transformers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SubFitError(f"device: '{name}' requested but CUDA is not available here; allowed: auto, cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SubFitError(f"device: '{name}' is not a device; allowed: auto, cpu, cuda, cuda:N") from None


def load_model(plugins: Plugins, spec: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    """``spec``: a registered short name, a local directory, or a hub id. Returns (model, tokenizer, source)."""
    quiet_transformers()
    if spec in plugins.model:
        return plugins.model.get(spec)(device, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec).expanduser()
    local = path.is_dir()
    if not local and (spec.count("/") != 1 or path.exists()):
        raise SubFitError(f"model: '{spec}' is not a registered name, a local directory or a hub id (owner/name); "
                          f"{did_you_mean(spec, plugins.model.names())}")
    if local and not (path / "config.json").is_file():
        raise SubFitError(f"model: '{spec}' is a folder without config.json, not a Hugging Face model folder")
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec if not local else path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(spec if not local else path, dtype=dtype,
                                                     use_safetensors=True, **kwargs)
    except (OSError, ValueError) as exc:
        where = "local directory" if local else "hub id (is the hub reachable?)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SubFitError(f"model: cannot load '{spec}' as a {where}: {first}") from None
    # transformers wraps PreTrainedModel.to with functools.wraps, whose typeshed type does not bind self
    return model.to(device), tokenizer, f"{spec} ({'local' if local else 'hub'})"  # type: ignore[arg-type]


def find_adapter(plugins: Plugins, model: torch.nn.Module) -> Adapter:
    return adapter_class(plugins, model)(model)


def adapter_class(plugins: Plugins, model: torch.nn.Module) -> type[Adapter]:
    for entry in plugins.adapter.entries():
        cls = entry.load()
        if cls.matches(model):
            return cls
    supported = sorted({a for e in plugins.adapter.entries() for a in e.load().architectures})
    raise SubFitError(
        f"model: architecture '{type(model).__name__}' is not supported; supported: {', '.join(supported)}. "
        "Add one with an adapter plugin (docs/writing-plugins.md)")
