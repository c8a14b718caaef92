"""Saving a compressed model atomically, and loading it back.

Layout of ``output_dir`` (a Hugging Face custom-code model, see ``export``): ``config.json`` (the
source config under model type ``subfit``, with a ``subfit`` entry listing each replaced
submodule and its bypass, and each factored linear), ``modeling_subfit.py``, ``model.safetensors``
(no weights for removed submodules; a tensor shared by several bypasses stored once, under its
first user in depth order; factored linears as ``down``/``up``), ``generation_config.json`` of the
source, the tokenizer, a model card ``README.md``, ``recipe.yaml`` (the resolved recipe) and
``results.json``.

``load_compressed`` executes nothing from the directory: it reads config.json as data, builds the
base architecture that transformers itself defines and rebuilds the structure with the installed
plugins' classes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model

from subfit_core import __version__
from subfit_core.artifact.card import model_card
from subfit_core.artifact.export import FORMAT, MODEL_TYPE, MODELING_FILE, check_modeling_source, export_config, modeling_source
from subfit_core.artifact.outputs import atomic_dir
from subfit_core.artifact.rebuild import rebuild
from subfit_core.engine.bypass import Bypass
from subfit_core.engine.lowrank import FactoredLinear
from subfit_core.engine.streaming import WeightStream, write_safetensors
from subfit_core.errors import SubFitError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


SHARD_BYTES = 2 * 1024**3  # weights per safetensors shard
STREAMED_SHARD_BYTES = 512 * 1024**2  # when the weights are streamed, a shard is what memory holds
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def unique_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of the state dict once, under its first name (module order is depth order, so a
    shared basis lands in its group's first member and tied embeddings under the input embedding).
    Weights not in memory (streamed) are meta tensors, told apart by identity."""
    seen: set = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:
            key: tuple = (id(tensor),)
        else:
            key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if key not in seen:
            seen.add(key)
            yield name, tensor


def write_weights(model: torch.nn.Module, folder: Path, stream: WeightStream | None = None,
                  shard_bytes: int | None = None) -> list[str]:
    """Write the weights shard by shard (``model.safetensors``, or numbered shards and their index
    when they exceed ``shard_bytes``): only one shard's tensors are in memory at a time, those of
    streamed weights read from the source as they are written. Returns the files written."""
    shards: list[dict[str, torch.Tensor]] = []
    files: list[str] = []
    if shard_bytes is None:
        shard_bytes = SHARD_BYTES if stream is None else STREAMED_SHARD_BYTES

    def flush(part: dict[str, torch.Tensor]) -> None:
        name = f"part-{len(files):05d}.safetensors"
        write_safetensors(folder / name, part, metadata={"format": "pt"})
        files.append(name)
        shards.append({k: torch.empty(0) for k in part})  # names only: the tensors are freed
        part.clear()

    part: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in unique_tensors(model):
        if tensor.is_meta:
            if stream is None:
                raise SubFitError(f"save: {name} is not in memory and no weight stream was given")
            tensor = stream.read(tensor)
        tensor = tensor.detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if part and size + nbytes > shard_bytes:
            flush(part)
            size = 0
        part[name] = tensor
        size += nbytes
    flush(part)
    if len(files) == 1:
        (folder / files[0]).rename(folder / WEIGHTS)
        return [WEIGHTS]
    final = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    weight_map = {}
    for old, new, names in zip(files, final, shards):
        (folder / old).rename(folder / new)
        weight_map.update({k: new for k in names})
    (folder / INDEX).write_text(json.dumps({"metadata": {"format": "pt"}, "weight_map": weight_map}, indent=2) + "\n")
    return [*final, INDEX]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a saved model: one, or the shards its index names."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SubFitError(f"load_compressed: '{path / INDEX}' is not a safetensors index ({_first_line(exc)})") from None
        return [path / name for name in sorted(set(weight_map.values()))]
    return [path / WEIGHTS]


def describe(adapter) -> tuple[list[dict], list[dict]]:
    """The records config.json stores, read off a compressed model's modules: each submodule that a
    bypass stands in for, and each linear stored as low-rank factors (both in depth order)."""
    replacements, factored = [], []
    for sub in adapter.submodules():
        module = adapter.module(sub)
        if isinstance(module, Bypass):
            replacements.append({"layer": sub.layer, "kind": sub.kind, "bypass": module.spec()})
            continue
        factored += [{"layer": sub.layer, "kind": sub.kind, "linear": path, **child.spec()}
                     for path, child in module.named_modules() if isinstance(child, FactoredLinear)]
    return replacements, factored


