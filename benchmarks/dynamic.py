"""Dynamic per-prompt skipping against static SubFit at the same budget (SmolLM2-135M by default).

    python benchmarks/dynamic.py                                   # budgets 0.125 0.25 0.375, probes 0 4 8 16 32
    python benchmarks/dynamic.py --prompts 2 --budgets 0.25 -- calib.samples=8 eval.windows=2   # smoke run
    python benchmarks/dynamic.py --accuracy 100 --probes 0 16          # accuracy kept on the bundled tasks
    python benchmarks/dynamic.py --tokens 0.25 --probes 0 16           # prompt tokens dropped too (adds rows)

One process, one session. Per budget B, static SubFit is the recipe run at B; the candidates of
the dynamic system are the recipe's selection at a larger budget (``--pool`` x B), each with the
bypass fitted for it, so a prompt chooses which of them to skip (B of the model) and runs the rest.
Each held-out window of every bundled domain is split into a prompt (first half) and a continuation
scored in blocks of ``--every`` tokens: before each block the choice is made on the context so far,
from m random probes recovered around the calibration prior (``subfit_plugins.dynamic``), or from
the exact per-candidate harm (n probes). Decoding is timed by greedy generation with the KV cache,
probes and re-prefills included. With ``--tokens``, only per-prompt rows that also drop that share
of each context from the KV cache are measured (the rest of the budget goes to skipping; each block
is scored after a prefill of its context with those tokens dropped). Rows are kept per (method,
budget, m, tokens): a run replaces only the rows it measures. Prints the table and writes
benchmarks/results/dynamic.{json,md} and dynamic.png (agreement with the exact choice against m).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from subfit_core.apps.cli import resolve_recipe  # noqa: E402
from subfit_core.engine.pipeline import compress, open_session  # noqa: E402
from subfit_plugins.dynamic.skip import DynamicParams, DynamicSkip  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


@torch.inference_mode()
def block_nll(model, window: torch.Tensor, start: int, end: int) -> float:
    logits = model(input_ids=window[None, :end], use_cache=False).logits[0, start - 1:end - 1].float()
    return float(F.cross_entropy(logits, window[start:end], reduction="sum"))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / max(1, len(a | b))


def geo(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def cloze_items(per_task: int) -> dict[str, list[tuple[str, list[str], int, str]]]:
    """The bundled multiple-choice tasks' first items: task -> [(context, choices, label, delimiter)]."""
    from subfit_core.evaluation.tasks import local_tasks
    from subfit_core.plugins import get_plugins

    out = {}
    for name, config in local_tasks(get_plugins()).items():
        if config.get("output_type") != "multiple_choice":
            continue
        lines = Path(config["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()[:per_task]
        docs = [json.loads(line) for line in lines]
        out[name] = [(d["context"], d["choices"], int(d["label"]), config.get("target_delimiter", " ")) for d in docs]
    return out


@torch.inference_mode()
def choice_logliks(model, ctx: list[int], conts: list[list[int]]) -> list[float]:
    """Summed log-likelihood of each continuation after the context (lm-eval's ``acc``)."""
    out = []
    for cont in conts:
        ids = torch.tensor([ctx + cont])
        logp = model(input_ids=ids, use_cache=False).logits[0, len(ctx) - 1:-1].float().log_softmax(-1)
        out.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
    return out


def timed_generation(dyn: DynamicSkip, prompts: list[torch.Tensor], new_tokens: int, estimate=None) -> float:
    t0 = time.perf_counter()
    for p in prompts:
        dyn.generate(p[None], new_tokens, estimate=estimate)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25, 0.375])
    parser.add_argument("--probes", type=int, nargs="+", default=[0, 4, 8, 16, 32])
    parser.add_argument("--prompts", type=int, default=8, help="held-out windows per domain")
    parser.add_argument("--every", type=int, default=64, help="re-estimate every this many tokens")
    parser.add_argument("--share", type=float, default=0.1, help="share of candidates a probe bypasses")
    parser.add_argument("--calibration", type=int, default=4, help="calibration windows for the prior")
    parser.add_argument("--pool", type=float, default=1.5, help="candidates: the static selection at this x budget")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed prompt")
    parser.add_argument("--timed", type=int, default=4, help="prompts timed per method")
    parser.add_argument("--accuracy", type=int, default=0, metavar="N",
                        help="instead: accuracy kept on the bundled multiple-choice tasks, N items each, the choice "
                             "made per item from probes of its context (writes dynamic-accuracy.*)")
    parser.add_argument("--tokens", type=float, nargs="+", default=[],
                        help="instead: per-prompt rows that drop this share of each context from the KV cache")
    parser.add_argument("--fresh", action="store_true", help="drop the rows this run does not measure from the results file")
    parser.add_argument("overrides", nargs="*", help="key=value for the recipe (after --)")
    args = parser.parse_args()

    cfg = resolve_recipe(["strategy=subfit", "save=false", *args.overrides])
    session = open_session(cfg)
    bench, adapter, model = session.bench, session.adapter, session.model
    bench.restore()
    if args.accuracy:
        accuracy(session, cfg, args)
        return
    windows = {name: ids[:args.prompts] for name, ids in session.domains.items()}
    seq = next(iter(windows.values())).shape[1]
    prompt = seq // 2
    contexts = list(range(prompt, seq, args.every))
    blocks = [(c, min(c + args.every, seq)) for c in contexts]
    tokens = seq - prompt
    timed = [ids[i, :prompt] for ids in windows.values() for i in range(min(args.timed, ids.shape[0]))][:args.timed]
    main = cfg["calib"]["dataset"]

    def recipe(sparsity: float) -> dict:
        return resolve_recipe(["strategy=subfit", "save=false", *args.overrides, f"sparsity={sparsity}"])

    def nll_now() -> dict:
        return {(name, w): sum(block_nll(model, window, s, e) for s, e in blocks)
                for name, ids in windows.items() for w, window in enumerate(ids)}

    def ratios(nll: dict) -> dict:
        return {name: math.exp(sum(nll[name, w] - dense[name, w] for w in range(ids.shape[0])) / (tokens * ids.shape[0]))
                for name, ids in windows.items()}

    def fixed_s() -> float:  # the model as it stands, no choice made
        return timed_generation(DynamicSkip(adapter, {}, {}, DynamicParams(every=0)), timed, args.new_tokens,
                                estimate=lambda ids: frozenset())

    # Speed-ups are timed next to a dense timing of their own (the machine's load drifts over a long run).
    dense = nll_now()
    dense_s = fixed_s()
    # rows this run does not measure are kept from the results file (rerun one budget, or add rows)
    stored = [] if args.fresh or not (OUT / "dynamic.json").exists() else json.loads((OUT / "dynamic.json").read_text())["rows"]
    rows = list(stored)
    pools = {r["budget"]: r["candidates"] for r in stored if r.get("candidates")}

    def add(row: dict) -> None:
        rows[:] = [r for r in rows if key(r) != key(row)] + [row]
        print(row, flush=True)

    for budget in args.budgets:
        # every run starts from the dense model: a choice left installed would be compressed on top of
        bench.check_model()  # nothing committed (restored after the last budget), so: every module original
        if not args.tokens:
            outcome = compress(session, recipe(budget))
            static_nll = nll_now()
            static_s = fixed_s()
            bench.restore()
            dense_s = fixed_s()
            r = ratios(static_nll)
            add({"method": "static", "budget": budget, "probes": None,
                 "achieved": outcome.results["sparsity"]["achieved_layers"], "ppl_ratio": r,
                 "ppl_ratio_out": geo(v for k, v in r.items() if k != main), "agreement": None,
                 "decode_speedup": dense_s / static_s, "probe_overhead": 0.0})

        def params(probes: int, drop: float = 0.0) -> DynamicParams:
            return DynamicParams(budget=budget, probes=probes, share=args.share, every=args.every, tokens=drop,
                                 seed=cfg["seed"])

        probe = DynamicSkip.from_session(session, recipe(budget), params(0), pool=args.pool)
        pools[budget] = len(probe.candidates)

        def skipper(probes: int, drop: float) -> DynamicSkip:
            return DynamicSkip(adapter, probe.bypasses, probe.savings, params(probes, drop), cfg["sparsity_unit"])

        # harm estimates: one per (window, context, m), each choice made from them
        probe.calibrate(session.windows.calib[:args.calibration])
        exact, probed = {}, {m: {} for m in args.probes}
        for name, ids in windows.items():
            for w, window in enumerate(ids):
                for c in contexts:
                    exact[name, w, c] = probe.exact(window[None, :c])
                    for m in args.probes:
                        probed[m][name, w, c] = probe.probed(window[None, :c], probes=m)

        runs = [(m, t) for m in args.probes for t in args.tokens] if args.tokens else \
            [(m, 0.0) for m in ["exact", *args.probes]]
        for m, drop in runs:
            dyn = skipper(0 if m == "exact" else int(m), drop)
            dyn.prior = probe.prior
            estimates = exact if m == "exact" else probed[m]
            nll, agree, saved, dropped = {}, [], [], []
            for name, ids in windows.items():
                for w, window in enumerate(ids):
                    total = 0.0
                    for s, e in blocks:
                        n = dyn.drop_count(s)
                        chosen = dyn.choose(estimates[name, w, s], n)
                        agree.append(jaccard(chosen, dyn.choose(exact[name, w, s], n)))
                        saved.append(dyn.saved(chosen, n))
                        dyn.use(chosen)
                        total += dyn.continuation_nll(window[:e], s) if drop else block_nll(model, window, s, e)
                        dropped.append(dyn.dropped / s)
                        dyn.use(frozenset())
                    nll[name, w] = total
            speed = overhead = None
            if m != "exact":
                gen_s = timed_generation(dyn, timed, args.new_tokens)
                run = dyn.counts["prefill"] + dyn.counts["decode"] + dyn.counts["reprefill"]
                dense_s = fixed_s()
                speed, overhead = dense_s / gen_s, dyn.counts["probe"] / max(1, run)
            r = ratios(nll)
            add({"method": "dynamic", "budget": budget, "probes": m, "candidates": len(probe.candidates),
                 "tokens": drop, "context_dropped": statistics.mean(dropped), "achieved": statistics.mean(saved),
                 "ppl_ratio": r, "ppl_ratio_out": geo(v for k, v in r.items() if k != main),
                 "agreement": statistics.mean(agree), "decode_speedup": speed, "probe_overhead": overhead})
            rows.sort(key=lambda row: (row["budget"], row.get("tokens") or 0.0))  # stable otherwise
            table = write(rows, windows, main, args, pools, seq, prompt, timed, dense_s, cfg)
    print(table)


