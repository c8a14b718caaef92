"""``subfit-report``: one markdown report, with PNG plots, from one or many ``subfit-run`` directories.

Each run directory gives its ``results.json`` (perplexity, sparsity, KV cache, and, when run with
``eval.tasks`` / ``eval.speed``, downstream scores and deployment measurements) and, if
``subfit-speed`` was run on it, ``deployment.json`` (which then replaces the run's own deployment
numbers). Written atomically to ``output_dir``: ``report.md``, ``report.json``,
``accuracy_ppl_vs_sparsity.png`` and ``latency_kv_vs_sparsity.png``.

Across runs: the geometric mean of the perplexity ratios, of the retained accuracies and of the
TTFT speed-ups (across runs or models, ratios are averaged geometrically).
"""

from __future__ import annotations

import json
from pathlib import Path

from subfit_core.apps.cli import command
from subfit_core.artifact.outputs import atomic_dir, check_output_dir
from subfit_core.config import ConfigError, parse_bool, parse_override
from subfit_core.errors import SubFitError, did_you_mean
from subfit_core.evaluation.tasks import geometric_mean

USAGE = """usage: subfit-report RUN_DIR [RUN_DIR ...] [output_dir=runs/report] [overwrite=true]
       subfit-report runs=[runs/a,runs/b] output_dir=reports/x

A markdown report (report.md, report.json) with a table of every run and PNG plots of accuracy and
perplexity, and of latency and KV cache, against sparsity.
"""


def parse_args(argv: list[str]) -> tuple[list[Path], Path, bool]:
    runs, out, overwrite = [], Path("runs/report"), False
    for arg in argv:
        if "=" not in arg:
            runs.append(Path(arg))
            continue
        key, value = parse_override(arg)
        if key == "runs":
            runs += [Path(str(v)) for v in (value if isinstance(value, list) else [value])]
        elif key == "output_dir":
            out = Path(str(value))
        elif key == "overwrite":
            overwrite = parse_bool(key, value)
        else:
            raise ConfigError(f"{key}: unknown key; {did_you_mean(key, ['runs', 'output_dir', 'overwrite'])}")
    if not runs:
        raise ConfigError("runs: give one or more run directories, e.g. subfit-report runs/a runs/b")
    for run in runs:
        if not (run / "results.json").is_file():
            raise SubFitError(f"runs: '{run}' holds no results.json (is it a subfit-run output_dir?)")
    return runs, out, overwrite


