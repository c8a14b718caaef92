"""``runner: {name: dynamic}``: per-prompt skipping delivered as a model folder.

``subfit-run strategy=subfit-dynamic`` builds the candidates (the recipe's static selection at
``pool`` x ``sparsity``, each with its fitted bypass), averages each candidate's harm over
calibration windows (the prior), measures held-out perplexity with a choice made per window from
probes of its first part (the prompt) and scored on the rest, and writes a folder that holds

* the dense model, unchanged, as a standard transformers checkpoint (config.json, safetensors,
  tokenizer): standard tools load it as the dense model, which is right, only without skipping;
* ``dynamic.safetensors``: the candidates' bypasses; ``dynamic.json``: the candidates, their
  bypass specs, savings and prior, and the skipping parameters;
* ``recipe.yaml``, ``results.json`` and a ``README.md`` saying how to load it;
* ``modeling_subfit_dynamic.py``, with ``auto_map`` and the spec in ``config.json``: transformers
  with ``trust_remote_code=True`` builds a model whose own ``generate`` skips per prompt (``standard``).

``load_dynamic(folder)`` returns the ``DynamicSkip`` that generates with per-prompt selection.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from subfit_core.engine.interfaces import Runner, Submodule
from subfit_core.errors import ConfigError, SubFitError, first_line
from subfit_core.progress import progress

from . import standard
from .skip import DynamicParams, DynamicSkip, token_costs

FORMAT = 1
SPEC, WEIGHTS = "dynamic.json", "dynamic.safetensors"


@dataclass
class Params:
    pool: float = 1.5  # candidates: the recipe's static selection at pool x sparsity
    probes: int = 16  # m random probes per choice (0: the calibration prior alone, one choice for every prompt)
    share: float = 0.1  # share of the probes that bypass each candidate
    every: int = 64  # while generating, choose again every this many tokens (0: once, at the prompt)
    solver: Literal["lasso", "omp"] = "lasso"
    lam: float = 0.05  # lasso penalty, relative to the largest correlation
    deviations: int = 4  # omp: at most this many candidates whose harm differs from the prior
    calibration: int = 4  # calibration windows the prior is averaged over
    prompt: float = 0.5  # held-out evaluation: share of each window that is the prompt; the rest is scored
    tokens: float = 0.0  # share of each prefilled context dropped from the KV cache, within the same budget
    window: int = 16  # the context's last positions, whose attention decides which tokens are dropped

    def __post_init__(self):
        if not 1.0 <= self.pool <= 10.0:
            raise ValueError(f"pool: {self.pool} must be in [1, 10] (candidates: the static selection at pool x sparsity)")
        if self.calibration < 1:
            raise ValueError(f"calibration: {self.calibration} must be at least 1")
        if not 0.0 < self.prompt < 1.0:
            raise ValueError(f"prompt: {self.prompt} must be in (0, 1)")
        if self.deviations < 1:
            raise ValueError(f"deviations: {self.deviations} must be at least 1")
        self.skip_params(0.25, 0)  # probes, share, every and solver are checked by DynamicParams

    def skip_params(self, budget: float, seed: int) -> DynamicParams:
        return DynamicParams(budget=budget, probes=self.probes, share=self.share, every=self.every, solver=self.solver,
                             lam=self.lam, sparsity=self.deviations, tokens=self.tokens, window=self.window, seed=seed)


class DynamicRunner(Runner):
    Params = Params
    description = "per-prompt skipping: each prompt chooses which candidate submodules to bypass, from probes"

    def run(self, session, cfg: dict, out_dir: Path | None) -> dict:
        p: Params = self.params
        self.check(session, cfg)
        if out_dir is not None:  # a folder standard tools could not load fails now, not after the work
            from subfit_core import __version__

            standard.modeling_source(session.model, getattr(session.adapter, "layout", None), [], __version__, WEIGHTS)
        t0 = time.perf_counter()
        static = {**cfg, "runner": {"name": "none"}, "save": False}
        dyn = DynamicSkip.from_session(session, static, p.skip_params(cfg["sparsity"], cfg["seed"]), pool=p.pool)
        dyn.calibrate(session.windows.calib[:p.calibration])
        build_s = session.sampling_s + session.stats_s + time.perf_counter() - t0
        t1 = time.perf_counter()
        results = report(dyn, session, cfg, evaluate(dyn, session, cfg, p.prompt), build_s)
        results["timings"]["evaluation_s"] = time.perf_counter() - t1
        if out_dir is not None:
            results["output_dir"] = str(out_dir)
            save_dynamic(dyn, session.tokenizer, out_dir, cfg, results)
        return results

    @classmethod
    def load(cls, path, device="cpu", dtype=None, plugins=None) -> tuple:
        """The folder as (model, tokenizer) for ``load_compressed``: a transformers model whose own
        ``generate`` skips per prompt (``standard``), its class built from this installation's source,
        not the folder's file; weights from safetensors only."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from subfit_core import __version__
        from subfit_core.engine.bypass import bypass_classes
        from subfit_core.engine.models import find_adapter
        from subfit_core.plugins import get_plugins

        path = Path(path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):  # the architecture and its adapter, no memory
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        plugins = plugins or get_plugins()
        adapter = find_adapter(plugins, skeleton)
        spec = getattr(config, standard.ENTRY, None)
        check_spec(spec, adapter.num_layers, f"load_compressed: '{path}/config.json': {standard.ENTRY}")
        kinds = bypass_classes(sorted({e["bypass"]["kind"] for e in spec["candidates"]}), plugins)
        source = standard.modeling_source(skeleton, adapter.layout, list(kinds.values()), __version__, WEIGHTS)
        model = standard.model_class(source).from_pretrained(path, dtype=dtype or "auto", use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return model.to(device).eval(), tokenizer

    def check_offload(self, mode: str) -> None:
        if mode != "none":
            raise ConfigError(f"offload: {mode}; the dynamic runner keeps every candidate's original and its bypass in "
                              "memory; set offload=none")

    def check(self, session, cfg: dict) -> None:
        if cfg["sparsity"] <= 0:
            raise ConfigError(f"sparsity: {cfg['sparsity']}; the dynamic runner skips this share per prompt, so it must "
                              "be above 0")
        if cfg["eval"]["tasks"] or cfg["eval"]["speed"]:
            key = "eval.tasks" if cfg["eval"]["tasks"] else "eval.speed"
            raise ConfigError(f"{key}: not measured for a per-prompt model yet (lm-eval and the speed benchmark run one "
                              f"fixed model); set {key}={'[]' if key == 'eval.tasks' else 'false'}")
        if self.params.tokens > 0:
            with torch.inference_mode():
                cache = session.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=session.device),
                                      use_cache=True).cache
            if any(layer.is_sliding for layer in cache.layers):
                raise ConfigError(f"runner.tokens: {self.params.tokens}; this model has sliding-window attentions, whose "
                                  "cache cannot drop tokens (a window counts positions); set runner.tokens=0")


