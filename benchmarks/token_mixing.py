"""Would a removed attention's bypass do better if it saw the previous tokens too?

Every bypass SubFit fits today is position-local: y_t = W x_t + b on the submodule's normed input
at the same position, so it needs no state across tokens and runs under any KV cache. A removed
attention, though, mixed tokens. This benchmark measures what a token-mixing bypass would buy,
y_t = W0 x_t + W1 x_{t-1} (+ W2 x_{t-2}) + b, on the submodules a saved SubFit run removed:

- the run folder gives the replaced submodules (config.json) and its recipe (recipe.yaml), whose
  calibration windows are rebuilt exactly (same text, seed and sampled share);
- every replaced submodule is refitted in plain torch, in depth order, on the compressed model's
  own inputs against the dense model's contributions plus the recipe's share of the stream's drift
  (the anchored, drift-corrected fit of the default), full-rank ridge in float64, once per variant;
  only the attention bypasses' inputs differ between variants (FFN bypasses stay position-local);
- held-out perplexity on every domain the run measured and accuracy kept on the bundled cloze
  tasks, against the dense model of this process; the run's own model, loaded from its folder, is
  measured the same way beside them.

Full rank on purpose: the rows then show what the inputs allow, whatever the budget (the run's own
low-rank bypasses are the first row). Llama-layout decoders only (SmolLM2); this is a measurement,
not an engine feature: a token-mixing bypass needs a per-layer state in generation.

    subfit-run strategy=subfit sparsity=0.375 "eval.tasks=[]" output_dir=runs/subfit-375
    python benchmarks/token_mixing.py --run runs/subfit-375 --lags 0 0,1 0,1,2

Prints a table and writes benchmarks/results/token-mixing-SPARSITY.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from generalisation import CLOZE  # noqa: E402  (this folder is on the path: the script's own)

from subfit_core.artifact.folder import load_compressed  # noqa: E402
from subfit_core.config import validate  # noqa: E402
from subfit_core.engine.corpus import heldout_windows, make_windows  # noqa: E402
from subfit_core.engine.models import load_model  # noqa: E402
from subfit_core.engine.pipeline import domain_names, load_text, mix_generated  # noqa: E402
from subfit_core.engine.stats import ridge_solve  # noqa: E402
from subfit_core.evaluation.perplexity import perplexity as engine_perplexity  # noqa: E402
from subfit_core.evaluation.tasks import compare_tasks, run_tasks  # noqa: E402
from subfit_core.plugins import get_plugins  # noqa: E402
from subfit_core.recipes import load_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def lagged(x: torch.Tensor, lags: tuple[int, ...]) -> torch.Tensor:
    """[x_{t-k} for k in lags] + [1] along the last axis (zeros before a window's first token)."""
    parts = [x if k == 0 else F.pad(x, (0, 0, k, 0))[:, :-k] for k in lags]
    return torch.cat(parts + [torch.ones_like(x[..., :1])], dim=-1)


def ridge_fit(inputs: list[torch.Tensor], targets: list[torch.Tensor], lags: tuple[int, ...], ridge: float,
              name: str) -> torch.Tensor:
    """W minimising |lagged(X) W - Y|^2 with the engine's ridge (``ridge_solve``: relative to the mean
    input variance, the intercept not shrunk, float64); ``name`` is the submodule a NaN would name."""
    dim = inputs[0].shape[-1] * len(lags) + 1
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    cross = torch.zeros(dim, targets[0].shape[-1], dtype=torch.float64)
    for x, y in zip(inputs, targets):
        f = lagged(x.double(), lags).flatten(0, 1)
        gram += f.T @ f
        cross += f.T @ y.double().flatten(0, 1)
    return ridge_solve(gram, cross, ridge, name).float()


class LaggedBypass(torch.nn.Module):
    """y = lagged(x) W; returns what the submodule it replaces returned (attention: a pair)."""

    def __init__(self, weight: torch.Tensor, lags: tuple[int, ...], pair: bool):
        super().__init__()
        self.weight, self.lags, self.pair = weight, lags, pair

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        y = lagged(hidden_states, self.lags) @ self.weight
        return (y, None) if self.pair else y


def attention(layer, model, x: torch.Tensor) -> torch.Tensor:
    """The layer's attention on normed input ``x`` (causal: no mask given; positions from 0)."""
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    return layer.self_attn(hidden_states=x, position_embeddings=model.model.rotary_emb(x, positions),
                           attention_mask=None)[0]


@torch.inference_mode()
def refit(model, calib: torch.Tensor, replaced: set[tuple[int, str]], attn_lags: tuple[int, ...],
          drift: float, ridge: float, batch: int) -> dict[tuple[int, str], LaggedBypass]:
    """Every replaced submodule fitted in depth order on the compressed stream's inputs, against the
    dense contribution plus ``drift`` times (dense stream - compressed stream)."""
    dense = [model.model.embed_tokens(b) for b in calib.split(batch)]
    mine = [h.clone() for h in dense]
    bypasses = {}
    for i, layer in enumerate(model.model.layers):
        for kind, norm, run in (("attn", layer.input_layernorm, lambda x, layer=layer: attention(layer, model, x)),
                                ("ffn", layer.post_attention_layernorm, layer.mlp)):
            wanted = [run(norm(h)) for h in dense]
            if (i, kind) in replaced:
                lags = attn_lags if kind == "attn" else (0,)
                inputs = [norm(h) for h in mine]
                targets = [y + drift * (hd - hm) for y, hd, hm in zip(wanted, dense, mine)]
                weight = ridge_fit(inputs, targets, lags, ridge, f"L{i}.{kind}")
                got = [lagged(x, lags) @ weight for x in inputs]
                bypasses[(i, kind)] = LaggedBypass(weight, lags, pair=kind == "attn")
            else:
                got = [run(norm(h)) for h in mine]
            dense = [h + y for h, y in zip(dense, wanted)]
            mine = [h + y for h, y in zip(mine, got)]
    return bypasses


def perplexity(model, windows: torch.Tensor, batch: int) -> float:
    """The engine's held-out perplexity, on the CPU."""
    return engine_perplexity(model, windows, batch, torch.device("cpu"))


def measure(model, bypasses: dict, domains: dict[str, torch.Tensor], dense: dict[str, float], batch: int,
            tasks) -> dict:
    """Perplexity ratio per domain, and accuracy kept when ``tasks`` (a callable: model -> accuracy kept)
    is given, with ``bypasses`` in place of their submodules."""
    layers = model.model.layers
    own = [(layer.self_attn, layer.mlp) for layer in layers]
    for (i, kind), bypass in bypasses.items():
        setattr(layers[i], "self_attn" if kind == "attn" else "mlp", bypass)
    try:
        out: dict = {"ratios": {name: perplexity(model, ids, batch) / dense[name] for name, ids in domains.items()}}
        if tasks is not None:
            out["accuracy_kept"] = tasks(model)
        return out
    finally:
        for layer, (attn, mlp) in zip(layers, own):
            layer.self_attn, layer.mlp = attn, mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a saved subfit-run folder")
    parser.add_argument("--lags", nargs="+", default=["0", "0,1"], help="attention bypass inputs, e.g. 0 0,1 0,1,2")
    parser.add_argument("--ridge", type=float, default=1e-3, help="relative to the mean input variance")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tasks", nargs="*", default=list(CLOZE), help="accuracy kept on these (none: perplexity only)")
    parser.add_argument("--limit", type=int, default=100, help="items per task")
    args = parser.parse_args()
    run = Path(args.run)
    cfg = validate(load_yaml(run / "recipe.yaml", "--run"))
    replaced = {(r["layer"], r["kind"]) for r in json.loads((run / "config.json").read_text())["subfit"]["replacements"]}
    own = json.loads((run / "results.json").read_text())
    plugins = get_plugins()
    model, tokenizer, source = load_model(plugins, cfg["model"], torch.device("cpu"), torch.float32, False)
    model.eval()
    if not all(hasattr(layer, name) for layer in model.model.layers
               for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")):
        raise SystemExit(f"--run: {cfg['model']} does not have the Llama decoder layout this measurement needs")
    calib_text = load_text(plugins, cfg["calib"]["dataset"])
    windows = make_windows(calib_text, tokenizer, calib_samples=cfg["calib"]["samples"],
                           scoring_samples=cfg["scoring"]["samples"], seq_len=cfg["calib"]["seq_len"],
                           heldout=calib_text, eval_windows=cfg["eval"]["windows"],
                           eval_seq_len=cfg["eval"]["seq_len"], seed=cfg["seed"])
    mix_generated(windows, cfg, model, tokenizer, torch.device("cpu"))
    domains = {name: heldout_windows(load_text(plugins, name), tokenizer, cfg["eval"]["windows"], cfg["eval"]["seq_len"])
               for name in domain_names(plugins, cfg)}
    dense = {name: perplexity(model, ids, args.batch) for name, ids in domains.items()}
    tasks = None
    if args.tasks:
        def scores(m):
            return run_tasks(m, tokenizer, args.tasks, args.limit, args.batch, plugins, torch.device("cpu"))
        dense_tasks = scores(model)

        def tasks(m):
            return compare_tasks(dense_tasks, scores(m))["retained_accuracy"]
    saved, _ = load_compressed(run, dtype=torch.float32)
    saved.eval()
    rows = [{"attn_lags": None, "ratios": {name: perplexity(saved, ids, args.batch) / dense[name] for name, ids in domains.items()},
             **({"accuracy_kept": tasks(saved)} if tasks is not None else {})}]
    del saved
    print(rows[-1], flush=True)
    for spec in args.lags:
        lags = tuple(int(k) for k in spec.split(","))
        t0 = time.perf_counter()
        bypasses = refit(model, windows.calib, replaced, lags, cfg["drift_correction"], args.ridge, args.batch)
        rows.append({"attn_lags": lags, **measure(model, bypasses, domains, dense, args.batch, tasks),
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    names = list(domains)
    attns = sum(kind == "attn" for _, kind in replaced)
    lines = [f"{cfg['model']} ({source}), the {attns} attentions and {len(replaced) - attns} FFNs that {run} "
             f"removed (achieved {own['sparsity']['achieved_layers']:.4f}); calibration: {windows.source}, "
             f"{windows.calib.shape[0]} windows; drift correction {cfg['drift_correction']}; ridge {args.ridge}; "
             f"{cfg['eval']['windows']} x {cfg['eval']['seq_len']} held-out tokens per domain.", "",
             "| attention bypass inputs | " + " | ".join(names) + " | accuracy kept |", "|---|" + "---|" * (len(names) + 1)]
    for row in rows:
        label = ("the run's own low-rank bypasses (x_t), loaded from the folder" if row["attn_lags"] is None else
                 ", ".join("x_t" if k == 0 else f"x_t-{k}" for k in row["attn_lags"]) + " (full rank)")
        kept = row.get("accuracy_kept")
        lines.append(f"| {label} | " + " | ".join(f"{row['ratios'][n]:.2f}x" for n in names)
                     + f" | {'-' if kept is None else f'{kept:.3f}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results"
    (out / f"token-mixing-{cfg['sparsity']}.json").write_text(json.dumps({
        "model": cfg["model"], "source": source, "run": str(run), "replaced": sorted(replaced),
        "dense_ppl": dense, "rows": rows, "args": vars(args)}, indent=1, default=str))
    (out / f"token-mixing-{cfg['sparsity']}.md").write_text(text)


if __name__ == "__main__":
    main()
