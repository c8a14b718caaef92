"""The cost of fitting one candidate bypass at real widths (float64): the ridge solve every fitter
does, and the top-r eigenvectors of the low-rank fitter, exact (eigh of the d x d matrix) against
randomized subspace iteration (never forming it), on the CPU or where ``fit_device`` puts fits.

    python benchmarks/fit_cost.py                 # d = 1024, 2048, 4096; rank 64; on the CPU
    python benchmarks/fit_cost.py --dims 4096 --rank 256
    python benchmarks/fit_cost.py --dims 4096 --device cuda   # fits on the GPU (writes fit_cost-cuda.json)

Statistics are synthetic (a Gram of 4d random tokens with a decaying spectrum, a planted map plus
noise): the cost depends on d and r only. Prints a table and writes benchmarks/results/fit_cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from subfit_core.engine.stats import SubStats, ridge_solve  # noqa: E402
from subfit_plugins.fitters.linear import centered_gram, reduced_rank  # noqa: E402


def synthetic_stats(d: int, seed: int = 0) -> SubStats:
    g = torch.Generator().manual_seed(seed)
    tokens = 4 * d
    x = torch.randn(tokens, d, generator=g) * (0.97 ** torch.arange(d) + 0.01)
    w = torch.randn(d, d, generator=g) / d**0.5
    st = SubStats(d, "synthetic")
    for xb in x.split(1024):
        st.add(xb, xb @ w + 0.1 * torch.randn(xb.shape, generator=g))
    return st


def timed(fn, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":  # kernels run asynchronously: the time is when they are done
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the fits run (cpu, cuda, cuda:N)")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/fit_cost.json (fit_cost-<device>.json off the CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    suffix = "" if device.type == "cpu" else f"-{args.device.replace(':', '')}"
    out = args.out or ROOT / "benchmarks" / "results" / f"fit_cost{suffix}.json"
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fits on {device}")
    for d in args.dims:
        st = synthetic_stats(d).to(device)  # accumulated on the host, as in a run; solved where fits run
        w = ridge_solve(st.gram, st.cross, 1e-3)
        solve_s = timed(lambda: ridge_solve(st.gram, st.cross, 1e-3), args.repeats, device)
        exact_s = timed(lambda: reduced_rank(st.gram, st.cross, w, args.rank, True, "exact"), args.repeats, device)
        fast_s = timed(lambda: reduced_rank(st.gram, st.cross, w, args.rank, True, "randomized"), args.repeats, device)
        # how much of the fitted values' variance each keeps (1.0 = the exact optimum)
        cov, wx = centered_gram(st.gram), w[:d]
        kept = {}
        for solver in ("exact", "randomized"):
            _, v, _ = reduced_rank(st.gram, st.cross, w, args.rank, True, solver)
            kept[solver] = float(((wx @ v).T @ cov @ (wx @ v)).trace())
        row = {"d": d, "rank": args.rank, "ridge_solve_s": solve_s, "eig_exact_s": exact_s, "eig_randomized_s": fast_s,
               "speedup": exact_s / fast_s, "variance_kept_ratio": kept["randomized"] / kept["exact"],
               "fit_exact_s": solve_s + exact_s, "fit_randomized_s": solve_s + fast_s}
        rows.append(row)
        print(f"d={d:5d} r={args.rank}: ridge solve {solve_s:7.2f} s | top-r exact {exact_s:7.2f} s, randomized "
              f"{fast_s:6.2f} s ({row['speedup']:.1f}x, variance kept {row['variance_kept_ratio']:.6f}) | "
              f"low-rank fit {row['fit_exact_s']:.2f} -> {row['fit_randomized_s']:.2f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
