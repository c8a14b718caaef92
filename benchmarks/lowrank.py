"""Low-rank factorization on one model at several kept ratios, all in one process from one session:
plain SVD, SVD-LLM without and with block refinement, AA-SVD without and with block refinement,
SubFit alone, and the hybrids (SubFit removal + AA-SVD or SVD-LLM) at the same total budget.

    python benchmarks/lowrank.py                               # SmolLM2-135M, kept ratios 0.8 and 0.6
    python benchmarks/lowrank.py --ratios 0.8 -- calib.samples=16

The budget: a kept ratio rho keeps rho of the decoder's linear-layer weights (embeddings, lm_head
and norms are never factored), i.e. removes (1 - rho) x linear / decoder parameters; SubFit
alone and the hybrid get exactly that share in the ``params`` unit. Prints a markdown table and
writes benchmarks/results/lowrank.{json,md} (after every row, so a partial run keeps its rows)
and docs/results/lowrank/ppl_vs_kept.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from subfit_core.apps.cli import resolve_recipe  # noqa: E402
from subfit_core.engine.factorize import parameter_counts  # noqa: E402
from subfit_core.engine.pipeline import SESSION_KEYS, compress, open_session  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def variants(ratio: float, total: float, refine_steps: int, removal_share: float) -> list[tuple[str, list[str]]]:
    kept = f"factorizer.kept_ratio={ratio}"
    return [
        ("svd", ["strategy=svd", kept]),
        ("svd-llm", ["strategy=svd-llm", kept]),
        # refinement is not part of SVD-LLM; this row separates what anchoring and refinement each give
        ("svd-llm + refine", ["strategy=svd-llm", kept, f"factorizer.refine_steps={refine_steps}"]),
        ("aa-svd", ["strategy=aa-svd", kept, "factorizer.refine_steps=0"]),
        ("aa-svd + refine", ["strategy=aa-svd", kept, f"factorizer.refine_steps={refine_steps}"]),
        ("subfit", ["strategy=subfit", f"sparsity={total}", "sparsity_unit=params"]),
        (f"subfit + aa-svd ({removal_share:g} removal)",
         ["strategy=subfit-svd", kept, f"factorizer.removal_share={removal_share}", f"factorizer.refine_steps={refine_steps}"]),
        # the same hybrid with the whitened factorizer (no anchoring, no refinement), like svd-llm alone
        (f"subfit + svd-llm ({removal_share:g} removal)",
         ["strategy=subfit-svd", f"factorizer={{name: svd-llm, kept_ratio: {ratio}, removal_share: {removal_share}}}"]),
    ]


def row_of(label: str, ratio: float, res: dict, seconds: float) -> dict:
    fz = res.get("factorization", {})
    attn = sum(1 for r in res["replaced"] if r["type"] == "attn")
    return {
        "method": label, "kept_ratio": ratio, "ppl": res["perplexity"]["compressed"], "ppl_ratio": res["perplexity"]["ratio"],
        "achieved_params": res["sparsity"]["achieved_params"], "decoder_params_after": res["decoder_params"]["after"],
        "removed": f"{attn} attn + {len(res['replaced']) - attn} ffn" if res["replaced"] else "-",
        "factor_kept_ratio": fz.get("achieved_kept_ratio"), "factored_linears": fz.get("linears", 0),
        "regularised": len(fz.get("regularised", [])),
        "refine_s": fz.get("seconds", {}).get("refine_s", 0.0), "factorize_s": fz.get("seconds", {}).get("total_s", 0.0),
        "compression_s": res["timings"]["compression_s"], "wall_s": seconds,
        "refined_layers_kept": sum(1 for r in fz.get("refinement", []) if r["kept"]),
    }


def table(rows: list[dict]) -> str:
    lines = ["| kept ratio | method | ppl ratio | achieved sparsity (params) | decoder params after | removed submodules | "
             "factorization s | of which refinement s |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['kept_ratio']:.2f} | {r['method']} | {r['ppl_ratio']:,.2f}x | {r['achieved_params']:.4f} | "
                     f"{r['decoder_params_after']:,} | {r['removed']} | {r['factorize_s']:.0f} | {r['refine_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from subfit_core.apps.plotting import pyplot, ratio_lines, save_ratio_plot

    fig, ax = pyplot().subplots(figsize=(7.2, 4.8))
    series = {name: [(r["kept_ratio"], r["ppl_ratio"]) for r in rows if r["method"] == name]
              for name in dict.fromkeys(r["method"] for r in rows)}
    ratio_lines(ax, series)  # plain SVD (10^5x and more) is left out and named in the title
    ax.invert_xaxis()
    save_ratio_plot(fig, ax, path, "kept ratio of decoder linear weights (same total budget for every method)",
                    "perplexity ratio (compressed / dense)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--refine-steps", type=int, default=32)
    parser.add_argument("--removal-share", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results" / "lowrank")
    parser.add_argument("--replot", action="store_true", help="only rewrite the table and plot from the JSON")
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods (labels as in the table, "
                        "'aa-svd + refine'); their rows replace same-named rows of the existing JSON, others are kept")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((args.out / "lowrank.json").read_text())
        write_docs(saved["rows"], saved["meta"], args.docs)
        return 0

    base = resolve_recipe(["strategy=svd", "save=false", *args.overrides])
    session = open_session(base)
    meta = (f"Model {base['model']}, dense held-out perplexity {session.dense_ppl:.2f} "
            f"({base['eval']['windows']} x {base['eval']['seq_len']} tokens, {base['calib']['dataset']} held-out); "
            f"calibration {base['calib']['samples']} x {base['calib']['seq_len']}; device {session.device}, "
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
            f"refinement {args.refine_steps} steps x {2} windows per layer; hybrid removal share {args.removal_share}.")
    rows: list[dict] = []
    if args.only and (args.out / "lowrank.json").exists():
        rows = [r for r in json.loads((args.out / "lowrank.json").read_text())["rows"] if r["method"] not in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    args.docs.mkdir(parents=True, exist_ok=True)
    order = [label for label, _ in variants(0.8, 0.2, args.refine_steps, args.removal_share)]
    for ratio in args.ratios:
        linear, decoder = parameter_counts(session.bench)
        total = (1.0 - ratio) * linear / decoder  # what kept_ratio removes, as a share of the decoder
        for label, argv in variants(ratio, total, args.refine_steps, args.removal_share):
            if args.only and label not in args.only:
                continue
            cfg = resolve_recipe([*argv, "save=false", *args.overrides])
            cfg.update({k: base[k] for k in SESSION_KEYS})
            t0 = time.perf_counter()
            try:
                res = compress(session, cfg).results
            except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others
                print(f"failed {ratio} {label}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                session.bench.restore()
                continue
            session.bench.restore()
            row = row_of(label, ratio, res, time.perf_counter() - t0)
            rows.append(row)
            rows.sort(key=lambda r: (-r["kept_ratio"], order.index(r["method"]) if r["method"] in order else len(order)))
            print(f"done {ratio} {label}: {row['ppl_ratio']:.2f}x in {row['wall_s']:.0f} s", file=sys.stderr, flush=True)
            (args.out / "lowrank.json").write_text(json.dumps({"meta": meta, "overrides": args.overrides, "rows": rows}, indent=2))
            (args.out / "lowrank.md").write_text(table(rows) + "\n\n" + meta + "\n")
    write_docs(rows, meta, args.docs)
    return 0


def write_docs(rows: list[dict], meta: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    plot(rows, folder / "ppl_vs_kept.png")
    (folder / "table.md").write_text(table(rows) + "\n\n" + meta + "\n")
    print(table(rows))
    print(meta)


if __name__ == "__main__":
    raise SystemExit(main())
