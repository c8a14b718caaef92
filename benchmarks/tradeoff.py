"""The perplexity-accuracy trade-off from stored generalisation rows: one curve per variant through
its levels, on the calibration domain and on the domains not calibrated on (subfit-compare's
trade-off plots, drawn from benchmarks/results/generalisation-SET.json files; nothing is rerun).

    python benchmarks/tradeoff.py --sets deep baselines bracket patch --out benchmarks/results/tradeoff \\
        --only "subfit (default: anchored, drift correction 0.5)" "subfit, anchored (previous default)" \\
               "shortgpt, same calibration" "sleb, same calibration"

Rows of one variant from several sets join one curve. Prints the points as a markdown table and
writes OUT/tradeoff.png, OUT/ood_tradeoff.png and OUT/points.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from subfit_core.apps.compare import plot_tradeoff

ROOT = Path(__file__).resolve().parent.parent


def points(sets: list[str], only: list[str] | None) -> list[dict]:
    rows = []
    for name in sets:
        path = ROOT / "benchmarks" / "results" / f"generalisation-{name}.json"
        for r in json.loads(path.read_text())["rows"]:
            if r.get("retained_accuracy") is None or (only and r["variant"] not in only):
                continue
            rows.append({"strategy": r["variant"], "sparsity": r["sparsity"], "achieved_layers": r["achieved_layers"],
                         "ppl_ratio": r["in_domain_ratio"], "ood_ppl_ratio": r["out_of_domain_ratio"],
                         "retained_accuracy": r["retained_accuracy"], "set": name})
    missing = sorted(set(only or []) - {r["strategy"] for r in rows})
    if missing:
        raise SystemExit(f"--only: no row with accuracy for {missing} in sets {sets}")
    return sorted(rows, key=lambda r: (r["strategy"], r["achieved_layers"]))


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | achieved (layers) | in domain | out of domain (geo-mean) | accuracy kept | from |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {r['achieved_layers']:.4f} | {r['ppl_ratio']:.2f}x | {r['ood_ppl_ratio']:.2f}x | "
              f"{r['retained_accuracy']:.3f} | generalisation-{r['set']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", required=True, help="result files generalisation-SET.json to read")
    parser.add_argument("--only", nargs="+", help="variants to draw (default: every row with accuracy)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = points(args.sets, args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(rows, args.out)
    (args.out / "points.json").write_text(json.dumps({"sets": args.sets, "rows": rows}, indent=1))
    (args.out / "points.md").write_text(markdown(rows))
    print(markdown(rows))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
