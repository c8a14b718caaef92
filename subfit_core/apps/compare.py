"""``subfit-compare``: several strategies at several sparsities in one process.

The model and the dense reference (held-out perplexities, tasks) are measured once and shared by
every strategy. With ``calibration=recipe`` (the default) each strategy calibrates as its recipe
says (a baseline's recipe carries its paper's protocol), so strategies are grouped by calibration
and each group gets its own windows and dense statistics (one Session); ``calibration=shared``
gives every strategy the first one's, in one Session. Each (strategy, sparsity) is then only its
own selection and fitting. A strategy that fails is reported as failed, with its error, and the
others still run. Writes results.json, table.md, table.csv and PNG plots, atomically; finished
runs are journalled as they end, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import sys
import time
import traceback
from pathlib import Path

from subfit_core.apps.cli import command
from subfit_core.apps.plotting import pyplot, ratio_lines, save_ratio_plot
from subfit_core.artifact.outputs import atomic_dir, check_output_dir, claim
from subfit_core.config import ConfigError, apply_overrides, parse_bool, parse_override, validate
from subfit_core.engine.pipeline import SESSION_KEYS, build_components, compress, open_session
from subfit_core.engine.streaming import file_stamps
from subfit_core.errors import SubFitError, first_line
from subfit_core.evaluation.tasks import check_tasks
from subfit_core.plugins import get_plugins
from subfit_core.recipes import read_recipe

COLUMNS = ["strategy", "sparsity", "status", "ppl_ratio", "ppl", "ood_ppl_ratio", "achieved_layers", "achieved_params",
           "attn_removed", "ffn_removed", "kv_saving", "compression_s", "compression_over_dense_forward",
           "retained_accuracy", "ttft_speedup", "calibration", "error"]


CALIBRATIONS = ("recipe", "shared")
# the calibration keys a recipe's protocol sets; the text itself and the batch size are the comparison's
PROTOCOL = {"calib": ("samples", "seq_len", "generated"), "scoring": ("samples", "stride")}


def parse_args(argv: list[str]) -> tuple[list[str], list[float], Path, bool, list[tuple[str, object]], str]:
    strategies, sparsities, out, overwrite, shared = None, None, Path("runs/compare"), False, []
    calibration = "recipe"
    for key, value in map(parse_override, argv):
        if key == "calibration":
            if value not in CALIBRATIONS:
                raise ConfigError(f"calibration: {value!r} is not one of {', '.join(CALIBRATIONS)} (recipe: each "
                                  "strategy's own calibration protocol; shared: the first strategy's for all)")
            calibration = str(value)
        elif key == "strategies":
            strategies = value if isinstance(value, list) else [value]
        elif key == "sparsities":
            sparsities = value if isinstance(value, list) else [value]
        elif key == "output_dir":
            out = Path(str(value))
        elif key == "overwrite":
            overwrite = parse_bool(key, value)
        else:
            shared.append((key, value))
    if not strategies:
        raise ConfigError("strategies: give a list, e.g. strategies=[subfit,shortgpt]")
    if not sparsities or not all(isinstance(s, (int, float)) and 0 < s < 1 for s in sparsities):
        raise ConfigError(f"sparsities: {sparsities!r}; give a list of numbers in (0, 1), e.g. sparsities=[0.125,0.25]")
    return [str(s) for s in strategies], [float(s) for s in sparsities], out, overwrite, shared, calibration


def strategy_config(name: str, sparsity: float, shared: list[tuple[str, object]], base: dict | None,
                    calibration: str = "shared") -> dict:
    data, _ = read_recipe(get_plugins(), name)
    apply_overrides(data, shared)
    data.update({"sparsity": sparsity, "save": False})
    cfg = validate(data)
    if base is not None:  # model, text and evaluation settings are the same for every strategy
        own = {section: {key: cfg[section][key] for key in keys} for section, keys in PROTOCOL.items()}
        cfg.update({k: copy.deepcopy(base[k]) for k in SESSION_KEYS})
        if calibration == "recipe":  # ... and the calibration protocol is the recipe's
            for section, values in own.items():
                cfg[section].update(values)
    return cfg


def protocol_of(cfg: dict) -> str:
    """A calibration protocol in words, e.g. ``calibration 64 x 256 (50% sampled), scoring 8 windows``."""
    calib, scoring = cfg["calib"], cfg["scoring"]
    sampled = f" ({calib['generated']:.0%} sampled from the model)" if calib["generated"] else ""
    stride = f" (stride {scoring['stride']})" if scoring["stride"] != 1 else ""
    return (f"calibration {calib['samples']} x {calib['seq_len']}{sampled}, "
            f"scoring {scoring['samples']} window{'s' if scoring['samples'] != 1 else ''}{stride}")


def row_from(name: str, sparsity: float, results: dict) -> dict:
    kv = results["kv_cache_bytes_per_token"]
    attn = sum(1 for r in results["replaced"] if r["type"] == "attn")
    return {
        "strategy": name, "sparsity": sparsity, "status": "ok",
        "ppl_ratio": results["perplexity"]["ratio"], "ppl": results["perplexity"]["compressed"],
        # the geometric mean over the domains the run did not calibrate on, and each domain's ratio
        "ood_ppl_ratio": results["perplexity"].get("out_of_domain_ratio"),
        "domains": {name: d["ratio"] for name, d in results["perplexity"].get("domains", {}).items()
                    if not d["calibrated"]},
        "achieved_layers": results["sparsity"]["achieved_layers"], "achieved_params": results["sparsity"]["achieved_params"],
        "attn_removed": attn, "ffn_removed": len(results["replaced"]) - attn,
        "kv_saving": 1 - kv["after"] / kv["before"],
        "compression_s": results["timings"]["compression_s"],
        "compression_over_dense_forward": results["timings"]["compression_over_dense_forward"],
        "retained_accuracy": results.get("downstream", {}).get("retained_accuracy"),
        "ttft_speedup": results.get("deployment", {}).get("ratios", {}).get("ttft_speedup"),
        "error": "", "replaced": [[r["layer"], r["type"]] for r in results["replaced"]],
    }


def markdown(rows: list[dict], meta: str) -> str:
    # Retained accuracy and TTFT speed-up get columns only when tasks / speed were configured.
    extra = [(key, title, fmt) for key, title, fmt in (("retained_accuracy", "retained accuracy", "{:.3f}"),
                                                       ("ttft_speedup", "TTFT speed-up", "{:.2f}x"))
             if any(r.get(key) is not None for r in rows)]
    unseen = list(dict.fromkeys(name for r in rows for name in r.get("domains", {})))
    head = ["strategy", "sparsity", "ppl ratio", *(f"{name} ppl ratio" for name in unseen),
            *(["out-of-domain ppl ratio"] if unseen else []), "achieved (layers)", "achieved (params)", "removed",
            "KV-cache saving", *(title for _, title, _ in extra), "compression (x dense forward)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['strategy']} | {r['sparsity']:.3f} | failed: {r['error']} |" + " |" * (len(head) - 3))
            continue
        cells = [r["strategy"], f"{r['sparsity']:.3f}", f"{r['ppl_ratio']:.2f}x",
                 *(_ratio(r.get("domains", {}).get(name)) for name in unseen),
                 *([_ratio(r.get("ood_ppl_ratio"))] if unseen else []), f"{r['achieved_layers']:.4f}",
                 f"{r['achieved_params']:.4f}", f"{r['attn_removed']} attn + {r['ffn_removed']} ffn",
                 f"{r['kv_saving']:.1%}",
                 *(fmt.format(r[key]) if r.get(key) is not None else "" for key, _, fmt in extra),
                 # the dense forward is over the row's own calibration windows: seconds compare across protocols
                 f"{r['compression_s']:.0f} s ({r['compression_over_dense_forward']:.2f}x)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + meta + "\n"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot(rows: list[dict], layers: int, folder: Path) -> None:
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    series = {name: [(r["achieved_layers"], r["ppl_ratio"]) for r in ok if r["strategy"] == name]
              for name in dict.fromkeys(r["strategy"] for r in ok)}
    ratio_lines(ax, series)  # the table keeps every number; the plot leaves off-scale strategies out
    save_ratio_plot(fig, ax, folder / "ppl_vs_sparsity.png", "achieved sparsity (layer-equivalents / layers)",
                    "perplexity ratio (compressed / dense), calibration domain")
    unseen = {name: [(r["achieved_layers"], r["ood_ppl_ratio"]) for r in ok
                     if r["strategy"] == name and r.get("ood_ppl_ratio") is not None] for name in series}
    if any(unseen.values()):
        fig, ax = plt.subplots(figsize=(7.2, 4.8))
        ratio_lines(ax, {name: points for name, points in unseen.items() if points})
        save_ratio_plot(fig, ax, folder / "ood_ppl_vs_sparsity.png", "achieved sparsity (layer-equivalents / layers)",
                        "perplexity ratio, domains not calibrated on (geometric mean)")
    plot_tradeoff(ok, folder)

    for sparsity in dict.fromkeys(r["sparsity"] for r in ok):
        sel = [r for r in ok if r["sparsity"] == sparsity]
        grid = [[0.0] * layers for _ in range(2 * len(sel))]
        labels = []
        for i, r in enumerate(sel):
            labels += [f"{r['strategy']} attn", f"{r['strategy']} ffn"]
            for layer, kind in r["replaced"]:
                grid[2 * i + (0 if kind == "attn" else 1)][layer] = 1.0
        fig, ax = plt.subplots(figsize=(max(6.0, layers * 0.28), 0.32 * len(labels) + 1.2))
        ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xticks(range(layers), [str(l) for l in range(layers)], fontsize=7)
        ax.set_xlabel("layer (black: replaced or removed)")
        ax.set_title(f"removed submodules at sparsity {sparsity:g}", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / f"removed_map_{sparsity:g}.png", dpi=120)
        plt.close(fig)


def plot_tradeoff(rows: list[dict], folder: Path) -> None:
    """Perplexity ratio against accuracy kept, one curve per strategy through its sparsity levels
    (lower and further right is better; a curve runs right to left as sparsity grows): tradeoff.png
    on the calibration domain, ood_tradeoff.png on the domains not calibrated on. Drawn only when
    tasks were evaluated."""
    plt = pyplot()
    for key, filename, label in (("ppl_ratio", "tradeoff.png", "calibration domain"),
                                 ("ood_ppl_ratio", "ood_tradeoff.png", "domains not calibrated on (geometric mean)")):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in sorted(rows, key=lambda r: r["achieved_layers"]):  # a curve follows its levels
            if r.get("retained_accuracy") is not None and r.get(key) is not None:
                series.setdefault(r["strategy"], []).append((r["retained_accuracy"], r[key]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7.2, 4.8))
        ratio_lines(ax, series, ordered=True)
        save_ratio_plot(fig, ax, folder / filename, "accuracy kept (compressed / dense, bundled tasks)",
                        f"perplexity ratio, {label}")


def compare(argv: list[str]) -> dict:
    strategies, sparsities, out, overwrite, shared, calibration = parse_args(argv)
    check_output_dir(out, overwrite)
    with claim(out):  # one comparison per output folder at a time
        return run_comparison(strategies, sparsities, out, shared, calibration)


def run_comparison(strategies: list[str], sparsities: list[float], out: Path, shared: list[tuple[str, object]],
                   calibration: str = "recipe") -> dict:
    base = strategy_config(strategies[0], sparsities[0], shared, None)
    # protocol -> (its description, its strategies in the order given); keyed on the values, since the
    # description rounds (12% sampled is 0.12 or 0.125)
    groups: dict[tuple, tuple[str, list[str]]] = {}
    recipes: dict[str, dict] = {}  # what each strategy runs: a journal written for other recipes is not resumed
    for name in strategies:  # unknown recipes and bad keys (shared overrides too) fail before any work
        try:
            cfg = strategy_config(name, sparsities[0], shared, base, calibration)
            build_components(get_plugins(), cfg)
            if cfg["runner"]["name"] != "none":
                raise ConfigError(f"runner.name: {cfg['runner']['name']} delivers its own kind of model; subfit-compare "
                                  "compares compressed models (run this recipe with subfit-run)")
        except SubFitError as exc:
            raise SubFitError(f"strategy {name}: {exc}") from None
        key = tuple(cfg[section][k] for section, keys in PROTOCOL.items() for k in keys)
        groups.setdefault(key, (protocol_of(cfg), []))[1].append(name)
        recipes[name] = {k: v for k, v in cfg.items() if k not in ("sparsity", "output_dir", "overwrite")}
    check_tasks(base["eval"]["tasks"], get_plugins())
    journal = Journal(out, {"strategies": strategies, "sparsities": sparsities,
                            "shared": [[k, v] for k, v in shared], "calibration": calibration, "recipes": recipes,
                            "files": {spec: files_fingerprint(spec) for spec in
                                      (base["model"], base["calib"]["dataset"], base["eval"]["dataset"]) if spec}})
    done: dict[tuple[str, float], dict] = {}
    described, count = [], len(strategies) * len(sparsities)
    # the model (unless streamed) and the dense reference carry over from group to group; the windows and
    # statistics do not
    session, loaded, reference = None, None, None
    for protocol, names in groups.values():
        todo = [(name, sparsity) for name in names for sparsity in sparsities]
        done.update({key: journal.done[key] for key in todo if key in journal.done})
        todo = [key for key in todo if key not in done]
        if not todo:
            described.append(f"{protocol}: {', '.join(names)} (journalled)")
            continue
        first = strategy_config(names[0], sparsities[0], shared, base, calibration)
        session = None  # the previous group's statistics are freed before this group's pass
        try:
            session = open_session(first, loaded=loaded, reference=reference)
        except Exception as exc:  # noqa: BLE001 - a protocol the text cannot serve fails its rows, not the others
            line = first_line(exc)
            error = f"{type(exc).__name__}: calibration protocol of {', '.join(names)} ({protocol}): {line}"
            for name, sparsity in todo:
                done[name, sparsity] = {"strategy": name, "sparsity": sparsity, "status": "failed", "error": error,
                                        "traceback": traceback.format_exc(), "compression_s": 0.0,
                                        "calibration": protocol}
                journal.add(done[name, sparsity])
            described.append(f"{protocol}: {', '.join(names)} (failed to open: {line})")
            print(f"[{len(done)}/{count}] {', '.join(names)}: {error}", file=sys.stderr, flush=True)
            continue
        loaded = (session.model, session.tokenizer, session.model_source) if session.bench.stream is None else None
        reference = session.reference()
        described.append(f"{protocol}: {', '.join(names)} (dense statistics {session.stats_s:.1f} s"
                         f"{', read from the cache' if session.stats_cached else ''})")
        for name, sparsity in todo:
            t0 = time.perf_counter()
            try:
                cfg = strategy_config(name, sparsity, shared, base, calibration)
                row = {**row_from(name, sparsity, compress(session, cfg).results), "calibration": protocol}
            except Exception as exc:  # noqa: BLE001 - one failing strategy must not stop the comparison
                line = first_line(exc)
                row = {"strategy": name, "sparsity": sparsity, "status": "failed",
                       "error": f"{type(exc).__name__}: {line}", "traceback": traceback.format_exc(),
                       "compression_s": time.perf_counter() - t0, "calibration": protocol}
            session.bench.restore()
            done[name, sparsity] = row
            journal.add(row)
            outcome = f"{row['ppl_ratio']:.2f}x" if row["status"] == "ok" else row["error"]
            print(f"[{len(done)}/{count}] {name} @ {sparsity:g}: {outcome} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    if session is None:  # every row journalled, or the last protocol failed: the dense reference for the
        # summary, on the least calibration a session takes (held-out windows do not depend on it)
        light = copy.deepcopy(base)
        light["calib"].update(samples=1, generated=0.0)
        light["scoring"]["samples"] = 1
        session = open_session(light, loaded=loaded, reference=reference)
    rows = [done[name, sparsity] for name in strategies for sparsity in sparsities]
    meta = (f"Model {base['model']}; dense held-out perplexity {session.dense_ppl:.2f} on "
            f"{base['eval']['windows']} x {base['eval']['seq_len']} tokens of {base['eval']['dataset'] or base['calib']['dataset']}; "
            f"device {session.device}. Calibration text {base['calib']['dataset']}, "
            + ("each strategy's own protocol" if calibration == "recipe" else "one protocol for all")
            + " (dense statistics computed once per protocol and included in every strategy's compression time): "
            + "; ".join(described) + ".")
    summary = {"meta": meta, "model": str(base["model"]), "strategies": strategies, "sparsities": sparsities,
               "shared_overrides": [f"{k}={v}" for k, v in shared], "calibration": calibration,
               "protocols": {protocol: names for protocol, names in groups.values()},
               "dense_ppl": session.dense_ppl, "rows": rows}

    def write(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps(summary, indent=2))
        (tmp / "table.md").write_text(markdown(rows, meta))
        (tmp / "table.csv").write_text(csv_text(rows))
        try:
            plot(rows, session.adapter.num_layers, tmp)
        except Exception as exc:  # noqa: BLE001 - the tables are the result; a plotting problem must not lose them
            summary["plot_error"] = f"{type(exc).__name__}: {exc}"
            (tmp / "results.json").write_text(json.dumps(summary, indent=2))

    atomic_dir(out, write)
    journal.close()
    summary["output_dir"] = str(out)
    return summary


def files_fingerprint(spec: str) -> list:
    """What identifies a local file or folder a comparison reads (each file's name, size and time), so
    its journal does not serve rows measured on an earlier version; [] for a registered name or hub id."""
    path = Path(str(spec)).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return file_stamps(files)


class Journal:
    """Finished rows of an unfinished comparison, one JSON line each, next to the output folder, so
    the same command run again skips them (failed rows are retried). Removed once the results
    are written."""

    def __init__(self, out: Path, args: dict):
        self.path = out.parent / f".{out.name}.journal.jsonl"
        self.done: dict[tuple[str, float], dict] = {}
        header = json.dumps(args, sort_keys=True, default=str)
        if self.path.exists():
            try:
                lines = self.path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                lines = []
            if lines and lines[0] == header:
                skipped = 0
                for line in lines[1:]:
                    row = self.parse(line)
                    if row is None:  # a line cut short by the interruption, or not ours
                        skipped += 1
                    elif row["status"] == "ok":
                        self.done[row["strategy"], row["sparsity"]] = row
                note = f" ({skipped} unreadable lines ignored)" if skipped else ""
                print(f"resuming: {len(self.done)} finished runs from {self.path}{note}", file=sys.stderr)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(header + "\n" + "".join(json.dumps(r) + "\n" for r in self.done.values()))

    @staticmethod
    def parse(line: str) -> dict | None:
        """One journal row, or None if the line is not a complete row."""
        try:
            row = json.loads(line)
        except ValueError:
            return None
        ok = (isinstance(row, dict) and isinstance(row.get("strategy"), str) and isinstance(row.get("status"), str)
              and isinstance(row.get("sparsity"), (int, float)) and not isinstance(row.get("sparsity"), bool))
        return row if ok else None

    def add(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


@command("subfit-compare", "interrupted; finished runs are kept, run the same command again to resume")
def compare_main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print("usage: subfit-compare strategies=[subfit,shortgpt,...] sparsities=[0.125,0.25,0.375] "
              "[calibration=recipe|shared] [output_dir=runs/compare] [overwrite=true] [key=value ...]\n"
              "       subfit-compare combine=[FOLDER,FOLDER,...] [output_dir=runs/compare-models] [overwrite=true]\n"
              "Runs every strategy at every sparsity in one process, sharing the model and the dense\n"
              "reference; calibration=recipe (default) calibrates each strategy as its recipe says (the\n"
              "baselines' papers' protocols), shared gives all the first strategy's. Other key=value\n"
              "overrides apply to every strategy (e.g. calib.samples=32 sets it for all).\n"
              "combine= reads the output folders of comparisons on several models and writes the\n"
              "geometric mean over the models of each strategy's ratios at each level.")
        return 0
    if any(arg.startswith("combine=") for arg in argv):
        from subfit_core.apps.combine import combine, combined_markdown

        merged = combine(argv)
        print(combined_markdown(merged))
        print(f"written to {merged['output_dir']}")
        return 0
    summary = compare(argv)
    print(markdown(summary["rows"], summary["meta"]))
    print(f"written to {summary['output_dir']}")
    return 0
