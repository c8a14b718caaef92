"""``subfit-sweep``: an Optuna study over a recipe's knobs, on one machine or many.

The search space is the recipe's ``sweep.space``: dotted recipe keys mapped to distributions. A
worker opens one Session (model, windows, dense reference, dense statistics: computed once, or
read from the statistics cache another worker wrote) and runs trials on it; each trial is the
recipe with the sampled values applied, compressed with ``pipeline.compress``. The objective is
perplexity on a *validation* split cut from the calibration text (disjoint from calibration,
scoring and the held-out text); the held-out perplexity each trial also reports is the test
number and is never optimised. Several workers join one study by running the same command against
the same storage; each stops once the study holds ``sweep.trials`` finished trials.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .outputs import atomic_dir
from .cli import command
from .config import ConfigError, apply_overrides, validate
from .errors import SubFitError
from .metrics import forward_seconds, perplexity
from .pipeline import SESSION_KEYS, Session, build_components, compress, open_session
from .plotting import pyplot, save_ratio_plot
from .plugins import get_plugins

# objective -> (direction, what it measures)
OBJECTIVES = {
    "ppl": ("minimize", "validation perplexity ratio (compressed / dense)"),
    "sparsity": ("maximize", "achieved sparsity in the recipe's unit"),
    "latency": ("minimize", "forward seconds on the validation windows, this process (noisy)"),
}
DISTRIBUTIONS = ("int", "float", "categorical")
FINISHED = ("COMPLETE", "PRUNED")


# ----------------------------------------------------------------------------- the recipe's sweep section


def check_space(cfg: dict) -> dict[str, dict]:
    """Every ``sweep.space`` entry well formed, and both ends of its range a valid recipe, before any work."""
    space = cfg["sweep"]["space"]
    if not space:
        raise ConfigError("sweep.space: empty; map recipe keys to distributions, e.g. "
                          "{fitter.attn.rank: {int: [16, 128], log: true}}")
    for key, spec in space.items():
        where = f"sweep.space.{key}"
        top = str(key).split(".")[0]
        if top in SESSION_KEYS or top == "sweep":
            raise ConfigError(f"{where}: '{top}' is shared by every trial (model, data, evaluation) and cannot be swept")
        if not isinstance(spec, dict) or len([k for k in spec if k in DISTRIBUTIONS]) != 1:
            raise ConfigError(f"{where}: {spec!r}; expected one of {{int: [lo, hi]}}, {{float: [lo, hi]}}, "
                              "{categorical: [a, b, ...]} (with log: true or step: s for numbers)")
        kind = next(k for k in spec if k in DISTRIBUTIONS)
        extra = set(spec) - {kind, "log", "step"}
        if extra or (kind == "categorical" and set(spec) != {kind}):
            raise ConfigError(f"{where}: unknown option {sorted(extra or set(spec) - {kind})[0]!r}; "
                              "allowed: log, step (int and float only)")
        values = spec[kind]
        if kind == "categorical":
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.categorical: {values!r}; give a non-empty list")
            ends = values
        else:
            number = int if kind == "int" else (int, float)
            if (not isinstance(values, list) or len(values) != 2 or not all(isinstance(v, number) and not
                                                                             isinstance(v, bool) for v in values)
                    or not all(math.isfinite(v) for v in values) or values[0] > values[1]):
                raise ConfigError(f"{where}.{kind}: {values!r}; give [low, high] finite {kind}s with low <= high")
            step = spec.get("step")
            if step is not None and (not isinstance(step, number) or isinstance(step, bool) or not math.isfinite(step)
                                     or step <= 0):
                raise ConfigError(f"{where}.step: {step!r}; give a positive finite {kind}")
            if spec.get("log") and values[0] <= 0:
                raise ConfigError(f"{where}.{kind}: {values!r}; log: true needs low > 0")
            ends = values
        for value in ends:
            try:
                trial_cfg = validate(apply_overrides(copy.deepcopy(cfg), [(key, value)]))
                build_components(get_plugins(), trial_cfg)
            except ConfigError as exc:
                raise ConfigError(f"sweep.space: {exc}") from None
    objectives = cfg["sweep"]["objectives"]
    if not objectives or objectives[0] != "ppl" or len(objectives) > 2 or any(o not in OBJECTIVES for o in objectives):
        raise ConfigError(f"sweep.objectives: {objectives!r}; allowed: [ppl], [ppl, sparsity], [ppl, latency]")
    return space


def suggest(trial, space: dict[str, dict]) -> list[tuple[str, object]]:
    out = []
    for key, spec in space.items():
        if "categorical" in spec:
            out.append((key, trial.suggest_categorical(key, spec["categorical"])))
        elif "int" in spec:
            lo, hi = spec["int"]
            out.append((key, trial.suggest_int(key, lo, hi, log=bool(spec.get("log")), step=spec.get("step", 1))))
        else:
            lo, hi = spec["float"]
            out.append((key, trial.suggest_float(key, lo, hi, log=bool(spec.get("log")), step=spec.get("step"))))
    return out


def trial_config(base: dict, values: list[tuple[str, object]]) -> dict:
    """The plain recipe a trial runs: the base recipe with the sampled values, without ``sweep``."""
    data = apply_overrides(copy.deepcopy(base), values)
    data.pop("sweep", None)
    data["save"] = False
    return validate(data)


# ----------------------------------------------------------------------------- storage and study


def storage_for(sweep: dict):
    """An Optuna storage: a URL as given, a ``.log``/``.jsonl`` path as a journal file, any other path
    as an SQLite file (default ``<output_dir>.db``). RDB storages get a heartbeat, so the trial of
    a killed worker is marked failed and re-run by the next worker."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    spec = sweep["storage"] or f"{sweep['output_dir'].rstrip('/')}.db"
    if "://" not in spec:
        path = Path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".log", ".jsonl", ".journal"):
            try:  # replaying the log reads every line: a file that is not a journal fails here
                return JournalStorage(JournalFileBackend(str(path)))
            except Exception as exc:  # noqa: BLE001
                raise SubFitError(f"sweep.storage: '{path}' is not an Optuna journal file "
                                  f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from None
        spec = f"sqlite:///{path}"
    if spec.startswith(("sqlite", "postgresql", "mysql")):
        # optuna >= 4.9 names the retry callback for what it handles (stale heartbeats)
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        retry_kw = "heartbeat_stale_trial_callback" if retry else "failed_trial_callback"
        retry = retry or optuna.storages.RetryFailedTrialCallback
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental; they are what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(spec, heartbeat_interval=sweep["heartbeat_s"], grace_period=2 * sweep["heartbeat_s"],
                                  **{retry_kw: retry(max_retry=1)})
        except Exception as exc:  # noqa: BLE001 - a wrong URL or a missing driver is the user's to fix
            raise SubFitError(f"sweep.storage: cannot open {spec!r}: {str(exc).splitlines()[0]}") from None
    try:
        return optuna.storages.get_storage(spec)
    except Exception as exc:  # noqa: BLE001
        raise SubFitError(f"sweep.storage: cannot open {spec!r}: {str(exc).splitlines()[0]}") from None


def make_sampler(sweep: dict, offset: int):
    import optuna

    seed = None if sweep["seed"] is None else sweep["seed"] + offset
    name = sweep["sampler"]
    if name == "auto":
        name = "tpe" if len(sweep["objectives"]) == 1 else "nsga2"
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, sweep["trials"] // 3)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, sweep["trials"] // 4)))
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(cfg: dict):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = cfg["sweep"]
    storage = storage_for(sweep)
    directions = [OBJECTIVES[o][0] for o in sweep["objectives"]]
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
              if sweep["pruner"] == "median" and len(directions) == 1 else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=sweep["study_name"], directions=directions,
                                pruner=pruner, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise SubFitError(f"sweep.objectives: study '{sweep['study_name']}' in this storage was created for "
                          f"{len(study.directions)} objective(s); use another sweep.study_name")
    study.sampler = make_sampler(sweep, len(study.get_trials(deepcopy=False)))
    return study


def base_values(cfg: dict, space: dict[str, dict]) -> dict:
    """The recipe's own value of each swept key, where the recipe sets one inside the space."""
    out = {}
    for key, spec in space.items():
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        kind = next(k for k in spec if k in DISTRIBUTIONS)
        inside = node in spec[kind] if kind == "categorical" else (
            isinstance(node, (int, float)) and not isinstance(node, bool) and spec[kind][0] <= node <= spec[kind][1])
        if node is not None and inside:
            out[key] = node
    return out


def counts(study) -> tuple[int, int]:
    """(finished, running) trials of the study, over all workers."""
    trials = study.get_trials(deepcopy=False)
    return (sum(t.state.name in FINISHED for t in trials), sum(t.state.name == "RUNNING" for t in trials))


# ----------------------------------------------------------------------------- one trial


class Surplus(Exception):
    """Two workers asked for the last trial at once; the later one is dropped (marked failed)."""


@dataclass
class Worker:
    cfg: dict  # the base recipe, validated, with its sweep section
    session: Session
    dense_val_ppl: float
    space: dict

    def objective(self, trial):
        import optuna

        sweep = self.cfg["sweep"]
        earlier = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number
                   and t.state.name in (*FINISHED, "RUNNING")]
        if len(earlier) >= sweep["trials"]:
            raise Surplus()
        values = suggest(trial, self.space)
        cfg = trial_config(self.cfg, values)
        val = self.session.windows.validation
        single = len(sweep["objectives"]) == 1
        measured: dict[str, float] = {}

        def validate_split() -> None:
            # Validation perplexity over growing chunks of the validation windows: each cumulative
            # value is an intermediate result, so a clearly worse trial stops before the rest.
            nll, count = 0.0, 0
            chunks = [c for c in val.tensor_split(min(sweep["prune_steps"], val.shape[0])) if c.numel()]
            for step, chunk in enumerate(chunks):
                ppl = perplexity(self.session.model, chunk, cfg["eval"]["batch_size"], self.session.device,
                                 "validation perplexity")
                n = chunk[:, 1:].numel()
                nll, count = nll + math.log(ppl) * n, count + n
                if single:
                    trial.report(math.exp(nll / count) / self.dense_val_ppl, step)
                    if trial.should_prune():
                        raise optuna.TrialPruned()
            measured["ppl"] = math.exp(nll / count) / self.dense_val_ppl
            if "latency" in sweep["objectives"]:
                measured["latency"] = forward_seconds(self.session.model, val, cfg["eval"]["batch_size"],
                                                      self.session.device)

        try:
            results = compress(self.session, cfg, before_eval=validate_split).results
        finally:
            self.session.bench.restore()
        measured["sparsity"] = results["sparsity"][f"achieved_{cfg['sparsity_unit']}"]
        trial.set_user_attr("test_ppl", results["perplexity"]["compressed"])
        trial.set_user_attr("test_ratio", results["perplexity"]["ratio"])
        trial.set_user_attr("val_ratio", measured["ppl"])
        trial.set_user_attr("achieved_sparsity", measured["sparsity"])
        trial.set_user_attr("replaced", [f"L{r['layer']}.{r['type']}" for r in results["replaced"]])
        if "latency" in measured:
            trial.set_user_attr("latency_s", measured["latency"])
        return tuple(measured[o] for o in sweep["objectives"]) if not single else measured["ppl"]