def save_compressed(model, tokenizer, replacements: list[dict], output_dir: Path, recipe: dict, results: dict,
                    factored: list[dict] | None = None, layout=None, kinds: list[type[Bypass]] | None = None,
                    stream: WeightStream | None = None) -> None:
    """``factored``: one record per linear stored as two low-rank factors (layer, kind, linear path, shape).
    ``layout``: the adapter's portable layout module, ``kinds``: the bypass classes used (default:
    found on the model); ``stream``: where weights that are not in memory are read from."""
    from subfit_core.engine.models import adapter_class
    from subfit_core.plugins import get_plugins

    layout = layout or adapter_class(get_plugins(), model).layout
    kinds = kinds or sorted({type(m) for m in model.modules() if isinstance(m, Bypass)}, key=lambda c: c.kind)
    info = {"replacements": replacements, **({"factored": factored} if factored else {})}
    config = export_config(model, info)
    code = modeling_source(model, layout, kinds, __version__)
    check_modeling_source(code, info, model.config.hidden_size)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / MODELING_FILE).write_text(code)
        write_weights(model, tmp, stream)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(config, results, recipe))
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        (tmp / "results.json").write_text(json.dumps(results, indent=2))

    atomic_dir(output_dir, write)


def _tied_to_loaded(model: torch.nn.Module, name: str, loaded: set[str]) -> bool:
    state = model.state_dict(keep_vars=True)
    return any(state[other] is state[name] for other in loaded if other in state)


RUNNER_KEY = "subfit_runner"  # config.json of a folder a runner saved: the runner that loads it


