"""AA-SVD's blend alpha against SVD-LLM, cheaply: factor only the first few layers of SmolLM2-135M
(kept ratio 0.8) and measure the relative MSE of the residual stream after them against the dense
model, on calibration windows and on held-out windows.

    OMP_NUM_THREADS=1 python benchmarks/lowrank_alpha.py [--layers 6] [--alphas 1.0 0.5 0.0]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from subfit_core.engine.corpus import make_windows  # noqa: E402
from subfit_core.engine.factorize import factorize  # noqa: E402
from subfit_core.engine.models import find_adapter, load_model  # noqa: E402
from subfit_core.engine.pipeline import load_text  # noqa: E402
from subfit_core.engine.workbench import Workbench  # noqa: E402
from subfit_core.plugins import build_component, get_plugins  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5, 0.0])
    parser.add_argument("--kept-ratio", type=float, default=0.8)
    parser.add_argument("--calib", type=int, default=32)
    args = parser.parse_args()
    plugins = get_plugins()
    model, tok, _ = load_model(plugins, "smollm2-135m", torch.device("cpu"), torch.float32, False)
    adapter = find_adapter(plugins, model)
    text = load_text(plugins, "kjv")
    w = make_windows(text, tok, calib_samples=args.calib, scoring_samples=4, seq_len=256, heldout=text,
                     eval_windows=8, eval_seq_len=256, seed=0)
    bench = Workbench(model, adapter, w, 8, torch.device("cpu"))
    skip = {s for s in bench.subs if s.layer >= args.layers}

    @torch.no_grad()
    def stream(ids):
        h = adapter.embed(ids)
        ctx = adapter.context(h)
        for s in bench.subs:
            if s.layer < args.layers:
                h = h + adapter.contribution(s, h, ctx)
        return h

    refs = {"calibration": stream(w.calib[:8]), "held-out": stream(w.heldout)}
    ids = {"calibration": w.calib[:8], "held-out": w.heldout}
    print(f"| factorizer | relative MSE after {args.layers} layers, calibration | held-out | seconds |\n|---|---|---|---|")
    for name, extra in [("svd-llm", {})] + [("aa-svd", {"alpha": a}) for a in args.alphas]:
        fz = build_component(plugins, "factorizer", {"name": name, "kept_ratio": args.kept_ratio, **extra}, "factorizer")
        t0 = time.perf_counter()
        factorize(bench, fz, args.kept_ratio, skip)
        err = {k: float((stream(ids[k]) - r).square().mean() / r.square().mean()) for k, r in refs.items()}
        label = name + (f" alpha={extra['alpha']}" if extra else "")
        print(f"| {label} | {err['calibration']:.3e} | {err['held-out']:.3e} | {time.perf_counter() - t0:.0f} |", flush=True)
        bench.restore()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