def has_heartbeat(study) -> bool:
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None


def fail_stale_trials(study) -> None:
    """SQL storages: fail the trials of workers whose heartbeat stopped (their parameters are re-queued)."""
    import warnings

    import optuna

    if has_heartbeat(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def fail_overdue_trials(study) -> None:
    """A trial running for more than 3x the longest finished trial belongs to a dead worker; mark it
    failed and queue its parameters again. This is the only guard on storages without a heartbeat
    (journal files), and the fallback on SQL ones: a worker killed before its trial's first
    heartbeat leaves a RUNNING trial that Optuna's heartbeat check never fails."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    took = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
            if t.state.name == "COMPLETE" and t.datetime_start and t.datetime_complete]
    if not took:
        return
    now = datetime.now()
    for t in trials:
        if t.state.name == "RUNNING" and t.datetime_start and (now - t.datetime_start).total_seconds() > 3 * max(took):
            try:
                study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            except Exception:  # noqa: BLE001 - another worker got there first
                continue
            study.enqueue_trial(t.params, skip_if_exists=False)


def run_worker(cfg: dict, on_trial=None) -> dict:
    """Join (or create) the study and run trials until it holds ``sweep.trials`` finished ones;
    then write the study's tables and best recipe. ``on_trial(study, trial)`` after each trial."""
    sweep = cfg["sweep"]
    space = check_space(cfg)
    study = open_study(cfg)  # a wrong storage fails before the model loads
    if sweep["enqueue_base"] and not study.get_trials(deepcopy=False):
        study.enqueue_trial(base_values(cfg, space))  # trial 0: the recipe as written, for comparison
    session = open_session(trial_config(cfg, []), validation_windows=sweep["validation_windows"])
    dense_val = perplexity(session.model, session.windows.validation, cfg["eval"]["batch_size"], session.device,
                           "dense validation perplexity")
    study.set_user_attr("dense_val_ppl", dense_val)
    study.set_user_attr("dense_test_ppl", session.dense_ppl)
    worker = Worker(cfg, session, dense_val, space)
    while True:
        finished, running = counts(study)
        if finished >= sweep["trials"]:
            break
        if finished + running >= sweep["trials"]:
            # the last trials are running elsewhere: wait for them (or for their worker to be declared dead)
            fail_stale_trials(study)
            fail_overdue_trials(study)
            time.sleep(min(5.0, sweep["heartbeat_s"] / 2))
            continue
        ran: list = []
        study.optimize(worker.objective, n_trials=1, catch=(Surplus,), gc_after_trial=False,
                       callbacks=[lambda _, trial: ran.append(trial)])
        note(study, ran[-1], sweep["trials"])
        if on_trial is not None:
            on_trial(study, ran[-1])
    return write_outputs(cfg, study)


def note(study, trial, total: int) -> None:
    finished, _ = counts(study)
    if trial.state.name == "COMPLETE":
        a = trial.user_attrs
        what = f"val {a['val_ratio']:.3f}x, test {a['test_ratio']:.3f}x"
    else:
        what = trial.state.name.lower()
    print(f"[{finished}/{total}] trial {trial.number}: {what}  {trial.params}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- outputs


def rows_of(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in FINISHED:
            continue
        a = t.user_attrs
        rows.append({"trial": t.number, "state": t.state.name.lower(), "val_ratio": a.get("val_ratio"),
                     "test_ratio": a.get("test_ratio"), "test_ppl": a.get("test_ppl"),
                     "achieved_sparsity": a.get("achieved_sparsity"), "latency_s": a.get("latency_s"),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None,
                     "params": dict(t.params), "replaced": a.get("replaced", [])})
    return rows


def best_trials(study, objectives: list[str]):
    """Single objective: the best trial. Several: the Pareto front, by validation perplexity."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return []
    if len(objectives) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.values[0])


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(rows: list[dict], params: list[str], meta: str, title: str) -> str:
    head = ["trial", "state", "val ppl ratio", "test ppl ratio", "sparsity", "latency s", "seconds", *params]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial"], r["state"], r["val_ratio"], r["test_ratio"], r["achieved_sparsity"], r["latency_s"],
                 r["seconds"], *[r["params"].get(p) for p in params]]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n\n" + meta + "\n"


def csv_text(rows: list[dict], params: list[str]) -> str:
    buf = io.StringIO()
    cols = ["trial", "state", "val_ratio", "test_ratio", "test_ppl", "achieved_sparsity", "latency_s", "seconds"]
    writer = csv.writer(buf)
    writer.writerow(cols + params)
    for r in rows:
        writer.writerow([r[c] for c in cols] + [r["params"].get(p) for p in params])
    return buf.getvalue()


def plot_pareto(rows: list[dict], front: list[dict], objectives: list[str], path: Path) -> None:
    plt = pyplot()
    key = {"sparsity": "achieved_sparsity", "latency": "latency_s"}[objectives[1]]
    done = [r for r in rows if r["state"] == "complete"]
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    ax.scatter([r[key] for r in done], [r["val_ratio"] for r in done], s=14, c="0.6", label="trials")
    pts = sorted((r[key], r["val_ratio"]) for r in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", c="C3", label="Pareto front")
    xlabel = {"sparsity": "achieved sparsity", "latency": "forward seconds (validation windows, noisy)"}[objectives[1]]
    save_ratio_plot(fig, ax, path, xlabel, "validation perplexity ratio")


def plot_history(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    done = sorted((r["trial"], r["val_ratio"], r["test_ratio"]) for r in rows if r["state"] == "complete")
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot([d[0] for d in done], [d[1] for d in done], "o", ms=4, label="validation (optimised)")
    ax.plot([d[0] for d in done], [d[2] for d in done], "x", ms=4, label="held-out test (reported)")
    best = [min(d[1] for d in done[:i + 1]) for i in range(len(done))]
    ax.plot([d[0] for d in done], best, "-", c="C0", alpha=0.6, label="best validation so far")
    save_ratio_plot(fig, ax, path, "trial", "perplexity ratio (compressed / dense)")


def best_recipe(cfg: dict, trial) -> dict:
    """The plain recipe of a trial: ``subfit-run strategy=<this file>`` reproduces its test numbers."""
    recipe = trial_config(cfg, list(trial.params.items()))
    recipe.update({"name": f"{cfg['sweep']['study_name']}-trial{trial.number}", "save": True,
                   "description": f"best trial {trial.number} of sweep '{cfg['sweep']['study_name']}' over "
                                  f"{cfg['name']}: validation ppl ratio {trial.user_attrs['val_ratio']:.4f}, "
                                  f"held-out {trial.user_attrs['test_ratio']:.4f}"})
    recipe.pop("sweep", None)
    return recipe


def write_outputs(cfg: dict, study) -> dict:
    """Tables, plots and the best recipe of the study as it stands (from the storage alone)."""
    sweep = cfg["sweep"]
    objectives = sweep["objectives"]
    rows = rows_of(study)
    params = list(sweep["space"])
    best = best_trials(study, objectives)
    front = [r for r in rows if r["trial"] in {t.number for t in best}]
    dense = study.user_attrs
    meta = (f"Study '{sweep['study_name']}' of recipe {cfg['name']} on {cfg['model']} at sparsity {cfg['sparsity']} "
            f"({cfg['sparsity_unit']}); objective(s): {', '.join(objectives)}; {len(rows)} finished trials. Validation: "
            f"{sweep['validation_windows']} x {cfg['calib']['seq_len']} tokens of the calibration text, disjoint from "
            f"calibration and scoring (dense perplexity {dense.get('dense_val_ppl', float('nan')):.2f}); test: "
            f"{cfg['eval']['windows']} x {cfg['eval']['seq_len']} held-out tokens (dense "
            f"{dense.get('dense_test_ppl', float('nan')):.2f}), never optimised. Ratios are compressed / dense on the "
            "same split.")
    summary = {"meta": meta, "study_name": sweep["study_name"], "objectives": objectives, "space": sweep["space"],
               "dense_val_ppl": dense.get("dense_val_ppl"), "dense_test_ppl": dense.get("dense_test_ppl"),
               "trials": rows, "best": [r["trial"] for r in front],
               "finished": len(rows), "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = Path(sweep["output_dir"])

    def write(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps(summary, indent=2))
        (tmp / "trials.md").write_text(markdown(rows, params, meta, "All finished trials"))
        (tmp / "trials.csv").write_text(csv_text(rows, params))
        if best:
            (tmp / "best.yaml").write_text(yaml.safe_dump(best_recipe(cfg, best[0]), sort_keys=False))
        if len(objectives) > 1:
            (tmp / "pareto.md").write_text(markdown(front, params, meta, "Pareto front"))
            (tmp / "pareto.csv").write_text(csv_text(front, params))
        try:
            if rows:
                plot_history(rows, tmp / "history.png")
            if len(objectives) > 1 and front:
                plot_pareto(rows, front, objectives, tmp / "pareto.png")
        except Exception as exc:  # noqa: BLE001 - the tables are the result; a plotting problem must not lose them
            summary["plot_error"] = f"{type(exc).__name__}: {exc}"
            (tmp / "results.json").write_text(json.dumps(summary, indent=2))

    atomic_dir(out, write, wait=120)  # workers of one study rewrite the same summary: take turns
    summary["output_dir"] = str(out)
    return summary


def report_only(cfg: dict) -> dict:
    """``--report``: write the outputs of a study in progress or stopped, without loading the model."""
    check_space(cfg)
    study = open_study(cfg)
    if not study.get_trials(deepcopy=False):
        raise SubFitError(f"sweep.study_name: study '{cfg['sweep']['study_name']}' has no trials in this storage yet")
    return write_outputs(cfg, study)


# ----------------------------------------------------------------------------- command line

USAGE = """usage: subfit-sweep strategy=NAME|PATH.yaml [sweep.trials=N] [sweep.storage=URL|FILE] [key=value ...]

Tune a recipe with Optuna over its sweep.space (see strategies/subfit-sweep.yaml). Several workers,
on one machine or many, join one study by running the same command against the same storage
(an SQLite file by default; any Optuna storage URL; a .log path is a journal file); a killed
sweep resumes when run again. Writes trials.md/.csv, history.png, best.yaml (a plain recipe for
subfit-run) and, with two objectives, pareto.md/.csv/.png under sweep.output_dir.
  --report    write those outputs for the study as it stands (no model is loaded, no trial runs)
Example:
  subfit-sweep strategy=subfit-sweep sweep.trials=30 sweep.storage=runs/sweep.db
"""


@command("subfit-sweep", "interrupted; finished trials are kept in the storage, run the same command to resume")
def sweep_main(argv: list[str]) -> int:
    import logging
    import os

    from .cli import resolve_recipe

    logging.basicConfig(level=os.environ.get("SUBFIT_LOG", "WARNING"))
    if "--help" in argv or "-h" in argv:
        print(USAGE)
        return 0
    unknown = [a for a in argv if a.startswith("-") and a != "--report"]
    if unknown:
        raise ConfigError(f"option '{unknown[0]}' is not known; allowed: --help, --report, key=value")
    cfg = resolve_recipe([a for a in argv if a != "--report"])
    summary = report_only(cfg) if "--report" in argv else run_worker(cfg)
    best = [r for r in summary["trials"] if r["trial"] in summary["best"]]
    print(markdown(best, list(summary["space"]), summary["meta"], "Best trial" if len(best) == 1 else "Pareto front"))
    print(f"{summary['finished']} finished trials; written to {summary['output_dir']}")
    return 0