# ----------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def continuation_nll(model, window: torch.Tensor, start: int) -> float:
    """Summed negative log-likelihood of ``window[start:]`` given everything before it."""
    logits = model(input_ids=window[None], use_cache=False).logits[0, start - 1:-1].float()
    return float(F.cross_entropy(logits, window[start:], reduction="sum"))


def evaluate(dyn: DynamicSkip, session, cfg: dict, prompt: float) -> dict:
    """Per domain: the dense and the per-prompt model's perplexity on the continuation of each held-out
    window, the choice made from probes of its prompt; and the savings and KV cache of the choices."""
    adapter, model = dyn.adapter, dyn.model
    layers = list(range(adapter.num_layers))
    domains, choices, dropped, kv = {}, [], [], []
    for name, ids in session.domains.items():
        split = max(1, int(ids.shape[1] * prompt))
        dense = compressed = 0.0
        for window in progress(ids.to(session.device), desc=f"per-prompt perplexity ({name})"):
            dense += continuation_nll(model, window, split)
            chosen = dyn.estimate(window[None, :split])
            dyn.use(chosen)
            compressed += dyn.continuation_nll(window, split) if dyn.p.tokens else continuation_nll(model, window, split)
            dyn.use(frozenset())
            choices.append(chosen)
            dropped.append(dyn.dropped)
            # per token of the window's context at its end: the dropped prompt tokens hold nothing
            kept = adapter.kv_bytes_per_token([i for i in layers if Submodule(i, "attn") not in chosen])
            kv.append(kept * (window.numel() - dyn.dropped) / window.numel())
        tokens = ids.shape[0] * (ids.shape[1] - split)
        domains[name] = {"dense": math.exp(dense / tokens), "compressed": math.exp(compressed / tokens),
                         "ratio": math.exp((compressed - dense) / tokens),
                         "calibrated": name == cfg["calib"]["dataset"]}
    return {"domains": domains, "choices": choices, "dropped": dropped, "kv": kv, "scored_share": 1 - prompt}


