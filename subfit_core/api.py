"""The Python API, for notebooks and pipelines: ``compress`` a model (loaded or named) by a recipe,
get the compressed model and its report back, and ``save`` it as a standard-tools model.

    from subfit_core import compress, save
    model, report = compress("smollm2-135m", recipe="subfit", calibration=my_texts, sparsity=0.25)
    print(report)                       # the subfit-run summary table
    save(model, report, "runs/mine")    # loads back with AutoModelForCausalLM(..., trust_remote_code=True)

Recipe keys are keyword arguments: ``sparsity=0.25``, a section as a dict (``calib={"samples": 32}``)
or dotted (``**{"calib.samples": 32}``); they are validated like ``subfit-run key=value``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subfit_core.engine.corpus import CorpusText
from subfit_core.errors import ConfigError

HELDOUT_EVERY = 10  # every 10th calibration text is held out for the reported perplexity
CALIBRATION = "calibration"  # the name a run gives text passed in as a list or a Dataset


@dataclass
class Report:
    """What one compression measured (``results``, as in results.json), the resolved recipe, and the
    tokenizer and layout that ``save`` writes with the model (``stream``: where a model compressed with
    streamed weights reads the weights it does not hold)."""

    results: dict
    recipe: dict
    tokenizer: Any = field(repr=False)
    layout: Any = field(repr=False)
    stream: Any = field(default=None, repr=False)

    def __getitem__(self, key: str):
        return self.results[key]

    def __str__(self) -> str:
        from subfit_core.apps.cli import summary

        return summary(self.results)


def resolve(recipe: str | dict | None, overrides: dict) -> dict:
    from subfit_core.config import apply_overrides, flatten, validate
    from subfit_core.plugins import get_plugins
    from subfit_core.recipes import read_recipe

    if recipe is None:
        from subfit_core.apps.cli import default_strategy

        recipe = default_strategy()
    data = dict(recipe) if isinstance(recipe, dict) else read_recipe(get_plugins(), str(recipe))[0]
    return validate(apply_overrides(data, flatten(overrides)))


def calibration_text(texts) -> CorpusText:
    """A list of strings, or a ``datasets.Dataset`` with a ``text`` column, as a text source: every
    10th text is held out for the reported perplexity, the rest is calibration."""
    if hasattr(texts, "column_names"):  # a datasets.Dataset
        if "text" not in texts.column_names:
            raise ConfigError(f"calibration: the Dataset has no 'text' column (columns: {', '.join(texts.column_names)})")
        texts = texts["text"]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if len(texts) < 2:
        raise ConfigError("calibration: give at least two non-empty texts (one in ten is held out for perplexity)")
    held_out = {i for i in range(len(texts)) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1} or {len(texts) - 1}
    train = [t for i, t in enumerate(texts) if i not in held_out]
    held = [texts[i] for i in sorted(held_out)]
    return CorpusText(CALIBRATION, "\n\n".join(train), "\n\n".join(held), f"{len(texts)} texts passed to compress()")


def compress(model: str | nn.Module, tokenizer=None, recipe: str | dict | None = None, calibration=None,
             **overrides) -> tuple[nn.Module, Report]:
    """Compress ``model`` by ``recipe`` (a registered recipe's name, a YAML path or a dict; None: the
    plugins' default strategy); returns (the compressed model, its Report).

    ``model``: a loaded causal LM (compressed in place; give its ``tokenizer``), or what ``model=``
    takes in a recipe (a registered name, a local folder or a hub id). ``calibration``: None (the
    recipe's ``calib.dataset``), a registered text source or a file path, a list of strings, or a
    ``datasets.Dataset`` with a ``text`` column. No model is saved: call ``save``. A named model too large
    for memory is streamed (``offload``): the returned model then holds no weights of its own (each
    module reads them when it runs), so save it with ``save``, which reads them back, not ``save_pretrained``.
    """
    from subfit_core.engine.models import resolve_device
    from subfit_core.engine.pipeline import check_before_work, open_session
    from subfit_core.engine.pipeline import compress as run_compression

    t_start = time.perf_counter()
    texts = {}
    if isinstance(calibration, str):
        overrides = {**overrides, "calib.dataset": calibration}
    elif calibration is not None:
        texts[CALIBRATION] = calibration_text(calibration)
        overrides = {**overrides, "calib.dataset": CALIBRATION}
    loaded = None
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ConfigError("tokenizer: compress() of a loaded model needs its tokenizer")
        placed = sorted({str(where) for where in (getattr(model, "hf_device_map", None) or {}).values()})
        if len(placed) > 1:  # accelerate's hooks would keep moving each layer's inputs to where it was put
            raise ConfigError(f"model: compress() of a loaded model needs it on one device; this one is spread by "
                              f"device_map over {', '.join(placed)}; pass its folder or name instead (offload=auto "
                              "streams a model that does not fit)")
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        overrides = {"model": getattr(model.config, "_name_or_path", "") or type(model).__name__, "dtype": dtype,
                     **overrides}
        loaded = (model, tokenizer, f"{type(model).__name__} passed to compress()")
    elif isinstance(model, str):
        overrides = {**overrides, "model": model}
    else:
        raise ConfigError(f"model: expected a loaded causal LM or a name/path, got {type(model).__name__}")
    cfg = resolve(recipe, {**overrides, "save": False})
    if loaded is not None and cfg["offload"] not in ("auto", "none"):
        raise ConfigError(f"offload: '{cfg['offload']}' streams a model's weights, and a model passed to compress() is "
                          "already in memory; allowed with a loaded model: auto, none (pass its folder or name to stream it)")
    check_before_work(cfg)
    if loaded is not None:
        loaded = (loaded[0].to(device=resolve_device(cfg["device"]), dtype=getattr(torch, cfg["dtype"])), *loaded[1:])
    session = open_session(cfg, loaded=loaded, texts=texts)
    outcome = run_compression(session, cfg)
    outcome.results["timings"]["total_s"] = time.perf_counter() - t_start
    return session.model, Report(outcome.results, cfg, session.tokenizer, session.adapter.layout, session.bench.stream)


def save(model: nn.Module, report: Report, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (compressed by ``compress``) to ``output_dir`` atomically, in the layout that
    transformers, pipelines and lm-eval load with ``trust_remote_code=True``; returns the folder."""
    from subfit_core.artifact.folder import describe, save_compressed
    from subfit_core.artifact.outputs import check_output_dir, claim
    from subfit_core.engine.models import find_adapter
    from subfit_core.plugins import get_plugins

    out = check_output_dir(output_dir, overwrite)
    replacements, factored = describe(find_adapter(get_plugins(), model))
    results = {**report.results, "output_dir": str(out)}
    with claim(out):
        save_compressed(model, report.tokenizer, replacements, out, {**report.recipe, "output_dir": str(out)}, results,
                        factored, layout=report.layout, stream=report.stream)
    return out
