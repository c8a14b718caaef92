"""``subfit-run``: one compression run from a validated recipe to a saved model and results.json.

The engine knows no method: the scorer, selector and fitter named in the recipe do the choosing
and fitting; this module only moves data between them in a fixed order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifact import check_output_dir, save_compressed
from .budget import Budget
from .corpus import CorpusText, make_windows
from .errors import SubFitError
from .metrics import forward_seconds, perplexity
from .models import find_adapter, load_model, resolve_device
from .plugins import Plugins, build_component, get_plugins
from .surgery import apply_bypasses, records, split_bypass_params
from .trace import Workbench

log = logging.getLogger("subfit")


@dataclass
class Components:
    scorer: object
    selector: object
    fitter: object


def build_components(plugins: Plugins, cfg: dict) -> Components:
    """Validate every component's parameters before any expensive work starts."""
    return Components(
        scorer=build_component(plugins, "scorer", cfg["scorer"], "scorer"),
        selector=build_component(plugins, "selector", cfg["selector"], "selector"),
        fitter=build_component(plugins, "fitter", cfg["fitter"], "fitter"),
    )


def load_text(plugins: Plugins, name: str) -> CorpusText:
    """A registered text source, or a local .txt/.json/.jsonl file."""
    try:
        if name in plugins.dataset:
            return plugins.dataset.get(name)()
        if Path(name).suffix or Path(name).exists():
            return plugins.dataset.get("local-file")(name)
    except ValueError as exc:  # loaders raise ValueError with a one-line, user-facing message
        raise SubFitError(str(exc)) from None
    plugins.dataset.get(name)  # raises the unknown-name error with a suggestion
    raise AssertionError("unreachable")


def run(cfg: dict) -> dict:
    t_start = time.perf_counter()
    plugins = get_plugins()
    comps = build_components(plugins, cfg)
    out_dir = check_output_dir(cfg["output_dir"], cfg["overwrite"]) if cfg["save"] else None
    torch.manual_seed(cfg["seed"])
    device = resolve_device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])

    model, tokenizer, model_source = load_model(plugins, cfg["model"], device, dtype, cfg["trust_remote_code"])
    model.eval()
    adapter = find_adapter(plugins, model)
    calib_text = load_text(plugins, cfg["calib"]["dataset"])
    eval_text = load_text(plugins, cfg["eval"]["dataset"]) if cfg["eval"]["dataset"] else calib_text
    windows = make_windows(
        calib_text, tokenizer, calib_samples=cfg["calib"]["samples"], scoring_samples=cfg["scoring"]["samples"],
        seq_len=cfg["calib"]["seq_len"], heldout=eval_text, eval_windows=cfg["eval"]["windows"],
        eval_seq_len=cfg["eval"]["seq_len"], seed=cfg["seed"])
    budget = Budget(cfg["sparsity"], cfg["sparsity_unit"], adapter)

    ppl_dense = perplexity(model, windows.heldout, cfg["eval"]["batch_size"], device, "dense perplexity")
    dense_forward_s = forward_seconds(model, windows.calib, cfg["calib"]["batch_size"], device)

    # --- compression: everything from here to the fitted bypasses is timed
    t0 = time.perf_counter()
    bench = Workbench(model, adapter, windows, cfg["calib"]["batch_size"], device, cfg["scoring"]["stride"])
    bench.collect()
    t_stats = time.perf_counter() - t0
    plan = comps.selector.select(bench, comps.scorer, comps.fitter, budget)
    t_select = time.perf_counter() - t0 - t_stats
    selected = plan.subs
    comps.fitter.prepare(selected, bench.stats)
    if cfg["anchored"]:
        bypasses = bench.refit_anchored(comps.fitter, selected)
        bench.restore()
    else:
        bench.restore()
        bypasses = {s: comps.fitter.fit(s, bench.stats[s]).to(device, dtype) for s in selected}
    apply_bypasses(adapter, bypasses)
    compression_s = time.perf_counter() - t0

    ppl = perplexity(model, windows.heldout, cfg["eval"]["batch_size"], device, "compressed perplexity")
    own, shared = split_bypass_params(bypasses)
    n_layers = adapter.num_layers
    kept_attn = n_layers - sum(1 for s in selected if s.kind == "attn")
    decoder_before = budget.decoder_params
    decoder_after = decoder_before - sum(adapter.param_count(s) for s in selected) + sum(own.values()) + shared
    results = {
        "strategy": cfg["name"],
        "model": {"name": cfg["model"], "source": model_source, "architecture": type(model).__name__,
                  "layers": n_layers, "device": str(device), "dtype": cfg["dtype"]},
        "data": {"calibration": f"{cfg['calib']['samples']} x {cfg['calib']['seq_len']} tokens",
                 "scoring": f"{cfg['scoring']['samples']} x {cfg['calib']['seq_len']} tokens",
                 "heldout": f"{cfg['eval']['windows']} x {cfg['eval']['seq_len']} tokens",
                 "source": windows.source},
        "perplexity": {"dense": ppl_dense, "compressed": ppl, "ratio": ppl / ppl_dense},
        "sparsity": budget.report(own, shared),
        "decoder_params": {"before": decoder_before, "after": decoder_after,
                           "bypass_params": sum(own.values()) + shared,
                           "note": "decoder layers only; embeddings and lm_head excluded"},
        "kv_cache_bytes_per_token": {"before": adapter.kv_bytes_per_token(n_layers),
                                     "after": adapter.kv_bytes_per_token(kept_attn)},
        "replaced": [{"layer": s.layer, "type": s.kind, "bypass": bypasses[s].spec()["kind"],
                      "rank": bypasses[s].spec().get("rank", bypasses[s].spec().get("dim")),
                      "score": r.score} for r in plan.replacements for s in [r.sub]],
        "timings": {"compression_s": compression_s, "statistics_s": t_stats, "selection_s": t_select,
                    "dense_calibration_forward_s": dense_forward_s,
                    "compression_over_dense_forward": compression_s / dense_forward_s,
                    "scoring_evaluations": bench.evaluations, "total_s": None},
        "notes": plan.notes,
    }
    if out_dir is not None:
        results["output_dir"] = str(out_dir)
        results["timings"]["total_s"] = time.perf_counter() - t_start
        save_compressed(model, tokenizer, records(bypasses), out_dir, cfg, results)
    results["timings"]["total_s"] = time.perf_counter() - t_start
    return results