REQUIRED = ("strategy", "perplexity", "sparsity")  # what every subfit-run results.json has


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SubFitError(f"runs: '{path}' is not a readable JSON file ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise SubFitError(f"runs: '{path}' holds {type(data).__name__}, not the mapping subfit-run writes")
    return data


def load_run(run: Path) -> dict:
    results = read_json(run / "results.json")
    missing = [k for k in REQUIRED if not isinstance(results.get(k), (dict, str))]
    if missing or not isinstance(results["perplexity"].get("ratio"), (int, float)):
        raise SubFitError(f"runs: '{run / 'results.json'}' is not a subfit-run result (no {(missing or ['perplexity.ratio'])[0]})")
    if (run / "deployment.json").is_file():
        results["deployment"] = read_json(run / "deployment.json")
    results["run_dir"] = str(run)
    return results


def row(results: dict) -> dict:
    """The report's numbers for one run."""
    kv = results["kv_cache_bytes_per_token"]
    ds, dep = results.get("downstream"), results.get("deployment")
    ratios = (dep or {}).get("ratios", {})
    return {
        "run": results["run_dir"], "strategy": results["strategy"], "model": results["model"]["name"],
        "sparsity": results["sparsity"]["requested"], "achieved_layers": results["sparsity"]["achieved_layers"],
        "ppl_dense": results["perplexity"]["dense"], "ppl_ratio": results["perplexity"]["ratio"],
        "retained_accuracy": ds["retained_accuracy"] if ds else None,
        "task_ppl_degradation": ds["perplexity_degradation"] if ds else None,
        "tasks": {n: {k: t.get(k) for k in ("metric", "retained", "degradation")}
                  | {"dense": t["dense"].get(t["metric"]), "compressed": t["compressed"].get(t["metric"])}
                  for n, t in (ds or {}).get("tasks", {}).items()},
        "ttft_speedup": ratios.get("ttft_speedup"), "decode_ratio": ratios.get("decode_tokens_per_s"),
        "memory_ratio": ratios.get("peak_working_memory"),
        # measured from the cache object if a deployment benchmark ran, else from the config
        "kv_ratio": ratios.get("kv_cache") if ratios.get("kv_cache") is not None else kv["after"] / kv["before"],
        "kv_measured": ratios.get("kv_cache") is not None, "device": (dep or {}).get("device"),
    }


def _f(x, fmt: str) -> str:
    return format(x, fmt) if x is not None else "-"


def markdown(rows: list[dict], summary: dict) -> str:
    lines = ["| run | strategy | sparsity (achieved) | ppl ratio | retained accuracy | task ppl ratio | "
             "TTFT speed-up | decode tok/s ratio | KV cache ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['strategy']} | {r['sparsity']:.3f} ({r['achieved_layers']:.4f}) | "
                     f"{r['ppl_ratio']:.2f}x | {_f(r['retained_accuracy'], '.3f')} | {_f(r['task_ppl_degradation'], '.2f')} | "
                     f"{_f(r['ttft_speedup'], '.2f')} | {_f(r['decode_ratio'], '.2f')} | "
                     f"{r['kv_ratio']:.3f}{'' if r['kv_measured'] else ' (config)'} |")
    tasks = sorted({n for r in rows for n in r["tasks"]})
    if tasks:
        lines += ["", "| run | task | metric | dense | compressed | retained / degradation |", "|---|---|---|---|---|---|"]
        for r in rows:
            for n in tasks:
                t = r["tasks"].get(n)
                if t:
                    ratio = t["retained"] if t["retained"] is not None else t["degradation"]
                    lines.append(f"| {r['run']} | {n} | {t['metric']} | {_f(t['dense'], '.4g')} | "
                                 f"{_f(t['compressed'], '.4g')} | {_f(ratio, '.3f')} |")
    lines += ["", f"Across {len(rows)} run(s), geometric means: perplexity ratio {_f(summary['ppl_ratio'], '.3f')}, "
              f"retained accuracy {_f(summary['retained_accuracy'], '.3f')}, "
              f"TTFT speed-up {_f(summary['ttft_speedup'], '.3f')}.",
              "", "![accuracy and perplexity against sparsity](accuracy_ppl_vs_sparsity.png)",
              "![latency and KV cache against sparsity](latency_kv_vs_sparsity.png)"]
    return "\n".join(lines) + "\n"


def _series(rows: list[dict], key: str):
    """Per strategy: sorted (achieved sparsity, value) points, starting from the dense model (0, 1)."""
    out = {}
    for name in dict.fromkeys(r["strategy"] for r in rows):
        pts = sorted((r["achieved_layers"], r[key]) for r in rows if r["strategy"] == name and r[key] is not None)
        if pts:
            out[name] = [(0.0, 1.0)] + pts
    return out


def plot(rows: list[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("accuracy_ppl_vs_sparsity.png", [("retained_accuracy", "retained accuracy (compressed / dense)", False),
                                          ("ppl_ratio", "perplexity ratio (compressed / dense)", True)]),
        ("latency_kv_vs_sparsity.png", [("ttft_speedup", "TTFT speed-up (dense / compressed)", False),
                                        ("kv_ratio", "KV cache (compressed / dense)", False)]),
    ]
    for filename, specs in panels:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (key, label, log) in zip(axes, specs):
            for name, pts in _series(rows, key).items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("achieved sparsity (layer-equivalents / layers)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not measured in these runs", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(folder / filename, dpi=120)
        plt.close(fig)


def report(argv: list[str]) -> dict:
    runs, out, overwrite = parse_args(argv)
    check_output_dir(out, overwrite)
    rows = []
    for run in runs:
        try:
            rows.append(row(load_run(run)))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a results.json cut or edited by hand
            raise SubFitError(f"runs: '{run / 'results.json'}' is not a complete subfit-run result "
                              f"({type(exc).__name__}: {exc})") from None
    summary = {key: geometric_mean([r[key] for r in rows if r[key]]) for key in ("ppl_ratio", "retained_accuracy", "ttft_speedup")}
    text = markdown(rows, summary)

    def write(tmp: Path) -> None:
        (tmp / "report.md").write_text("# SubFit report\n\n" + text)
        (tmp / "report.json").write_text(json.dumps({"rows": rows, "geometric_means": summary}, indent=2))
        plot(rows, tmp)

    atomic_dir(out, write)
    return {"rows": rows, "geometric_means": summary, "markdown": text, "output_dir": str(out)}


@command("subfit-report")
def report_main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv or not argv:
        print(USAGE)
        return 0 if argv else 2
    result = report(argv)
    print(result["markdown"])
    print(f"written to {result['output_dir']}")
    return 0
