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


def model_folder(spec: str) -> Path | None:
    """The local folder of a model folder or a hub id (from the hub's cache when offline); None if none."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - offline without a cached copy, a missing repo, ...
        raise SubFitError(f"model: cannot fetch '{spec}' from the hub: {type(exc).__name__}") from None


def offload_mode(plugins: Plugins, spec: str, mode: str, device: torch.device) -> str:
    """What ``offload=mode`` means for ``model=spec`` here (``auto`` resolved from the checkpoint's size)."""
    from subfit_core.engine.streaming import checkpoint_bytes, resolve_offload

    if spec in plugins.model:
        if mode in ("cpu", "disk"):
            raise SubFitError(f"offload: {mode} streams a model folder of safetensors, but model '{spec}' is built in "
                              "memory by its plugin; use offload=none or a model folder")
        return "none"
    if mode == "none":
        return "none"
    try:
        folder = model_folder(spec)
    except SubFitError:
        if mode == "auto":  # loading in memory will say what is wrong with the hub id
            return "none"
        raise
    if folder is None:
        return "none"
    try:
        size = checkpoint_bytes(folder)
    except SubFitError:
        if mode == "auto":  # not a safetensors folder: loading it in memory says what is wrong
            return "none"
        raise
    return resolve_offload(mode, size, device)


def load_streamed(spec: str, device: torch.device, dtype: torch.dtype, mode: str, trust_remote_code: bool):
    """(model without weights in memory, tokenizer, source, its WeightStream) for offload ``mode``."""
    from transformers import AutoTokenizer

    from subfit_core.engine.streaming import build_streamed

    quiet_transformers()
    folder = model_folder(spec)
    if folder is None or not (folder / "config.json").is_file():
        raise SubFitError(f"model: '{spec}' is not a model folder with config.json, which offload={mode} needs")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    model, stream = build_streamed(folder, dtype, device, mode, trust_remote_code)
    return model, tokenizer, f"{spec} (streamed from {mode})", stream


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
