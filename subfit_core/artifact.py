"""Saving a compressed model atomically, and loading it back without the original model.

Layout of ``output_dir``: ``config.json`` (the original config plus a ``subfit`` entry listing
each replaced submodule and its bypass), ``model.safetensors`` (no weights for removed
submodules; linears factored by the factorization stage as two matrices ``down``/``up``), the
tokenizer, ``recipe.yaml`` (the resolved recipe) and ``results.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

from .bypass import build_bypasses
from .errors import SubFitError
from .factorize import set_child
from .interfaces import Submodule
from .lowrank import FactoredLinear
from .surgery import apply_bypasses

FORMAT = 1


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise SubFitError(f"output_dir: '{out}' already exists; choose another or set overwrite=true")
    return out


def atomic_dir(target: Path, write) -> None:
    """Call ``write(tmp_dir)`` and move the result to ``target`` only if it succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(model, tokenizer, replacements: list[dict], output_dir: Path, recipe: dict, results: dict,
                    factored: list[dict] | None = None) -> None:
    """``factored``: one record per linear stored as two low-rank factors (layer, kind, linear path, shape)."""
    model.config.subfit = {"format": FORMAT, "replacements": replacements, **({"factored": factored} if factored else {})}

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        (tmp / "results.json").write_text(json.dumps(results, indent=2))

    atomic_dir(output_dir, write)


def load_compressed(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    plugins=None):
    """Rebuild a SubFit model from ``path``: returns (model, tokenizer). ``plugins`` (default: the
    installed ones) supply the model adapter and the classes of the saved bypass kinds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models import find_adapter
    from .plugins import get_plugins

    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise SubFitError(f"load_compressed: '{path}' holds no model.safetensors")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    info = getattr(config, "subfit", None)
    if not info or info.get("format") != FORMAT:
        raise SubFitError(f"load_compressed: '{path}/config.json' has no SubFit entry of format {FORMAT}")
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plugins = plugins or get_plugins()
    adapter = find_adapter(plugins, model)
    reps = info["replacements"]
    try:
        bypasses = build_bypasses([r["bypass"] for r in reps], dtype, plugins)
    except SubFitError as exc:  # a kind from a plugin that is not installed here
        raise SubFitError(f"load_compressed: '{path}': {exc}") from None
    apply_bypasses(adapter, {Submodule(r["layer"], r["kind"]): b for r, b in zip(reps, bypasses)})
    for r in info.get("factored", []):  # low-rank linears: empty factors of the recorded shapes
        empty = FactoredLinear.empty(r["in"], r["out"], r["rank"], r["bias"], dtype)
        set_child(adapter.module(Submodule(r["layer"], r["kind"])), r["linear"], empty)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise SubFitError(f"load_compressed: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer
