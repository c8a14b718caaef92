"""In-memory speed against the code before the streaming work (issue 18, target (a): "SmolLM2 default
run: no slower than today in the in-memory mode").

    python benchmarks/inmemory_speed.py                 # 2 runs per tree, old/current alternating
    python benchmarks/inmemory_speed.py --runs 3 -- calib.samples=64   # extra key=value for every run

The old revision (default 0b27876, the commit before "accelerate becomes a core dependency") is
extracted read-only with ``git archive | tar -x`` into a temporary folder (no worktree, no checkout),
and so is the current code (``--current``, default HEAD: edits in progress in the working tree
are not measured unless ``--current worktree``).
Both trees run in the same virtual environment: each run is a fresh process whose PYTHONPATH starts
with a folder of links (subfit_core, subfit_plugins, subfit_strategies) to one tree, found before
the editable install's finder; the child checks that every subfit module it loaded came from that
tree. The entry point ``subfit_plugins.builtin`` then resolves to the tree's own plugins.

Every run is the default compression of the embedded model (``strategy=subfit`` on smollm2-135m,
in memory) with evaluation reduced to the calibration domain's held-out perplexity (no other
domains, no lm-eval tasks, no speed measurement) and without the statistics cache (each run
computes its statistics). Runs alternate old, current, old, current, ... with OMP_NUM_THREADS=2.
Reported per run: the wall clock of the whole process, the run inside it (subfit-run's
``run_main``), and ``compression_s`` (sampling, statistics, selection and fitting) from its
results.json; medians per tree and the ratio current / old. Writes
benchmarks/results/inmemory_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"subfit_core": "subfit_core", "subfit_plugins": "plugins", "subfit_strategies": "strategies"}
# The default recipe, evaluation reduced to the calibration domain's held-out perplexity; every key
# here exists with the same meaning in both revisions.
SETTINGS = ["strategy=subfit", "model=smollm2-135m", "cache_stats=false", "eval.domains=[]", "eval.tasks=[]",
            "eval.speed=false", "overwrite=true"]
WARMUP = ["calib.samples=8", "scoring.samples=2", "eval.windows=2", "sparsity=0.05", "save=false"]

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import subfit_core
from subfit_core.apps.cli import run_main
from subfit_core.plugins import get_plugins
get_plugins()  # the entry point's plugin module is imported here
t1, c1 = time.perf_counter(), time.process_time()
code = run_main(sys.argv[1:])
t2, c2 = time.perf_counter(), time.process_time()
files = {name: os.path.realpath(getattr(m, "__file__", "") or "") for name, m in sorted(sys.modules.items())
         if name.split(".")[0] in ("subfit_core", "subfit_plugins", "subfit_strategies")}
print("SPEED-RESULT " + json.dumps({"exit": code, "import_s": t1 - t0, "run_s": t2 - t1, "run_cpu_s": c2 - c1, "modules": files,
                                     "subfit_core": os.path.realpath(subfit_core.__file__)}))
"""


def link_tree(tree: Path, shim: Path) -> Path:
    """A folder of links naming ``tree``'s packages as they are installed (plugins/ is subfit_plugins)."""
    shim.mkdir(parents=True, exist_ok=True)
    for package, folder in PACKAGES.items():
        (shim / package).symlink_to(tree / folder, target_is_directory=True)
    return shim


def extract(rev: str, dest: Path) -> Path:
    """``rev``'s tracked files under ``dest``, read-only from the repository (git archive | tar)."""
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", rev], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {rev} failed")
    return dest


