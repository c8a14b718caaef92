"""SubFit against plain removal of the same submodules and against whole-layer Block-Influence
deletion (ShortGPT), on one model at several sparsities, all in one process from one dense pass.

    python benchmarks/sparsity_sweep.py                      # SmolLM2-135M, 12.5 / 25 / 37.5 %
    python benchmarks/sparsity_sweep.py --levels 0.25 -- calib.samples=32 anchored=true

Prints a markdown table and writes benchmarks/results/sparsity_sweep.{json,md}. Ratios are
measured in one run (perplexity over the same dense model, time over the same dense forward).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from subfit_core.apps.cli import resolve_recipe  # noqa: E402
from subfit_core.apps.compare import strategy_config  # noqa: E402
from subfit_core.engine.bypass import ZeroBypass  # noqa: E402
from subfit_core.engine.pipeline import compress, open_session  # noqa: E402
from subfit_core.evaluation.perplexity import perplexity  # noqa: E402


def plain_removal_ppl(session, subs, batch_size: int) -> float:
    """Perplexity with the same submodules removed outright (no bypass)."""
    session.bench.restore()
    session.bench.apply({s: ZeroBypass() for s in subs})
    ppl = perplexity(session.model, session.windows.heldout, batch_size, session.device, "plain removal")
    session.bench.restore()
    return ppl


def split(replaced: list[dict]) -> str:
    attn = sum(1 for r in replaced if r["type"] == "attn")
    return f"{attn} attn + {len(replaced) - attn} ffn"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.125, 0.25, 0.375])
    parser.add_argument("--baseline", default="shortgpt", help="recipe to compare against")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the SubFit recipe")
    args = parser.parse_args()

    # cache_stats=false: the statistics pass is part of the compression time being measured
    args.overrides = ["cache_stats=false", *args.overrides]
    base = resolve_recipe(["strategy=subfit", "save=false", *args.overrides])
    session = open_session(base)
    rows = []
    for level in args.levels:
        cfg = resolve_recipe(["strategy=subfit", "save=false", f"sparsity={level}", *args.overrides])
        ours = compress(session, cfg).results
        chosen = {(r["layer"], r["type"]) for r in ours["replaced"]}
        subs = [s for s in session.bench.subs if (s.layer, s.kind) in chosen]
        removed = plain_removal_ppl(session, subs, session.batch_sizes["eval"])
        bcfg = strategy_config(args.baseline, level, [], base)  # same model, data and evaluation
        theirs = compress(session, bcfg).results
        dense = ours["perplexity"]["dense"]
        row = {
            "sparsity": level,
            "dense_ppl": dense,
            "subfit_ratio": ours["perplexity"]["ratio"],
            "plain_removal_ratio": removed / dense,
            "baseline": args.baseline,
            "baseline_ratio": theirs["perplexity"]["ratio"],
            "subfit_achieved_layers": ours["sparsity"]["achieved_layers"],
            "baseline_achieved_layers": theirs["sparsity"]["achieved_layers"],
            "subfit_split": split(ours["replaced"]),
            "kv_saving": 1 - ours["kv_cache_bytes_per_token"]["after"] / ours["kv_cache_bytes_per_token"]["before"],
            "compression_over_dense_forward": ours["timings"]["compression_over_dense_forward"],
            "compression_s": ours["timings"]["compression_s"],
            "statistics_s": ours["timings"]["statistics_s"],
            "selection_s": ours["timings"]["selection_s"],
            "dense_forward_s": ours["timings"]["dense_calibration_forward_s"],
            "subfit_replaced": [f"L{r['layer']}.{r['type']}" for r in ours["replaced"]],
        }
        rows.append(row)
        print(f"done {level}: subfit {row['subfit_ratio']:.2f}x, plain removal {row['plain_removal_ratio']:.2f}x, "
              f"{args.baseline} {row['baseline_ratio']:.2f}x", file=sys.stderr)

    header = ("| sparsity (layers) | SubFit ppl ratio | same selection, plain removal | "
              f"{args.baseline} ppl ratio | SubFit achieved | {args.baseline} achieved | SubFit split | "
              "KV-cache saving | compression / dense forward |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['sparsity']:.3f} | {r['subfit_ratio']:.2f}x | {r['plain_removal_ratio']:.2f}x | "
                     f"{r['baseline_ratio']:.2f}x | {r['subfit_achieved_layers']:.4f} | {r['baseline_achieved_layers']:.4f} | "
                     f"{r['subfit_split']} | {r['kv_saving']:.1%} | {r['compression_over_dense_forward']:.2f}x |")
    meta = (f"Model {base['model']}, dense held-out perplexity {rows[0]['dense_ppl']:.2f} "
            f"({base['eval']['windows']} x {base['eval']['seq_len']} tokens, {base['calib']['dataset']} held-out); "
            f"calibration {base['calib']['samples']} x {base['calib']['seq_len']}; "
            f"device {session.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads.")
    table = "\n".join(lines)
    print(table)
    print(meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparsity_sweep.json").write_text(json.dumps({"meta": meta, "overrides": args.overrides, "rows": rows}, indent=2))
    (args.out / "sparsity_sweep.md").write_text(table + "\n\n" + meta + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