def report(dyn: DynamicSkip, session, cfg: dict, ev: dict, build_s: float) -> dict:
    from subfit_core.engine.budget import Budget
    from subfit_core.engine.pipeline import main_domain
    from subfit_core.evaluation.tasks import geometric_mean

    adapter, domains = dyn.adapter, ev["domains"]
    main = domains.get(main_domain(cfg)) or next(iter(domains.values()))
    other = [d["ratio"] for d in domains.values() if not d["calibrated"]]
    unit = cfg["sparsity_unit"]
    # what each prompt's choice skips, in both units: its submodules, and its dropped tokens in every
    # attention it keeps
    achieved = {}
    for u in ("layers", "params"):
        saving = {s: Budget(cfg["sparsity"], u, adapter).saving(s, dyn.charges.get(s, 0)) for s in dyn.candidates}
        cost = token_costs(adapter, u)
        achieved[u] = sum(sum(saving[s] for s in chosen) + n * sum(cost[l] for l in range(adapter.num_layers)
                                                                    if Submodule(l, "attn") not in chosen)
                          for chosen, n in zip(ev["choices"], ev["dropped"])) / len(ev["choices"])
    before = Budget(cfg["sparsity"], unit, adapter).decoder_params
    stored = sum(p.numel() for p in {id(p): p for b in dyn.bypasses.values() for p in b.parameters()}.values())
    return {
        "strategy": cfg["name"],
        "runner": cfg["runner"]["name"],
        "model": {"name": cfg["model"], "source": session.model_source, "architecture": type(session.model).__name__,
                  "layers": adapter.num_layers, "device": str(session.device), "dtype": cfg["dtype"]},
        "data": {"calibration": f"{cfg['calib']['samples']} x {cfg['calib']['seq_len']} tokens",
                 "heldout": f"{cfg['eval']['windows']} x {cfg['eval']['seq_len']} tokens, the last "
                            f"{ev['scored_share']:.0%} of each scored after a choice made on the rest",
                 "source": session.windows.source},
        "perplexity": {"dense": main["dense"], "compressed": main["compressed"], "ratio": main["ratio"],
                       "domains": domains, "out_of_domain_ratio": geometric_mean(other),
                       "note": "continuation perplexity: each held-out window's prompt chooses, the rest is scored"},
        "sparsity": {"requested": cfg["sparsity"], "unit": unit,
                     "achieved_layers": achieved["layers"], "achieved_params": achieved["params"],
                     "note": "mean over the held-out prompts of what each prompt's choice skips (submodules, and "
                             "the compute per decoded token of the context tokens it drops from the cache)"},
        "decoder_params": {"before": before, "after": before + stored, "bypass_params": stored,
                           "note": "stored: every original is kept next to its candidate's bypass"},
        "kv_cache_bytes_per_token": {"before": adapter.kv_bytes_per_token(list(range(adapter.num_layers))),
                                     "after": round(sum(ev["kv"]) / len(ev["kv"]))},
        "replaced": [],
        "dynamic": {"candidates": [s.name for s in dyn.candidates], "prior": [float(h) for h in dyn.prior],
                    "savings": {s.name: dyn.savings[s] for s in dyn.candidates},
                    "params": dataclasses.asdict(dyn.p), "probe_tokens": dyn.counts["probe"],
                    "prompt_tokens_dropped": sum(ev["dropped"]) / len(ev["dropped"])},
        "summary": [("candidates", ", ".join(s.name for s in dyn.candidates)),
                    ("probes per choice", str(dyn.p.probes)),
                    *((("prompt tokens dropped from the cache", f"{sum(ev['dropped']) / len(ev['dropped']):.1f} "
                        f"per prompt ({dyn.p.tokens:.0%})"),) if dyn.p.tokens else ())],
        "timings": {"compression_s": build_s, "statistics_s": session.stats_s, "sampling_s": session.sampling_s,
                    "statistics_from_cache": session.stats_cached, "dense_calibration_forward_s": session.dense_forward_s,
                    "compression_over_dense_forward": build_s / session.dense_forward_s},
        "notes": {},
    }