def run_once(label: str, tree: Path, shim: Path, argv: list[str], out: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "SUBFIT_PROGRESS": "0", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=stdout, stderr=stderr, text=True, env=env,
                                 cwd=shim.parent)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own CPU time: robust when other work shares the cores
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        stdout.seek(0)
        stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read()
    line = next((x for x in out_text.splitlines() if x.startswith("SPEED-RESULT ")), None)
    if child.returncode != 0 or line is None:
        raise SystemExit(f"{label} run failed (exit {child.returncode}):\n{out_text[-2000:]}\n{err_text[-4000:]}")
    child_result = json.loads(line.removeprefix("SPEED-RESULT "))
    strays = {name: f for name, f in child_result.pop("modules").items() if not f.startswith(str(tree.resolve()) + os.sep)}
    if strays:
        raise SystemExit(f"{label} run imported subfit modules from outside {tree}: {strays}")
    row = {"tree": label, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, **child_result}
    if out is not None:
        results = json.loads((out / "results.json").read_text())
        t = results["timings"]
        row.update({k: t.get(k) for k in ("compression_s", "sampling_s", "statistics_s", "selection_s", "total_s",
                                          "scoring_evaluations")})
        row["replaced"] = [f"L{r['layer']}.{r['type']}:{r['bypass']}" + (f"/r{r['rank']}" if r.get("rank") else "")
                           for r in results["replaced"]]
        row["perplexity"] = results["perplexity"]["compressed"]
        row["dense_perplexity"] = results["perplexity"]["dense"]
        row["sparsity_achieved"] = results["sparsity"]["achieved_layers"]
    return row


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="0b27876", help="the revision before the streaming work")
    ap.add_argument("--current", default="HEAD", help="the current code: a revision (extracted like --rev), or "
                    "'worktree' for the working tree as it is (uncommitted edits included)")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per tree (alternating)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the short untimed run per tree first")
    ap.add_argument("--keep", action="store_true", help="keep the extracted tree and the output folders")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inmemory_speed")
    ap.add_argument("overrides", nargs="*", help="extra key=value for every run (both trees)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="subfit-inmemory-speed-"))
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    worktree = args.current == "worktree"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD" if worktree else args.current],
                          capture_output=True, text=True, check=True).stdout.strip()
    dirty = worktree and bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *PACKAGES.values()],
                                             capture_output=True, text=True).stdout.strip())
    trees = {"old": extract(args.rev, work / "old"), "current": ROOT if worktree else extract(args.current, work / "current")}
    shims = {label: link_tree(tree, work / f"path-{label}" / "pkgs") for label, tree in trees.items()}
    try:
        if not args.no_warmup:  # converts the model once (cached) and warms the page cache
            for label in trees:
                run_once(label, trees[label], shims[label], [*SETTINGS, *WARMUP, *args.overrides], None)
        rows: list[dict] = []
        for i in range(args.runs):
            for label in ("old", "current"):
                out = work / f"out-{label}-{i}"
                argv = [*SETTINGS, f"output_dir={out}", *args.overrides]
                load = os.getloadavg()[0]
                row = run_once(label, trees[label], shims[label], argv, out)
                row["load_1min_at_start"] = load
                rows.append(row)
                print(f"run {i + 1} {label:<7}  process {row['wall_s']:6.1f} s  CPU {row['cpu_s']:6.1f} s  "
                      f"run {row['run_s']:6.1f} s  compression {row['compression_s']:6.1f} s  load {load:.1f}  "
                      f"({row['subfit_core']})", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                if label == "current":  # after every pair: an interrupted benchmark keeps what it measured
                    table = report(rows, args, rev, head, dirty, final=i + 1 == args.runs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table)


KEYS = ("wall_s", "cpu_s", "run_s", "compression_s", "statistics_s", "selection_s", "sampling_s")


def report(rows: list[dict], args, rev: str, head: str, dirty: bool, final: bool) -> str:
    """Write benchmarks/results/inmemory_speed.{json,md} from the runs so far; returns the table."""
    labels = ("old", "current")
    med = {label: {k: median([r for r in rows if r["tree"] == label], k) for k in KEYS} for label in labels}
    ratio = {k: (med["current"][k] / med["old"][k] if med["old"][k] and med["current"][k] is not None else None)
             for k in KEYS}
    selections = {label: sorted({tuple(r["replaced"]) for r in rows if r["tree"] == label}) for label in labels}
    same = selections["old"] == selections["current"] and len(selections["old"]) == 1
    command = ("python benchmarks/inmemory_speed.py " + " ".join(sys.argv[1:])).strip()
    pairs = len(rows) // 2

    def f(x):
        return "-" if x is None else f"{x:.1f}"

    lines = [f"# In-memory speed: current ({head}{', working tree with uncommitted changes' if dirty else ''}) against {rev}",
             "", f"`{command}`" + ("" if final else f" (partial: {pairs} of {args.runs} pairs so far)"), "",
             "SmolLM2-135M, `subfit-run " + " ".join(SETTINGS + args.overrides) + "`, OMP_NUM_THREADS=2, "
             "one fresh process per run, alternating. Process CPU s (user + system of the child) is the steadier "
             "figure when other work shares the cores (load: the 1-minute load average when the run started).", "",
             "| run | tree | process s | process CPU s | run s | compression s | statistics s | selection s | sampling s | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i // 2 + 1} | {r['tree']} | " + " | ".join(f(r.get(k)) for k in KEYS)
                     + f" | {r['load_1min_at_start']:.1f} |")
    for label in labels:
        lines.append(f"| median | {label} | " + " | ".join(f(med[label][k]) for k in KEYS) + " | |")
    lines.append("| ratio | current / old | " + " | ".join("-" if ratio[k] is None else f"{ratio[k]:.3f}" for k in KEYS) + " | |")
    lines += ["", f"Selections {'match' if same else 'DIFFER'}: "
              + "; ".join(f"{label}: {[', '.join(s) for s in sel]}" for label, sel in selections.items())]
    table = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"old_rev": rev, "current_rev": head, "current_uncommitted_changes": dirty, "command": command, "complete": final,
         "settings": SETTINGS + args.overrides, "rows": rows, "medians": med, "ratio_current_over_old": ratio,
         "selections": {k: [list(s) for s in v] for k, v in selections.items()}, "selections_match": same}, indent=2))
    args.out.with_suffix(".md").write_text(table + "\n")
    return table

if __name__ == "__main__":
    main()