def accuracy(session, cfg: dict, args) -> None:
    """Accuracy kept (compressed / dense, mean over tasks) for static SubFit and per-item skipping at
    each budget; the choice for an item is made from probes of its context."""
    model, tok = session.model, session.tokenizer
    items = cloze_items(args.accuracy)
    encoded = {task: [(tok(c, add_special_tokens=False).input_ids,
                       [tok(d + ch, add_special_tokens=False).input_ids for ch in chs], label)
                      for c, chs, label, d in docs] for task, docs in items.items()}

    def correct(task: str, choose=None) -> list[bool]:
        out = []
        for ctx, conts, label in encoded[task]:
            if choose is not None:
                choose.use(choose.estimate(torch.tensor([ctx])))
            scores = choice_logliks(model, ctx, conts)
            out.append(max(range(len(scores)), key=scores.__getitem__) == label)
            if choose is not None:
                choose.use(frozenset())
        return out

    # a run writes after every row and a rerun skips the rows (and the dense pass) already stored
    path = OUT / "dynamic-accuracy.json"
    stored = {} if args.fresh or not path.exists() else json.loads(path.read_text())
    if stored.get("items") != args.accuracy:
        stored = {}
    dense = stored.get("dense") or {task: statistics.mean(correct(task)) for task in encoded}
    rows: list[dict] = stored.get("rows", [])

    def has(method: str, budget: float, probes) -> bool:
        return any(r["method"] == method and r["budget"] == budget and r["probes"] == probes for r in rows)

    def add(method: str, budget: float, probes, acc: dict, achieved: float) -> None:
        kept = statistics.mean(acc[t] / dense[t] for t in acc if dense[t] > 0)
        rows.append({"method": method, "budget": budget, "probes": probes, "achieved": achieved, "accuracy": acc,
                     "acc_retained": kept})
        rows.sort(key=lambda r: (r["budget"], r["method"] != "static", -1 if r["probes"] is None else r["probes"]))
        write_accuracy(cfg, args, dense, rows)
        print(rows[-1], flush=True)

    for budget in args.budgets:
        static = resolve_recipe(["strategy=subfit", "save=false", *args.overrides, f"sparsity={budget}"])
        if not has("static", budget, None):
            outcome = compress(session, static)
            add("static", budget, None, {t: statistics.mean(correct(t)) for t in encoded},
                outcome.results["sparsity"]["achieved_layers"])
            session.bench.restore()
        if all(has("dynamic", budget, m) for m in args.probes):
            continue
        params = DynamicParams(budget=budget, probes=0, share=args.share, every=0, seed=cfg["seed"])
        probe = DynamicSkip.from_session(session, static, params, pool=args.pool)
        probe.calibrate(session.windows.calib[:args.calibration])
        for m in args.probes:
            if has("dynamic", budget, m):
                continue
            dyn = DynamicSkip(session.adapter, probe.bypasses, probe.savings,
                              DynamicParams(budget=budget, probes=m, share=args.share, every=0, seed=cfg["seed"]))
            dyn.prior = probe.prior
            picked: list[float] = []
            estimate = dyn.estimate

            def counted(ids, estimate=estimate, picked=picked):
                chosen = estimate(ids)
                picked.append(sum(dyn.savings[x] for x in chosen))
                return chosen

            dyn.estimate = counted  # type: ignore[method-assign]
            add("dynamic", budget, m, {t: statistics.mean(correct(t, dyn)) for t in encoded}, statistics.mean(picked))
    print((OUT / "dynamic-accuracy.md").read_text())