# ----------------------------------------------------------------------------- the folder


def bypass_dict(bypasses: dict[Submodule, nn.Module]) -> nn.ModuleDict:
    """The bypasses under the file's names ("7_ffn"), in the order given: candidate order, the one
    the loaders build them in (a group's shared tensor is stored under its first member)."""
    return nn.ModuleDict({f"{s.layer}_{s.kind}": b for s, b in bypasses.items()})


def write_bypasses(bypasses: nn.ModuleDict, file: Path) -> None:
    """The bypasses' weights, a tensor shared by a group (one basis) stored once under its first
    member's name: the name ``build_bypasses`` gives it when the loaders rebuild the group in the
    same order (safetensors' own ``save_model`` keeps the alphabetically first: "10_ffn" before "7_ffn")."""
    from safetensors.torch import save_file

    from subfit_core.artifact.folder import unique_tensors

    state = {name: t.detach().contiguous() for name, t in unique_tensors(bypasses)}
    save_file(state, str(file), metadata={"format": "pt"})


def save_dynamic(dyn: DynamicSkip, tokenizer, out_dir: Path, recipe: dict, results: dict) -> None:
    """Write the folder atomically (see the module docstring); the model must be dense (nothing skipped)."""
    from subfit_core import __version__
    from subfit_core.artifact.outputs import atomic_dir

    dyn.use(frozenset())
    spec = {"format": FORMAT, "unit": recipe["sparsity_unit"], "params": dataclasses.asdict(dyn.p),
            "candidates": [{"layer": s.layer, "kind": s.kind, "bypass": dyn.bypasses[s].spec(),
                            "saving": dyn.savings[s], "prior": float(h)} for s, h in zip(dyn.candidates, dyn.prior)]}

    code = standard.modeling_source(dyn.model, getattr(dyn.adapter, "layout", None), sorted({type(b) for b in dyn.bypasses.values()},
                                                                           key=lambda c: c.__name__), __version__, WEIGHTS)

    def write(tmp: Path) -> None:
        dyn.model.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        entries = standard.config_entries(spec, recipe["runner"]["name"])
        (tmp / "config.json").write_text(json.dumps({**config, **entries}, indent=2) + "\n")
        (tmp / standard.MODELING_FILE).write_text(code)
        tokenizer.save_pretrained(tmp)
        write_bypasses(bypass_dict({s: dyn.bypasses[s] for s in dyn.candidates}), tmp / WEIGHTS)
        (tmp / SPEC).write_text(json.dumps(spec, indent=1) + "\n")
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        (tmp / "README.md").write_text(card(results))

    atomic_dir(out_dir, write)


def card(results: dict) -> str:
    d, p = results["dynamic"], results["perplexity"]
    return (f"# {results['model']['name']}, per-prompt skipping (SubFit `{results['strategy']}`)\n\n"
            f"Each prompt bypasses about {results['sparsity']['requested']:.3f} ({results['sparsity']['unit']}) of the "
            f"decoder, chosen among {len(d['candidates'])} candidates ({', '.join(d['candidates'])}) from "
            f"{d['params']['probes']} probes, again every {d['params']['every']} generated tokens.\n\n"
            f"Held-out continuation perplexity: {p['dense']:.2f} dense, {p['compressed']:.2f} per-prompt "
            f"({p['ratio']:.2f}x).\n\n"
            "```python\nfrom subfit_plugins.dynamic.runner import load_dynamic\n\n"
            "dyn = load_dynamic(\"path/to/this/folder\")\nids = dyn.generate(prompt_ids, 64)   # greedy, per-prompt choice\n"
            "```\n\nWith transformers alone, `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` "
            "runs `modeling_subfit_dynamic.py` (read it first) and its `generate` skips per prompt, choosing once per "
            "call; without `trust_remote_code` the folder is a standard checkpoint of the dense model, loaded whole, "
            "correct but without skipping.\n")


