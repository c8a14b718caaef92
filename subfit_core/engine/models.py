"""Resolving ``model=``, ``device=`` and ``dtype=``, and finding the adapter for a model.

An architecture no adapter supports is refused from its config (config.json's ``architectures`` /
``model_type``, or a GGUF file's metadata) before any weights load; ``adapter_class`` stays the
final check on the loaded model. A ``.gguf`` file is converted once to a cached safetensors folder
(``engine/gguf.py``) and then loads, or streams, as that folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from subfit_core.engine import gguf
from subfit_core.engine.adapter import Adapter
from subfit_core.errors import SubFitError, did_you_mean, first_line
from subfit_core.plugins import Plugins
from subfit_core.progress import quiet_transformers

ADAPTER_HINT = "Add one with an adapter plugin (docs/writing-plugins.md)"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SubFitError(f"device: '{name}' requested but CUDA is not available here; allowed: auto, cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SubFitError(f"device: '{name}' is not a device; allowed: auto, cpu, cuda, cuda:N") from None


# Compute capabilities whose float64 runs at half the float32 rate: P100, V100, A100/A30, H100/H200, B200.
# Other GPUs run it at 1/32 to 1/64 of float32, slower than the host for a fit's solves.
FAST_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
FIT_MATRICES = 8  # n x n float64 matrices one fit holds at its peak (the largest built-in fitter's: seven), with room


def room_for_fits(device: torch.device, width: int) -> bool:
    """Whether ``device`` has the free memory for one fit's float64 matrices on inputs ``width`` wide."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return free > FIT_MATRICES * 8 * (width + 1) ** 2


def resolve_fit_device(choice: str, device: torch.device, dim: int) -> torch.device:
    """Where fits run their float64 algebra: ``cpu``; ``compute`` (the run's compute device); ``auto``:
    the compute device when it is a GPU with fast float64 and room for a fit's matrices, else the CPU."""
    cpu = torch.device("cpu")
    if choice == "cpu" or device.type != "cuda":
        return cpu
    if choice == "compute":
        return device
    fast = torch.cuda.get_device_capability(device) in FAST_FLOAT64
    return device if fast and room_for_fits(device, dim) else cpu


def supported_architectures(plugins: Plugins) -> list[str]:
    """Every model class name a registered adapter supports (its ``architectures``), sorted."""
    return sorted({a for e in plugins.adapter.entries() for a in e.load().architectures})


def config_architectures(config: dict) -> list[str]:
    """The class names a config.json says its model is: its ``architectures`` and the causal LM
    transformers builds for its ``model_type`` (``[]`` when it says nothing usable)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal_lm

    listed = config.get("architectures")
    names = [a for a in listed if isinstance(a, str)] if isinstance(listed, list) else []
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in causal_lm and causal_lm[model_type] not in names:
        names.append(causal_lm[model_type])
    return names


def refuse_unsupported(plugins: Plugins, spec: str, names: list[str], where: str) -> None:
    """Refuse ``model=spec`` before its weights load when none of the class ``names`` (read from
    ``where``) is supported by an adapter. No names: nothing to judge by; the loaded model's class
    is checked by ``adapter_class`` as always."""
    if not names:
        return
    supported = supported_architectures(plugins)
    if not set(names) & set(supported):
        raise SubFitError(f"model: '{spec}': architecture '{names[0]}' (from {where}) is not supported; "
                          f"supported: {', '.join(supported)}. {ADAPTER_HINT}")


def check_config(plugins: Plugins, spec: str, config_file: Path) -> None:
    """The early refusal for a model folder's (or a hub id's) config.json, before any weights load:
    a SubFit output folder, or an architecture no adapter supports."""
    from subfit_core.artifact.export import MODEL_TYPE

    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SubFitError(f"model: '{spec}': cannot read {config_file.name} ({type(exc).__name__}); "
                          "a Hugging Face model folder has a JSON config.json") from None
    if not isinstance(config, dict):
        raise SubFitError(f"model: '{spec}': {config_file.name} is not a JSON object; a Hugging Face model folder has one")
    if config.get("model_type") == MODEL_TYPE:
        base = config.get("subfit", {}).get("base", {}) if isinstance(config.get("subfit"), dict) else {}
        arch = base.get("architecture") if isinstance(base, dict) else None
        raise SubFitError(
            f"model: '{spec}' is a SubFit output folder (config.json model_type '{MODEL_TYPE}'): a compressed model cannot "
            f"be compressed again from its folder; compress its base model{f' ({arch})' if arch else ''} instead (at the "
            "total sparsity wanted), or use this one with load_compressed() or trust_remote_code in transformers")
    refuse_unsupported(plugins, spec, config_architectures(config), f"{config_file.name}")


def _hub_config(spec: str) -> Path | None:
    """A hub id's config.json (from the hub's cache when offline), or None when it cannot be had:
    loading the model then says what is wrong."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(spec, "config.json"))
    except Exception:  # noqa: BLE001 - offline without a cached copy, a missing repo, ...
        return None


def gguf_folder(plugins: Plugins, spec: str) -> Path:
    """The converted safetensors folder of the GGUF file ``spec``: checked (a file, GGUF, the gguf
    package), refused early when no adapter supports its architecture, converted on first use."""
    path = gguf.check_file(spec)
    folder = gguf.cache_folder(path)
    if gguf.is_converted(folder):
        check_config(plugins, spec, folder / "config.json")
    else:
        refuse_unsupported(plugins, spec, gguf.architecture_names(path),
                           f"the GGUF metadata: general.architecture '{gguf.gguf_architecture(path)}'")
        quiet_transformers()
        gguf.converted(path, folder, spec)
    return folder


