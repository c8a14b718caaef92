"""Cross-domain generalisation: strategies and recipe variants, each measured on held-out text of
the calibration domain and of every bundled domain the run did not calibrate on.

    python benchmarks/generalisation.py                          # the ablation set at 25%
    python benchmarks/generalisation.py --set baselines --sparsities 0.125 0.25 0.375
    python benchmarks/generalisation.py --set targets -- model=gemma3-270m   # another model's own file
    python benchmarks/generalisation.py --set lowrank            # kept 0.8 and 0.6
    python benchmarks/generalisation.py --set lowrank-search -- "$TASKS"   # what overfits, kept 0.8
    python benchmarks/generalisation.py --only "sleb, KJV calibration" -- eval.windows=16

Variants that share a session (model, data, evaluation settings) run from one dense pass. Prints a
markdown table and writes benchmarks/results/generalisation-SET[-MODEL].{json,md} after every row (a
partial run keeps its rows; rerunning skips rows already there unless --fresh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from subfit_core.apps.cli import resolve_recipe  # noqa: E402
from subfit_core.engine.pipeline import SESSION_KEYS, compress, open_session  # noqa: E402
from subfit_core.errors import SubFitError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

KJV = "calib.generated=0"  # the user's corpus alone (the previous default)
# The recipe as it was before the anchored refit became its default: the rows measured then pin it,
# so rerunning them reproduces what is stored.
SUBFIT = ["strategy=subfit", "anchored=false"]
CLOZE = ("subfit_kjv_cloze", "subfit_shakespeare_nextline", "subfit_pydocs_cloze", "subfit_jargon_cloze")
# The baselines' rows were measured on the engine's default windows (64 calibration, 4 scoring, 256
# tokens, stride 2), before their recipes carried their papers' protocols: pinned, so they reproduce.
ENGINE = ["calib.samples=64", "calib.seq_len=256", "scoring.samples=4", "scoring.stride=2"]
SETS: dict[str, list[tuple[str, list[str]]]] = {
    # what overfits, at one level: the calibration mix, the fit's ridge and ranks, anchoring, no bypass
    "ablation": [
        ("subfit, KJV calibration (previous default)", [*SUBFIT, KJV]),
        ("subfit, ridge 0.1, KJV calibration", [*SUBFIT, KJV, "fitter.attn.ridge=0.1", "fitter.ffn.ridge=0.1"]),
        ("subfit, ranks 16 / 64, KJV calibration", [*SUBFIT, KJV, "fitter.attn.rank=16", "fitter.ffn.rank=64"]),
        ("subfit, anchored, KJV calibration", ["strategy=subfit", KJV, "anchored=true"]),
        ("subfit-delete (no bypass), KJV calibration", ["strategy=subfit-delete", *ENGINE, KJV]),
        ("subfit, 50% self-sampled (default)", [*SUBFIT]),
        ("subfit, 100% self-sampled", [*SUBFIT, "calib.generated=1.0"]),
        ("subfit, 50% self-sampled, anchored", ["strategy=subfit", "anchored=true"]),
    ],
    # the targets on any model: the current default against whole-layer deletion, same calibration
    "targets": [
        ("subfit (default)", ["strategy=subfit"]),
        ("subfit, anchored (previous default)", ["strategy=subfit", "drift_correction=0"]),
        ("shortgpt, same calibration", ["strategy=shortgpt", *ENGINE, "calib.generated=0.5"]),
        ("sleb, same calibration", ["strategy=sleb", *ENGINE, "calib.generated=0.5"]),
    ],
    # the targets as first measured: SubFit before anchoring against whole-layer deletion
    "baselines": [
        ("subfit (default: 50% self-sampled)", [*SUBFIT]),
        ("shortgpt, same calibration", ["strategy=shortgpt", *ENGINE, "calib.generated=0.5"]),
        ("sleb, same calibration", ["strategy=sleb", *ENGINE, "calib.generated=0.5"]),
    ],
    # whole layers cannot hit a level exactly: the layer count just below it, to bracket SubFit
    "bracket": [
        ("shortgpt, same calibration", ["strategy=shortgpt", *ENGINE, "calib.generated=0.5"]),
        ("sleb, same calibration", ["strategy=sleb", *ENGINE, "calib.generated=0.5"]),
    ],
    # more calibration and scoring text (both still half sampled): does size matter once the mix is right?
    "size": [
        ("subfit, calib 128 + scoring 8 windows", [*SUBFIT, "calib.samples=128", "scoring.samples=8"]),
    ],
    # more text and a larger sampled share together (in-domain must stay within 1.6x)
    "mix": [
        ("subfit, calib 128 + scoring 8, 60% self-sampled",
         [*SUBFIT, "calib.samples=128", "scoring.samples=8", "calib.generated=0.6"]),
        ("subfit, calib 256 + scoring 8, 50% self-sampled",
         [*SUBFIT, "calib.samples=256", "scoring.samples=8"]),
    ],
    # where 37.5% lost on modern text: anchoring against the drift of 25 bypasses (with half the drift
    # corrected: the default),
    # a larger scoring set to judge them on, and a larger sampled share
    "deep": [
        ("subfit (default: anchored, drift correction 0.5)", ["strategy=subfit"]),
        ("subfit, anchored (previous default)", ["strategy=subfit", "drift_correction=0"]),
        ("subfit, anchored selection", ["strategy=subfit", "selector.anchored=true"]),
        ("subfit, FFNs only", ["strategy=subfit", "selector.kinds=ffn"]),
        # larger bypasses: each costs more, so more submodules go for the same budget
        ("subfit, ranks 128 / 384", ["strategy=subfit", "fitter.attn.rank=128", "fitter.ffn.rank=384"]),
        ("subfit, scoring 16 windows", [*SUBFIT, "scoring.samples=16"]),
        ("subfit, 75% self-sampled", [*SUBFIT, "calib.generated=0.75"]),
    ],
    # LinearPatch (a Hadamard-rotated channel scaling of the stream at each cut) on the deletion
    # baselines and on its own contiguous window, with the window's unpatched deletion beside it
    "patch": [
        ("shortgpt + LinearPatch, same calibration", ["strategy=shortgpt-patch", *ENGINE, "calib.generated=0.5"]),
        ("sleb + LinearPatch, same calibration", ["strategy=sleb-patch", *ENGINE, "calib.generated=0.5"]),
        ("linear-patch (its window), same calibration", ["strategy=linear-patch", *ENGINE, "calib.generated=0.5"]),
        ("linear-patch's window, no patch, same calibration", ["strategy=linear-patch", *ENGINE, "fitter.name=identity",
                                                               "calib.generated=0.5"]),
    ],
    # accuracy kept on 300 items of each of the four bundled tasks (three times the other sets' 100, the items
    # the paired drift comparison used), perplexity on 8 windows per domain only
    "accuracy": [
        (label, [*extra, f"eval.tasks=[{','.join(CLOZE)}]", "eval.limit=300", "eval.windows=8", "eval.batch_size=32"])
        for label, extra in (
            ("subfit (default)", ["strategy=subfit"]),
            ("shortgpt, same calibration", ["strategy=shortgpt", *ENGINE, "calib.generated=0.5"]),
            ("sleb, same calibration", ["strategy=sleb", *ENGINE, "calib.generated=0.5"]),
        )
    ],
    # the baselines as their papers run them: the user's corpus alone
    "baselines-kjv": [
        ("subfit, KJV calibration", [*SUBFIT, KJV]),
        ("shortgpt, KJV calibration", ["strategy=shortgpt", *ENGINE, KJV]),
        ("sleb, KJV calibration", ["strategy=sleb", *ENGINE, KJV]),
    ],
    # every other removal strategy on the targets' baselines' calibration (engine windows, half sampled),
    # cheapest first: with "targets" it makes a model's table of every strategy at each level
    "others": [
        (f"{name}, same calibration", [f"strategy={name}", *ENGINE, "calib.generated=0.5"])
        for name in ("subfit-contiguous", "uidl", "laco", "subfit-delete", "llm-streamline", "replaceme-cosine",
                     "shortgpt-patch", "sleb-patch", "linear-patch", "blockpruner", "finercut")
    ],
    # the baselines on their papers' calibration protocols (their recipes' own), the user's corpus alone
    "protocols": [
        ("sleb, its paper's protocol, KJV calibration", ["strategy=sleb", KJV]),
        ("uidl, its paper's protocol, KJV calibration", ["strategy=uidl", KJV]),
        ("laco, its paper's protocol, KJV calibration", ["strategy=laco", KJV]),
        ("replaceme, its paper's protocol, KJV calibration", ["strategy=replaceme", KJV]),
        ("blockpruner, its paper's protocol, KJV calibration", ["strategy=blockpruner", KJV]),
        ("finercut, its paper's protocol, KJV calibration", ["strategy=finercut", KJV]),
        ("uidl, engine windows, KJV calibration", ["strategy=uidl", *ENGINE, KJV]),
        ("laco, engine windows, KJV calibration", ["strategy=laco", *ENGINE, KJV]),
        ("replaceme, engine windows, KJV calibration", ["strategy=replaceme", *ENGINE, KJV]),
    ],
    # the low-rank stage: every calibration-fitted piece (whitening, anchoring, refinement)
    "lowrank": [
        (f"{name} kept {kept}{label}", [f"strategy={strategy}", f"factorizer.kept_ratio={kept}", *extra, calib])
        for kept in (0.8, 0.6)
        for calib, label in ((KJV, ", KJV calibration"), ("calib.generated=0.5", ", 50% self-sampled"))
        for name, strategy, extra in (("svd-llm", "svd-llm", []),
                                      ("aa-svd", "aa-svd", ["factorizer.refine_steps=0"]),
                                      ("aa-svd + refine", "aa-svd", ["factorizer.refine_steps=32"]),
                                      ("subfit + aa-svd", "subfit-svd", []))
    ],
    # what overfits in the low-rank stage, at kept 0.8 on the mix: whitening (its ridge), anchoring (its
    # ridge and blend), refinement steps and the data; accuracy comes with the run's eval.tasks
    "lowrank-search": [
        (label, [f"strategy={strategy}", "factorizer.kept_ratio=0.8", calib, *extra])
        for label, strategy, calib, extra in (
            ("svd-llm, KJV calibration", "svd-llm", KJV, []),
            ("svd-llm", "svd-llm", "calib.generated=0.5", []),
            ("svd-llm, whitening ridge 0.01", "svd-llm", "calib.generated=0.5", ["factorizer.ridge=0.01"]),
            ("svd-llm, whitening ridge 0.1", "svd-llm", "calib.generated=0.5", ["factorizer.ridge=0.1"]),
            ("svd-llm, whitening ridge 1", "svd-llm", "calib.generated=0.5", ["factorizer.ridge=1.0"]),
            ("aa-svd + refine, KJV calibration", "aa-svd", KJV, []),
            ("aa-svd + refine (32 steps, ridge 1e-3, alpha 0.5)", "aa-svd", "calib.generated=0.5", []),
            ("aa-svd, no refinement", "aa-svd", "calib.generated=0.5", ["factorizer.refine_steps=0"]),
            ("aa-svd + refine 128 steps", "aa-svd", "calib.generated=0.5", ["factorizer.refine_steps=128"]),
            ("aa-svd + refine, ridge 0.01", "aa-svd", "calib.generated=0.5", ["factorizer.ridge=0.01"]),
            ("aa-svd + refine, ridge 0.1", "aa-svd", "calib.generated=0.5", ["factorizer.ridge=0.1"]),
            ("aa-svd + refine, alpha 1", "aa-svd", "calib.generated=0.5", ["factorizer.alpha=1.0"]),
            ("subfit + aa-svd", "subfit-svd", "calib.generated=0.5", []),
        )
    ],
}


def row_of(label: str, sparsity: float, res: dict, seconds: float) -> dict:
    ppl = res["perplexity"]
    attn = sum(1 for r in res["replaced"] if r["type"] == "attn")
    return {
        "variant": label, "sparsity": sparsity, "calibration": res["data"]["source"],
        "achieved_layers": res["sparsity"]["achieved_layers"], "achieved_params": res["sparsity"]["achieved_params"],
        "removed": f"{attn} attn + {len(res['replaced']) - attn} ffn",
        "in_domain_ratio": ppl["ratio"], "out_of_domain_ratio": ppl["out_of_domain_ratio"],
        "domains": {name: d["ratio"] for name, d in ppl["domains"].items()},
        "calibrated": [name for name, d in ppl["domains"].items() if d["calibrated"]],
        "retained_accuracy": res.get("downstream", {}).get("retained_accuracy"),
        "tasks": {name: t.get("retained") for name, t in res.get("downstream", {}).get("tasks", {}).items()},
        "accuracy": {name: [t["dense"].get("acc"), t["compressed"].get("acc")]  # dense, compressed
                     for name, t in res.get("downstream", {}).get("tasks", {}).items()},
        "seconds": seconds,
    }


def markdown(rows: list[dict], meta: str) -> str:
    domains = list(dict.fromkeys(name for r in rows for name in r["domains"]))
    acc = any(r.get("retained_accuracy") is not None for r in rows)
    head = ["variant", "sparsity", "achieved (layers)", "removed", *domains, "out-of-domain (geo-mean)",
            *(["accuracy kept"] if acc else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['variant']} | {r['sparsity']:.3f} | refused: {r['refused']} |")
            continue
        cells = [r["variant"], f"{r['sparsity']:.3f}", f"{r['achieved_layers']:.4f}", r["removed"]]
        for name in domains:
            v = r["domains"].get(name)
            cells.append("" if v is None else f"{v:.2f}x" + (" (calib)" if name in r["calibrated"] else ""))
        ood = r["out_of_domain_ratio"]
        cells.append("" if ood is None else f"**{ood:.2f}x**")
        if acc:
            cells.append("" if r.get("retained_accuracy") is None else f"{r['retained_accuracy']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + meta + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="ablation", choices=sorted(SETS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25])
    parser.add_argument("--only", nargs="+", help="run just these variants")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in the results file")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every variant (after --)")
    args = parser.parse_args()
    # rows are keyed by variant and level: another model's rows go to a file of their own
    model = resolve_recipe(["strategy=subfit", *args.overrides])["model"]
    default_model = resolve_recipe(["strategy=subfit"])["model"]
    suffix = "" if model == default_model else f"-{model}"
    out = ROOT / "benchmarks" / "results" / f"generalisation-{args.set}{suffix}"
    done = [] if args.fresh or not out.with_suffix(".json").exists() else json.loads(out.with_suffix(".json").read_text())["rows"]
    rows = list(done)
    work = []
    for sparsity in args.sparsities:
        for label, extra in SETS[args.set]:
            if (args.only and label not in args.only) or any(r["variant"] == label and r["sparsity"] == sparsity for r in done):
                continue
            work.append((label, sparsity, resolve_recipe([*extra, *args.overrides, f"sparsity={sparsity}", "save=false"])))
    # runs that share model, data and evaluation settings share one dense session: group them
    work.sort(key=lambda w: json.dumps([w[2][k] for k in SESSION_KEYS], sort_keys=True, default=str))
    session = None
    for label, sparsity, cfg in work:
        if session is None or not session.compatible(cfg):
            session = open_session(cfg)
        t0 = time.perf_counter()
        try:
            res = compress(session, cfg).results
        except SubFitError as err:
            # a strategy that cannot apply to this model says why; the table keeps that as its row
            row = {"variant": label, "sparsity": sparsity, "refused": str(err), "domains": {}}
        else:
            row = row_of(label, sparsity, res, time.perf_counter() - t0)
        session.bench.restore()
        if not args.fresh and out.with_suffix(".json").exists():  # rows another process wrote meanwhile stay
            rows = json.loads(out.with_suffix(".json").read_text())["rows"]
        rows = [r for r in rows if not (r["variant"] == label and r["sparsity"] == sparsity)] + [row]
        order = {label: i for i, (label, _) in enumerate(SETS[args.set])}
        rows.sort(key=lambda r: (r["sparsity"], order.get(r["variant"], len(order))))
        meta = (f"Model {cfg['model']}; perplexity ratio (compressed / dense) on {cfg['eval']['windows']} x "
                f"{cfg['eval']['seq_len']} held-out tokens per domain; '(calib)' marks the calibration domain; "
                f"out-of-domain = geometric mean over the others. torch {torch.__version__}, {platform.machine()}.")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(markdown(rows, meta))
        print(markdown([row], ""), flush=True)
    print(markdown(rows, ""))


if __name__ == "__main__":
    main()