def write_accuracy(cfg: dict, args, dense: dict, rows: list[dict]) -> None:
    encoded = list(dense)
    lines = ["| method | budget | probes m | achieved | " + " | ".join(encoded) + " | accuracy kept (mean) |",
             "|" + "---|" * (5 + len(encoded))]
    lines.append("| dense | | | | " + " | ".join(f"{dense[t]:.3f}" for t in encoded) + " | 1.000 |")
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']:.3f} | {'' if r['probes'] is None else r['probes']} | "
                     f"{r['achieved']:.3f} | " + " | ".join(f"{r['accuracy'][t]:.3f}" for t in encoded)
                     + f" | **{r['acc_retained']:.3f}** |")
    meta = (f"Model {cfg['model']}; {args.accuracy} items per task (zero-shot, the summed log-likelihood of each "
            f"choice as lm-eval's acc); per item, the choice is made from probes of its context; candidates: the "
            f"static selection at {args.pool} x the budget; prior from {args.calibration} calibration windows"
            + (f"; recipe overrides: {' '.join(args.overrides)}." if args.overrides else "."))
    table = "\n".join(lines) + "\n\n" + meta + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dynamic-accuracy.json").write_text(json.dumps({"meta": meta, "items": args.accuracy, "dense": dense,
                                                           "rows": rows}, indent=1))
    (OUT / "dynamic-accuracy.md").write_text(table)


