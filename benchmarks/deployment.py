"""Deployment benchmark of a saved SubFit run against its dense original (SmolLM2-135M by default).

    python benchmarks/deployment.py                          # runs/eval-subfit25, compressing it first if missing
    python benchmarks/deployment.py --run runs/x -- speed.prompt_lengths=[128,512] device=cuda

Time to first token at several prompt lengths and batch sizes, decode tokens/s, working memory and
KV-cache bytes read from the cache object after generation, dense and compressed in one process
(``subfit_core.evaluation.speed``; the same as ``subfit-speed``). On CUDA the same command times with CUDA
events. Prints the table and writes benchmarks/results/deployment.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from subfit_core.apps.speed import measure  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/eval-subfit25"), help="a saved subfit-run output_dir")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("overrides", nargs="*", help="device=... and speed.KEY=VALUE settings")
    args = parser.parse_args()
    if not (args.run / "model.safetensors").exists():
        cmd = ["subfit-run", "strategy=subfit", "sparsity=0.25", f"output_dir={args.run}"]
        print("compressing first:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    result, table, _ = measure([f"output_dir={args.run}", *args.overrides])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deployment.json").write_text(json.dumps(result, indent=2))
    (args.out / "deployment.md").write_text(f"# Deployment: {args.run} vs {result['model']}\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
