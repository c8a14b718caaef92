"""GGUF files as models: ``model=path/file.gguf`` is dequantised to float32 once and cached as a
plain safetensors model folder, so every later load is an ordinary (seconds-long) folder load.

The cache folder is ``cache_root()/models/<file stem>-<key>``, where the key hashes the file's
absolute path, size and modification time (a file replaced in place gets a new folder). A
conversion is written to a temporary folder beside it and renamed into place, so a killed
conversion leaves no folder that looks complete, and two conversions of one file at once both end
with the same whole folder.

The conversion is transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``) followed
by a rebuild without the GGUF quantisation config: the config's own class, a fresh model from
``AutoModelForCausalLM.from_config`` and the loaded state dict. A file whose tensors do not cover
the model (a weight transformers would leave randomly initialised) is refused, never saved.
Nothing here names a model family: which architectures SubFit can compress is the adapters'
business (``engine/models.py`` refuses the others before any weights load).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import torch

from subfit_core.engine.cache import cache_root
from subfit_core.errors import SubFitError, first_line
from subfit_core.progress import progress_enabled

SUFFIX = ".gguf"
MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 (2023) used 32-bit counts; transformers reads 2 and 3 only
CONVERSION_VERSION = 1  # bump when what a converted folder holds changes: old folders then miss
INFO_FILE = "subfit-gguf.json"  # provenance of a converted folder: the file, its size and time, the versions
ALLOWED = "a registered name, a local model folder, a hub id (owner/name) or an existing .gguf file"

# GGUF metadata value types: fixed-size scalars by struct format, 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 30  # a longer string means the file is damaged, not a real GGUF


def is_gguf(spec: str | Path) -> bool:
    """Whether ``model=spec`` names a GGUF file (by its suffix; the file's bytes are checked by ``check_file``)."""
    return str(spec).lower().endswith(SUFFIX)


def check_file(spec: str | Path, name: str | None = None) -> Path:
    """The absolute path of a readable GGUF file, or a one-line ``SubFitError`` naming ``model``.
    ``name``: what the user asked for, quoted in messages (default ``spec``)."""
    shown = name or str(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SubFitError(f"model: '{shown}' does not exist; allowed: {ALLOWED}")
    if not path.is_file():
        raise SubFitError(f"model: '{shown}' is not a file; allowed: {ALLOWED}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise SubFitError(f"model: cannot read '{shown}' ({exc.strerror or type(exc).__name__}); allowed: {ALLOWED}") from None
    if head[:4] != MAGIC:
        raise SubFitError(f"model: '{shown}' is not a GGUF file (it does not start with the bytes 'GGUF'); allowed: {ALLOWED}")
    version = int.from_bytes(head[4:8], "little")
    if version not in VERSIONS:
        raise SubFitError(f"model: '{shown}' is GGUF version {version}; allowed: GGUF version "
                          f"{' or '.join(map(str, VERSIONS))} (convert it again with a current GGUF converter)")
    if importlib.util.find_spec("gguf") is None:
        raise SubFitError(f"model: '{shown}' is a GGUF file, which needs the gguf package "
                          "(pip install 'gguf>=0.10'); allowed without it: a registered name, a local model folder or a hub id")
    return path.resolve()


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _read_string(f: BinaryIO) -> bytes:
    (n,) = struct.unpack("<Q", _read(f, 8))
    if n > _MAX_STRING:
        raise ValueError(f"a string of {n} bytes")
    return _read(f, n)


def _read_value(f: BinaryIO, kind: int, keep: bool) -> object:
    """One metadata value of type ``kind`` (arrays are skipped and returned as None unless ``keep``)."""
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _read_string(f).decode("utf-8", errors="replace")
    if kind != _ARRAY:
        raise ValueError(f"metadata type {kind}")
    (inner,) = struct.unpack("<I", _read(f, 4))
    (count,) = struct.unpack("<Q", _read(f, 8))
    if inner in _SCALARS and not keep:
        f.seek(count * struct.calcsize(_SCALARS[inner]), os.SEEK_CUR)
        return None
    items = [_read_value(f, inner, keep) for _ in range(count)]
    return items if keep else None


def read_metadata(path: str | Path, keys: tuple[str, ...] = ("general.architecture", "general.name")) -> dict:
    """The values of ``keys`` from a GGUF file's metadata, read from its header without parsing the
    rest (a tokenizer's 256k-entry arrays are skipped over); keys the file lacks are left out.
    Reading stops once every key is found, so the usual ``general.*`` keys cost a few reads."""
    wanted, found = set(keys), dict[str, object]()
    try:
        with open(path, "rb") as f:
            if _read(f, 4) != MAGIC:
                raise ValueError("no GGUF magic bytes")
            _version, _tensors, count = struct.unpack("<IQQ", _read(f, 20))
            for _ in range(count):
                if not wanted - found.keys():
                    break
                key = _read_string(f).decode("utf-8", errors="replace")
                (kind,) = struct.unpack("<I", _read(f, 4))
                value = _read_value(f, kind, keep=key in wanted)
                if key in wanted:
                    found[key] = value
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise SubFitError(f"model: '{path}' is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                          f"allowed: {ALLOWED}") from None
    return found


def architecture_names(path: str | Path) -> list[str]:
    """The transformers causal-LM class a GGUF file loads as, from its ``general.architecture``
    (``[]`` when transformers has no causal LM of that name). GGUF names are llama.cpp's:
    ``a-b`` is transformers' ``a_b``, ``xmoe`` its ``x_moe``, and a multimodal family's text-only
    checkpoint is its ``x_text`` model type, which transformers prefers for GGUF files."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal_lm

    arch = read_metadata(path, ("general.architecture",)).get("general.architecture")
    if not isinstance(arch, str) or not arch:
        return []
    base = arch.replace("-", "_")
    for model_type in (f"{base}_text", base, re.sub(r"moe$", "_moe", base)):
        if model_type in causal_lm:
            return [causal_lm[model_type]]
    return []


def gguf_architecture(path: str | Path) -> str:
    """The file's own ``general.architecture`` (for messages), or '?'."""
    value = read_metadata(path, ("general.architecture",)).get("general.architecture")
    return value if isinstance(value, str) else "?"


def cache_folder(path: str | Path) -> Path:
    """Where the converted copy of the GGUF file ``path`` lives: keyed by its absolute path, size
    and modification time (and the conversion's version)."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(json.dumps([CONVERSION_VERSION, str(path), st.st_size, st.st_mtime_ns]).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:60].lstrip(".") or "model"
    return cache_root() / "models" / f"{stem}-{key}"


def is_converted(folder: Path) -> bool:
    """A whole converted (or otherwise saved) model folder: a config and its safetensors weights."""
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def is_current(folder: Path, origin: str) -> bool:
    """A converted folder that this version of the conversion made from ``origin`` (its provenance file
    says so): a folder from another package version, an older conversion, or anything else is stale."""
    if not is_converted(folder):
        return False
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("conversion") == CONVERSION_VERSION and info.get("origin") == origin


def _uncovered(info: dict) -> list[str]:
    """Weights of the model that the file did not provide (left at their random initialisation)."""
    missing = set(info.get("missing_keys") or ())
    for item in info.get("mismatched_keys") or ():  # (name, shape in the file, shape in the model)
        missing.add(item[0] if isinstance(item, (tuple, list)) else str(item))
    return sorted(missing)


@contextlib.contextmanager
def _quiet_dequantising():
    """transformers' GGUF loader draws its own tqdm bar, which no transformers switch turns off:
    while SUBFIT_PROGRESS=0 its module sees a disabled one (restored on exit)."""
    module: Any = None
    with contextlib.suppress(ImportError):
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(module, "tqdm", None)
    if progress_enabled() or bar is None:
        yield
        return

    def silenced(*args, **kwargs):
        kwargs["disable"] = True
        return bar(*args, **kwargs)

    module.tqdm = silenced
    try:
        yield
    finally:
        module.tqdm = bar


def _dequantised() -> dict[str, Any]:
    """Ask for plain float weights: transformers versions that can keep some GGUF weights packed
    (their ``GgufConfig``) would otherwise do so when a matmul kernel is installed."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def convert(path: str | Path, target: Path, name: str | None = None, origin: str | None = None) -> Path:
    """Dequantise the GGUF file ``path`` to float32 and save it as a plain safetensors model folder
    at ``target`` (with its tokenizer), atomically. ``name``: how messages quote the model;
    ``origin``: what the file is (e.g. a package and its version), recorded for ``is_current``.
    Returns ``target``; a whole current folder already there (another process converting the same
    file at the same time) is kept, a stale one replaced."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shown = name or str(path)
    path = check_file(path, shown)
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = dict(gguf_file=path.name, local_files_only=True)
    try:
        with _quiet_dequantising():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
            result: Any = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, output_loading_info=True,
                                                               **kwargs, **_dequantised())
    except (OSError, ValueError, KeyError, NotImplementedError, ImportError) as exc:
        raise SubFitError(f"model: cannot convert '{shown}' (GGUF architecture '{gguf_architecture(path)}'): "
                          f"{first_line(exc)}") from None
    loaded, info = result  # the model, and what transformers could not fill from the file
    uncovered = _uncovered(info)
    if uncovered:
        raise SubFitError(
            f"model: '{shown}' does not hold every weight of its {type(loaded).__name__}: {len(uncovered)} tensor(s) "
            f"missing or of the wrong shape ({', '.join(uncovered[:4])}{', ...' if len(uncovered) > 4 else ''}); "
            "refusing to save a model with randomly initialised weights")
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)  # the weights are plain float32 now
    config = type(loaded.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if type(plain) is not type(loaded):
        raise SubFitError(f"model: '{shown}': its config builds {type(plain).__name__}, not the {type(loaded).__name__} "
                          "its GGUF loads as; cannot convert it")
    state = loaded.state_dict()
    expected = set(plain.state_dict())
    missing = sorted(expected - set(state))  # a tied head is in both: it is one tensor under two names
    if missing:
        raise SubFitError(f"model: '{shown}': the loaded model lacks {len(missing)} weight(s) of a fresh "
                          f"{type(plain).__name__} ({', '.join(missing[:4])}); refusing to save random weights")
    plain.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    del loaded, state
    return _save(plain, tokenizer, target, path, time.perf_counter() - t0, origin)


def _save(model, tokenizer, target: Path, source: Path, seconds: float, origin: str | None = None) -> Path:
    import transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        st = source.stat()
        (tmp / INFO_FILE).write_text(json.dumps({
            "source": str(source), "origin": origin, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "conversion": CONVERSION_VERSION,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "architecture": type(model).__name__, "seconds": round(seconds, 1)}, indent=2))
        if target.exists() and not is_converted(target):  # debris of something else: never a folder we renamed
            shutil.rmtree(target)
        elif origin is not None and target.exists() and not is_current(target, origin):  # stale: set aside, then gone
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_converted(target):  # not another conversion's whole folder: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def converted(spec: str | Path, target: Path | None = None, name: str | None = None) -> Path:
    """The converted model folder of the GGUF file ``spec`` (``target``, default ``cache_folder``),
    converting it first if it is not there yet."""
    path = check_file(spec, name)
    folder = target if target is not None else cache_folder(path)
    if not is_converted(folder):
        convert(path, folder, name or str(spec))
    return folder