def load_model(plugins: Plugins, spec: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    """``spec``: a registered short name, a local directory, a GGUF file or a hub id. Returns (model, tokenizer, source)."""
    quiet_transformers()
    if spec in plugins.model:
        return plugins.model.get(spec)(device, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf.is_gguf(spec):
        folder = gguf_folder(plugins, spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise SubFitError(f"model: cannot load the converted copy of '{spec}' at {folder}: {first_line(exc)}; "
                              "delete that folder to convert the file again") from None
        return model.to(device), tokenizer, f"{spec} (GGUF, converted at {folder})"  # type: ignore[arg-type]
    path = Path(spec).expanduser()
    local = path.is_dir()
    if not local and (spec.count("/") != 1 or path.exists()):
        raise SubFitError(f"model: '{spec}' is not a registered name, a local directory, a .gguf file or a hub id "
                          f"(owner/name); {did_you_mean(spec, plugins.model.names())}")
    if local and not (path / "config.json").is_file():
        raise SubFitError(f"model: '{spec}' is a folder without config.json, not a Hugging Face model folder")
    config_file = path / "config.json" if local else _hub_config(spec)
    if config_file is not None:
        check_config(plugins, spec, config_file)
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec if not local else path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(spec if not local else path, dtype=dtype,
                                                     use_safetensors=True, **kwargs)
    except (OSError, ValueError) as exc:
        where = "local directory" if local else "hub id (is the hub reachable?)"
        raise SubFitError(f"model: cannot load '{spec}' as a {where}: {first_line(exc)}") from None
    # transformers wraps PreTrainedModel.to with functools.wraps, whose typeshed type does not bind self
    return model.to(device), tokenizer, f"{spec} ({'local' if local else 'hub'})"  # type: ignore[arg-type]


def model_folder(spec: str) -> Path | None:
    """The local folder of a model folder, a GGUF file (its converted copy, converted now if need be)
    or a hub id (from the hub's cache when offline); None if none."""
    if gguf.is_gguf(spec):
        return gguf.converted(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        # what loading needs besides the weights: configs, tokenizer files (a chat template may be its own
        # .jinja file), and a model's own code, which runs only with trust_remote_code
        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
        return Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - offline without a cached copy, a missing repo, ...
        raise SubFitError(f"model: cannot fetch '{spec}' from the hub: {type(exc).__name__}") from None


def offload_mode(plugins: Plugins, spec: str, mode: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """What ``offload=mode`` means for ``model=spec`` here (``auto`` resolved from the checkpoint's size;
    ``dtype``: the weights' type once loaded, which decides whether they fit across the GPUs)."""
    from subfit_core.engine.streaming import checkpoint_bytes, checkpoint_sizes, resolve_offload

    if spec in plugins.model:
        if mode in ("gpus", "cpu", "disk"):
            raise SubFitError(f"offload: {mode} streams a model folder of safetensors, but model '{spec}' is built in "
                              "memory by its plugin; use offload=none or a model folder")
        return "none"
    if mode == "none":
        return "none"
    folder: Path | None
    if gguf.is_gguf(spec):  # streams as its converted folder: bad files and architectures are refused here
        folder = gguf_folder(plugins, spec)
    else:
        try:
            folder = model_folder(spec)
        except SubFitError:
            if mode == "auto":  # loading in memory will say what is wrong with the hub id
                return "none"
            raise
    if folder is None:
        return "none"
    try:  # the size the weights take once loaded (a bf16 checkpoint run in float32 doubles), not on disk
        sizes = checkpoint_sizes(folder, dtype) if dtype is not None else None
        size = sum(sizes.values()) if sizes is not None else checkpoint_bytes(folder)
    except SubFitError:
        if mode == "auto":  # not a safetensors folder: loading it in memory says what is wrong
            return "none"
        raise
    return resolve_offload(mode, size, device, sizes)


def load_streamed(spec: str, device: torch.device, dtype: torch.dtype, mode: str, trust_remote_code: bool,
                  plugins: Plugins | None = None):
    """(model without weights in memory, tokenizer, source, its WeightStream) for offload ``mode``.
    ``plugins``: whose adapters decide which architectures are refused early (default: the installed ones)."""
    from transformers import AutoTokenizer

    from subfit_core.engine.streaming import build_streamed
    from subfit_core.plugins import get_plugins

    quiet_transformers()
    plugins = plugins or get_plugins()
    folder = gguf_folder(plugins, spec) if gguf.is_gguf(spec) else model_folder(spec)
    if folder is None or not (folder / "config.json").is_file():
        raise SubFitError(f"model: '{spec}' is not a model folder with config.json, which offload={mode} needs")
    check_config(plugins, spec, folder / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code and not gguf.is_gguf(spec),
                                              local_files_only=True)
    model, stream = build_streamed(folder, dtype, device, mode, trust_remote_code and not gguf.is_gguf(spec))
    return model, tokenizer, f"{spec} (streamed from {mode})", stream


def find_adapter(plugins: Plugins, model: torch.nn.Module) -> Adapter:
    return adapter_class(plugins, model)(model)


def adapter_class(plugins: Plugins, model: torch.nn.Module) -> type[Adapter]:
    for entry in plugins.adapter.entries():
        cls = entry.load()
        if cls.matches(model):
            return cls
    raise SubFitError(
        f"model: architecture '{type(model).__name__}' is not supported; supported: {', '.join(supported_architectures(plugins))}. "
        f"{ADAPTER_HINT}")
