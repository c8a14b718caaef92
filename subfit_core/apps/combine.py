"""``subfit-compare combine=[...]``: the comparisons of several models in one table.

Each model's comparison is its own ``subfit-compare`` output folder (its own dense reference, so
its ratios are comparable only with themselves). Combining takes, for every (strategy, sparsity)
that finished on every model, the geometric mean over the models of each ratio (perplexity on
the calibration domain, on the domains not calibrated on, accuracy kept): one model that a
strategy breaks then moves the mean by its factor, not by its absolute perplexity. A row missing
or failed on some model is listed with the models it lacks, and left out of the means.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from subfit_core.apps.compare import plot_tradeoff
from subfit_core.apps.plotting import pyplot, ratio_lines, save_ratio_plot
from subfit_core.artifact.outputs import atomic_dir, check_output_dir
from subfit_core.config import ConfigError, parse_bool, parse_override
from subfit_core.evaluation.tasks import geometric_mean

RATIOS = ("ppl_ratio", "ood_ppl_ratio", "retained_accuracy")
MEANS = ("achieved_layers", "achieved_params", "kv_saving")  # the same plan size on every model: arithmetic mean
COLUMNS = ["strategy", "sparsity", "status", "models", *RATIOS, *MEANS, "missing"]


def parse_args(argv: list[str]) -> tuple[list[Path], Path, bool]:
    folders, out, overwrite = None, Path("runs/compare-models"), False
    for key, value in map(parse_override, argv):
        if key == "combine":
            folders = value if isinstance(value, list) else [value]
        elif key == "output_dir":
            out = Path(str(value))
        elif key == "overwrite":
            overwrite = parse_bool(key, value)
        else:
            raise ConfigError(f"{key}: not a key of subfit-compare combine=[...]; allowed: combine, output_dir, overwrite")
    if not folders or len(folders) < 2:
        raise ConfigError(f"combine: {folders!r}; give two or more subfit-compare output folders, "
                          "e.g. combine=[runs/compare-a,runs/compare-b]")
    return [Path(str(f)) for f in folders], out, overwrite


def read_summary(folder: Path) -> dict:
    path = folder / "results.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"combine: '{folder}' has no results.json; give subfit-compare output folders") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"combine: '{path}' cannot be read as a subfit-compare result ({exc})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("rows"), list):
        raise ConfigError(f"combine: '{path}' has no rows; give subfit-compare output folders")
    summary.setdefault("model", folder.name)  # folders written before the model was recorded
    return summary


def combined_rows(summaries: list[dict]) -> list[dict]:
    models = [s["model"] for s in summaries]
    if len(set(models)) < len(models):
        raise ConfigError(f"combine: the folders hold the same model more than once ({', '.join(models)}); "
                          "give one comparison per model")
    per_model = [{(r["strategy"], r["sparsity"]): r for r in s["rows"] if r.get("status") == "ok"} for s in summaries]
    keys = dict.fromkeys((r["strategy"], r["sparsity"]) for s in summaries for r in s["rows"])
    rows = []
    for strategy, sparsity in keys:
        found = {model: done[strategy, sparsity] for model, done in zip(models, per_model) if (strategy, sparsity) in done}
        row: dict = {"strategy": strategy, "sparsity": sparsity, "models": len(found),
                     "missing": [m for m in models if m not in found]}
        if row["missing"]:
            rows.append({**row, "status": "missing"})
            continue
        row["status"] = "ok"
        for key in RATIOS:  # a ratio only where every model measured it
            values = [r.get(key) for r in found.values()]
            row[key] = geometric_mean(values) if all(v is not None and v > 0 for v in values) else None
        for key in MEANS:
            row[key] = sum(r[key] for r in found.values()) / len(found)
        row["per_model"] = {m: {k: r.get(k) for k in (*RATIOS, "achieved_layers")} for m, r in found.items()}
        rows.append(row)
    return rows


def combined_markdown(merged: dict) -> str:
    models, rows = merged["models"], merged["rows"]
    head = ["strategy", "sparsity", *(f"{m} ppl ratio" for m in models), "ppl ratio (geo-mean)",
            "out-of-domain ppl ratio (geo-mean)", "accuracy kept (geo-mean)", "achieved (layers, mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['strategy']} | {r['sparsity']:.3f} | not finished on {', '.join(r['missing'])} |"
                         + " |" * (len(head) - 3))
            continue
        cells = [r["strategy"], f"{r['sparsity']:.3f}", *(_fmt(r["per_model"][m]["ppl_ratio"], "{:.2f}x") for m in models),
                 _fmt(r["ppl_ratio"], "{:.2f}x"), _fmt(r["ood_ppl_ratio"], "{:.2f}x"),
                 _fmt(r["retained_accuracy"], "{:.3f}"), f"{r['achieved_layers']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + merged["meta"] + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else spec.format(value)


def plot(rows: list[dict], folder: Path) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    series: dict[str, list[tuple[float, float]]] = {}
    for r in ok:
        series.setdefault(r["strategy"], []).append((r["achieved_layers"], r["ppl_ratio"]))
    if series:
        fig, ax = pyplot().subplots(figsize=(7.2, 4.8))
        ratio_lines(ax, series)
        save_ratio_plot(fig, ax, folder / "ppl_vs_sparsity.png", "achieved sparsity (layer-equivalents / layers, mean)",
                        "perplexity ratio, calibration domain (geometric mean over models)")
    plot_tradeoff(ok, folder)


def combine(argv: list[str]) -> dict:
    folders, out, overwrite = parse_args(argv)
    summaries = [read_summary(f) for f in folders]  # every folder is checked before anything is written
    check_output_dir(out, overwrite)
    rows = combined_rows(summaries)
    models = [s["model"] for s in summaries]
    meta = ("Geometric mean over the models of each strategy's ratios at each level (each ratio against its own "
            "model's dense reference); a row not finished on every model is left out of the means. Sources: "
            + "; ".join(f"{s['model']} from {f}" for s, f in zip(summaries, folders)) + ".")
    merged = {"meta": meta, "models": models, "sources": [str(f) for f in folders], "rows": rows}

    def write(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps(merged, indent=2))
        (tmp / "table.md").write_text(combined_markdown(merged))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "missing": " ".join(r["missing"])} for r in rows)
        (tmp / "table.csv").write_text(buf.getvalue())
        try:
            plot(rows, tmp)
        except Exception as exc:  # noqa: BLE001 - the tables are the result; a plotting problem must not lose them
            merged["plot_error"] = f"{type(exc).__name__}: {exc}"
            (tmp / "results.json").write_text(json.dumps(merged, indent=2))

    atomic_dir(out, write)  # holds the folder's lock while it writes
    merged["output_dir"] = str(out)
    return merged