def read_json_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SubFitError(f"load_compressed: '{path}' holds no config.json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SubFitError(f"load_compressed: '{path}/config.json' is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise SubFitError(f"load_compressed: '{path}/config.json' is not a JSON object")
    return config


def read_config(path: Path) -> dict:
    """config.json of a saved model, checked to be a SubFit model of the current format."""
    config = read_json_config(path)
    info = config.get("subfit")
    if not isinstance(info, dict):
        raise SubFitError(f"load_compressed: '{path}/config.json' has no 'subfit' entry (not a SubFit model)")
    if info.get("format") != FORMAT:
        raise SubFitError(f"load_compressed: '{path}' was saved in SubFit format {info.get('format')!r}; this version "
                          f"reads format {FORMAT} only (compress the model again)")
    if config.get("model_type") != MODEL_TYPE:
        raise SubFitError(f"load_compressed: '{path}/config.json': model_type {config.get('model_type')!r}; "
                          f"a SubFit model of format {FORMAT} has '{MODEL_TYPE}'")
    if not isinstance(info.get("base"), dict):
        raise SubFitError(f"load_compressed: '{path}/config.json': subfit.base is not a mapping")
    return config


def base_config(config: dict, path: Path):
    """The source model's config object, built by the transformers class its model type names."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = config["subfit"].get("base") or {}
    model_type = base.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:  # a list would make `in` raise TypeError
        raise SubFitError(f"load_compressed: '{path}/config.json': subfit.base.model_type {model_type!r} is not a "
                          "model type of this transformers")
    skip = {"subfit", "auto_map", "architectures", "model_type"}
    return CONFIG_MAPPING[model_type].from_dict({k: v for k, v in config.items() if k not in skip})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_records(info: dict, layers: int, path: Path) -> None:
    """Every field of the ``subfit`` entry that selects code or shapes, against what is allowed."""
    where = f"load_compressed: '{path}/config.json'"

    def place(r, i: int, section: str) -> None:
        if not isinstance(r, dict):
            raise SubFitError(f"{where}: subfit.{section}[{i}] is not a mapping")
        layer, kind = r.get("layer"), r.get("kind")
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < layers:
            raise SubFitError(f"{where}: subfit.{section}[{i}].layer {layer!r}; the model has layers 0..{layers - 1}")
        if kind not in ("attn", "ffn"):
            raise SubFitError(f"{where}: subfit.{section}[{i}].kind {kind!r}; allowed: attn, ffn")

    reps, factored = info.get("replacements"), info.get("factored", [])
    if not isinstance(reps, list) or not isinstance(factored, list):
        raise SubFitError(f"{where}: subfit.replacements and subfit.factored must be lists")
    for i, r in enumerate(reps):
        place(r, i, "replacements")
        spec = r.get("bypass")
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise SubFitError(f"{where}: subfit.replacements[{i}].bypass has no kind")
        bad = [k for k, v in spec.items() if k in ("dim", "rank", "hidden") and (not isinstance(v, int) or v < 1)]
        if bad:
            raise SubFitError(f"{where}: subfit.replacements[{i}].bypass.{bad[0]} {spec[bad[0]]!r}; expected a positive integer")
    for i, r in enumerate(factored):
        place(r, i, "factored")
        bad = [k for k in ("in", "out", "rank") if not isinstance(r.get(k), int) or r[k] < 1]
        if bad or not isinstance(r.get("linear"), str):
            field = bad[0] if bad else "linear"
            raise SubFitError(f"{where}: subfit.factored[{i}].{field} {r.get(field)!r} is not valid")
    seen = [(r["layer"], r["kind"]) for r in reps]
    if len(seen) != len(set(seen)):
        raise SubFitError(f"{where}: a submodule is replaced twice in subfit.replacements")


def load_compressed(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                    plugins=None):
    """Rebuild a SubFit model from ``path``: returns (model, tokenizer). ``plugins`` (default: the
    installed ones) supply the model adapter and the classes of the saved bypass kinds. A folder a
    runner saved (its config.json names it under ``subfit_runner``) is loaded by that runner's
    ``load``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subfit_core.engine.bypass import bypass_classes
    from subfit_core.engine.models import find_adapter
    from subfit_core.plugins import get_plugins

    path = Path(path)
    if not (path / WEIGHTS).exists() and not (path / INDEX).exists():
        raise SubFitError(f"load_compressed: '{path}' holds no model.safetensors")
    if isinstance(dtype, str):  # load_compressed(path, dtype="bfloat16")
        if dtype not in DTYPES:
            raise SubFitError(f"load_compressed: dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    raw = read_json_config(path)
    runner = raw.get(RUNNER_KEY)
    if runner is not None and "subfit" not in raw:
        plugins = plugins or get_plugins()
        try:
            cls = plugins.registries["runner"].get(runner, RUNNER_KEY)
        except SubFitError as exc:  # a runner from a plugin that is not installed here
            raise SubFitError(f"load_compressed: '{path}/config.json': {exc}") from None
        return cls.load(path, device, dtype, plugins)
    config = read_config(path)
    info = config["subfit"]
    saved_dtype = config.get("dtype") or "float32"
    if dtype is None and (not isinstance(saved_dtype, str) or saved_dtype not in DTYPES):
        raise SubFitError(f"load_compressed: '{path}/config.json': dtype {saved_dtype!r}; allowed: {', '.join(DTYPES)}")
    dtype = dtype or DTYPES[saved_dtype]
    base = base_config(config, path)
    model = AutoModelForCausalLM.from_config(base, dtype=dtype)
    if type(model).__name__ != info["base"].get("architecture"):
        raise SubFitError(f"load_compressed: '{path}/config.json': subfit.base.architecture "
                          f"{info['base'].get('architecture')!r} does not match its model type ({type(model).__name__})")
    plugins = plugins or get_plugins()
    adapter = find_adapter(plugins, model)
    check_records(info, adapter.num_layers, path)
    try:
        classes = bypass_classes([r["bypass"]["kind"] for r in info["replacements"]], plugins)
    except SubFitError as exc:  # a kind from a plugin that is not installed here
        raise SubFitError(f"load_compressed: '{path}': {exc}") from None
    try:
        rebuild(model, info, adapter.layout, classes, FactoredLinear, dtype)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise SubFitError(f"load_compressed: '{path}/config.json': its replacements do not fit the model "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    expected = set(model.state_dict())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in weight_files(path):
        try:
            _, extra = load_model(model, str(file), strict=False)
            with safe_open(str(file), "pt") as f:
                loaded.update(f.keys())
        except (SafetensorError, RuntimeError, OSError, ValueError) as exc:  # truncated file, or shapes unlike config.json
            raise SubFitError(f"load_compressed: '{file}' cannot be loaded into the model config.json "
                              f"describes: {_first_line(exc)}") from None
        unexpected += extra
    # a tied tensor is stored once, under one of its names
    missing = sorted(n for n in expected - loaded if not _tied_to_loaded(model, n, loaded))
    if missing or unexpected:
        raise SubFitError(f"load_compressed: '{path}': weights do not match config.json (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    # given the config, the tokenizer does not read config.json (whose code it would ask to run)
    tokenizer = AutoTokenizer.from_pretrained(path, config=base, local_files_only=True)
    return model.to(device).eval(), tokenizer