def check_spec(spec, layers: int, where: str) -> list[Submodule]:
    """The candidates of a saved per-prompt spec, every field that selects code or shapes checked:
    candidates against the model's layers and attn/ffn, bypass kinds against the installed registry,
    widths and ranks as positive integers, the skipping parameters as ``DynamicParams`` checks them."""
    from subfit_core.engine.bypass import bypass_classes

    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else spec
        raise SubFitError(f"{where} is format {found!r}; this version reads {FORMAT}")
    try:
        entries = spec["candidates"]
        subs = [Submodule(int(e["layer"]), str(e["kind"])) for e in entries]
        for s in subs:
            if not (0 <= s.layer < layers and s.kind in ("attn", "ffn")):
                raise ValueError(f"candidate {s.name} is not a submodule of this model")
        for e in entries:
            if not isinstance(e["bypass"], dict):
                raise ValueError(f"candidate {e['layer']}.{e['kind']}: bypass {e['bypass']!r} is not an object")
            for key in ("saving", "prior"):
                if isinstance(e[key], bool) or not isinstance(e[key], (int, float)) or not math.isfinite(e[key]):
                    raise ValueError(f"candidate {e['layer']}.{e['kind']}: {key} {e[key]!r} is not a finite number")
        shapes = [v for e in entries for k, v in e["bypass"].items() if k in ("dim", "rank", "hidden")]
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in shapes):
            raise ValueError("a bypass width or rank is not a positive integer")
        bypass_classes([e["bypass"]["kind"] for e in entries])
        params = spec["params"]
        for key in ("probes", "every", "window", "sparsity", "seed"):
            if key in params and (isinstance(params[key], bool) or not isinstance(params[key], int)):
                raise ValueError(f"params.{key} {params[key]!r} is not an integer")
        DynamicParams(**params)
        if spec["unit"] not in ("layers", "params"):
            raise ValueError(f"unit {spec['unit']!r} is not layers or params")
    except SubFitError as exc:
        raise SubFitError(f"{where}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SubFitError(f"{where}: {first_line(exc)}") from None
    return subs


def load_dynamic(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DynamicSkip:
    """The per-prompt model saved in ``path``: the dense model with every candidate's bypass beside it."""
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    from subfit_core.engine.bypass import build_bypasses
    from subfit_core.engine.models import find_adapter
    from subfit_core.plugins import get_plugins

    path = Path(path)
    try:
        spec = json.loads((path / SPEC).read_text())
    except FileNotFoundError:
        raise SubFitError(f"load_dynamic: '{path}' holds no {SPEC} (not a per-prompt SubFit model)") from None
    except json.JSONDecodeError as exc:
        raise SubFitError(f"load_dynamic: '{path / SPEC}' is not JSON ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:  # before the model loads
        check_spec(spec, 0, f"load_dynamic: '{path / SPEC}'")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", trust_remote_code=False,
                                                 use_safetensors=True).to(device).eval()
    adapter = find_adapter(get_plugins(), model)
    subs = check_spec(spec, adapter.num_layers, f"load_dynamic: '{path}'")
    entries = spec["candidates"]
    try:
        bypasses = dict(zip(subs, build_bypasses([e["bypass"] for e in entries], model.dtype)))
        load_model(bypass_dict(bypasses), str(path / WEIGHTS), device=str(device))
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:  # a file that does not match the model
        raise SubFitError(f"load_dynamic: '{path}': {first_line(exc)}") from None
    dyn = DynamicSkip(adapter, {s: b.to(device) for s, b in bypasses.items()},
                      {s: float(e["saving"]) for s, e in zip(subs, entries)}, DynamicParams(**spec["params"]),
                      spec["unit"])
    dyn.prior = torch.tensor([float(entries[subs.index(s)]["prior"]) for s in dyn.candidates], dtype=torch.float64)
    return dyn