def key(row: dict) -> tuple:
    return row["method"], row["budget"], str(row["probes"]), row.get("tokens") or 0.0


def write(rows: list[dict], windows: dict, main: str, args, pools: dict, seq: int, prompt: int, timed: list,
          dense_s: float, cfg: dict) -> str:
    """The table, JSON and plot of the rows so far (written after every row: a long run stopped
    early keeps what it measured)."""
    domains = list(windows)
    head = ["method", "budget", "probes m", "context dropped", "achieved", *domains, "not calibrated on (geo-mean)",
            "agreement with exact choice", "decode speed-up", "probe tokens / tokens run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = {None: "", "exact": f"n = {r.get('candidates')}"}.get(r["probes"], str(r["probes"]))
        cells = [r["method"], f"{r['budget']:.3f}", m, f"{r['context_dropped']:.0%}" if r.get("tokens") else "",
                 f"{r['achieved']:.3f}",
                 *(f"{r['ppl_ratio'][d]:.2f}x" + (" (c)" if d == main else "") for d in domains),
                 f"**{r['ppl_ratio_out']:.2f}x**", "" if r["agreement"] is None else f"{r['agreement']:.2f}",
                 "" if r["decode_speedup"] is None else f"{r['decode_speedup']:.2f}x",
                 "" if r["probe_overhead"] is None else f"{r['probe_overhead']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    meta = (f"Model {cfg['model']}; candidates: the static selection at {args.pool} x the budget "
            f"({', '.join(f'{n} at {b:g}' for b, n in pools.items())}); {args.prompts} held-out windows of {seq} tokens per domain, "
            f"prompt {prompt} tokens, continuation scored in blocks of {args.every} (choice re-made before each); "
            f"prior from {args.calibration} calibration windows; probes bypass {args.share:.0%} "
            f"of the candidates each; decode timed on {len(timed)} prompts x {args.new_tokens} greedy tokens "
            f"(each speed-up against a dense timing taken right after it; the last {dense_s:.1f} s); "
            f"'(c)' marks the calibration domain. torch {torch.__version__}, {platform.machine()}.")
    table = "\n".join(lines) + "\n\n" + meta + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dynamic.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (OUT / "dynamic.md").write_text(table)
    plot(rows, OUT / "dynamic.png")
    return table


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for budget in sorted({r["budget"] for r in rows}):
        pts = sorted((r["probes"], r["agreement"]) for r in rows
                     if r["budget"] == budget and isinstance(r["probes"], int) and not r.get("tokens"))
        n = next(r["candidates"] for r in rows if r["budget"] == budget and r["method"] == "dynamic")
        ax.plot([p for p, _ in pts], [a for _, a in pts], marker="o", label=f"budget {budget:g} (n = {n})")
    ax.set_xlabel("probes m")
    ax.set_ylabel("agreement with the exact choice (Jaccard)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
