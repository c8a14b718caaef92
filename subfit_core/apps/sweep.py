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
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from subfit_core.apps.cli import command, resolve_recipe
from subfit_core.apps.plotting import pyplot, save_ratio_plot
from subfit_core.artifact.outputs import atomic_dir
from subfit_core.config import ConfigError, apply_overrides, validate
from subfit_core.engine.pipeline import SESSION_KEYS, Session, build_components, compress, open_session
from subfit_core.errors import SubFitError
from subfit_core.evaluation.perplexity import forward_seconds, perplexity
from subfit_core.plugins import get_plugins

# objective -> (direction, what it measures)
OBJECTIVES: dict[str, tuple[Literal["minimize", "maximize"], str]] = {
    "ppl": ("minimize", "validation perplexity ratio (compressed / dense)"),
    "sparsity": ("maximize", "achieved sparsity in the recipe's unit"),
    "latency": ("minimize", "forward seconds on the validation windows, this process (noisy)"),
}
ALLOWED_OBJECTIVES = (["ppl"], ["ppl", "sparsity"], ["ppl", "latency"])
DISTRIBUTIONS = ("int", "float", "categorical")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards sweep.trials
TAKEN = (*FINISHED, TrialState.RUNNING)  # trials no worker needs to start again
JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")


# ----------------------------------------------------------------------------- the recipe's sweep section


def check_space(cfg: dict) -> dict[str, dict]:
    """Every ``sweep.space`` entry well formed, and both ends of its range a valid recipe, before any work."""
    space = cfg["sweep"]["space"]
    if not space:
        raise ConfigError("sweep.space: empty; map recipe keys to distributions, e.g. "
                          "{fitter.attn.rank: {int: [16, 128], log: true}}")
    for key, spec in space.items():
        for value in distribution_ends(key, spec):
            try:
                build_components(get_plugins(), validate(apply_overrides(copy.deepcopy(cfg), [(key, value)])))
            except ConfigError as exc:
                raise ConfigError(f"sweep.space: {exc}") from None
    objectives = cfg["sweep"]["objectives"]
    if objectives not in ALLOWED_OBJECTIVES:
        raise ConfigError(f"sweep.objectives: {objectives!r}; allowed: [ppl], [ppl, sparsity], [ppl, latency]")
    return space


def distribution_ends(key: str, spec) -> list:
    """The values to try a space entry at (a range's two ends, every choice), once it is well formed."""
    where = f"sweep.space.{key}"
    top = str(key).split(".")[0]
    if top in SESSION_KEYS or top == "sweep":
        raise ConfigError(f"{where}: '{top}' is shared by every trial (model, data, evaluation) and cannot be swept")
    kinds = [k for k in spec if k in DISTRIBUTIONS] if isinstance(spec, dict) else []
    if len(kinds) != 1:
        raise ConfigError(f"{where}: {spec!r}; expected one of {{int: [lo, hi]}}, {{float: [lo, hi]}}, "
                          "{categorical: [a, b, ...]} (with log: true or step: s for numbers)")
    kind = kinds[0]
    options = set(spec) - {kind}
    unknown = options - {"log", "step"} if kind != "categorical" else options
    if unknown:
        raise ConfigError(f"{where}: unknown option {sorted(unknown)[0]!r}; allowed: log, step (int and float only)")
    if kind == "categorical":
        if not isinstance(spec[kind], list) or not spec[kind]:
            raise ConfigError(f"{where}.categorical: {spec[kind]!r}; give a non-empty list")
        return spec[kind]
    return range_ends(where, kind, spec)


def range_ends(where: str, kind: str, spec: dict) -> list:
    """``[low, high]`` of an int or float entry, checked with its ``step`` and ``log``."""
    types = int if kind == "int" else (int, float)

    def finite(v) -> bool:
        return isinstance(v, types) and not isinstance(v, bool) and math.isfinite(v)

    values, step = spec[kind], spec.get("step")
    if not (isinstance(values, list) and len(values) == 2 and all(map(finite, values)) and values[0] <= values[1]):
        raise ConfigError(f"{where}.{kind}: {values!r}; give [low, high] finite {kind}s with low <= high")
    if step is not None and not (finite(step) and step > 0):
        raise ConfigError(f"{where}.step: {step!r}; give a positive finite {kind}")
    if spec.get("log") and values[0] <= 0:
        raise ConfigError(f"{where}.{kind}: {values!r}; log: true needs low > 0")
    return values


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> list[tuple[str, object]]:
    """The trial's value of every swept key, drawn from the space (or fixed, for a queued trial)."""
    out = []
    for key, spec in space.items():
        log = bool(spec.get("log"))
        if "categorical" in spec:
            out.append((key, trial.suggest_categorical(key, spec["categorical"])))
        elif "int" in spec:
            out.append((key, trial.suggest_int(key, *spec["int"], log=log, step=spec.get("step", 1))))
        else:
            out.append((key, trial.suggest_float(key, *spec["float"], log=log, step=spec.get("step"))))
    return out


def trial_config(base: dict, values: list[tuple[str, object]]) -> dict:
    """The plain recipe a trial runs: the base recipe with the sampled values, without ``sweep``."""
    data = apply_overrides(copy.deepcopy(base), values)
    data.pop("sweep", None)
    data["save"] = False
    return validate(data)


def base_values(cfg: dict, space: dict[str, dict]) -> dict:
    """The recipe's own value of each swept key, where the recipe sets one inside the space."""
    out = {}
    for key, spec in space.items():
        node: Any = cfg  # a section (dict), then the value, or None for a key the recipe lacks
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        kind = next(k for k in spec if k in DISTRIBUTIONS)
        inside = node in spec[kind] if kind == "categorical" else (
            isinstance(node, (int, float)) and not isinstance(node, bool) and spec[kind][0] <= node <= spec[kind][1])
        if node is not None and inside:
            out[key] = node
    return out


# ----------------------------------------------------------------------------- storage and study


def storage_for(sweep: dict) -> optuna.storages.BaseStorage:
    """An Optuna storage: a URL as given, a ``.log``/``.jsonl``/``.journal`` path as a journal file,
    any other path as an SQLite file (default ``<output_dir>.db``)."""
    spec = sweep["storage"] or f"{sweep['output_dir'].rstrip('/')}.db"
    if "://" in spec:
        return sql_storage(spec, sweep["heartbeat_s"])
    path = Path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in JOURNAL_SUFFIXES:
        return journal_storage(path)
    return sql_storage(f"sqlite:///{path}", sweep["heartbeat_s"])


def journal_storage(path: Path) -> optuna.storages.JournalStorage:
    try:  # replaying the log reads every line: a file that is not a journal fails here
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except Exception as exc:  # noqa: BLE001
        raise SubFitError(f"sweep.storage: '{path}' is not an Optuna journal file ({reason(exc)})") from None


def sql_storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """A database storage with a heartbeat: the running trial of a worker silent for two heartbeats
    is failed, and its parameters are queued once more for the next worker."""
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental; they are what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                                              **retry_stale_trial_once())
    except Exception as exc:  # noqa: BLE001 - a wrong URL or a missing driver is the user's to fix
        raise SubFitError(f"sweep.storage: cannot open {url!r}: {reason(exc)}") from None


def retry_stale_trial_once() -> dict:
    """RDBStorage's keyword for the callback that re-queues a stale trial (renamed in Optuna 4.9)."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}


def reason(exc: Exception) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def make_sampler(sweep: dict, offset: int) -> optuna.samplers.BaseSampler:
    seed = None if sweep["seed"] is None else sweep["seed"] + offset
    name = sweep["sampler"]
    if name == "auto":
        name = "tpe" if len(sweep["objectives"]) == 1 else "nsga2"
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, sweep["trials"] // 3)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, sweep["trials"] // 4)))
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(cfg: dict) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = cfg["sweep"]
    directions = [OBJECTIVES[o][0] for o in sweep["objectives"]]
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
              if sweep["pruner"] == "median" and len(directions) == 1 else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage_for(sweep), study_name=sweep["study_name"], directions=directions,
                                pruner=pruner, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise SubFitError(f"sweep.objectives: study '{sweep['study_name']}' in this storage was created for "
                          f"{len(study.directions)} objective(s); use another sweep.study_name")
    study.sampler = make_sampler(sweep, len(study.get_trials(deepcopy=False)))  # a later worker: another seed
    return study


def count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    """Trials of the study in these states, over all workers."""
    return len(study.get_trials(deepcopy=False, states=states))


# ----------------------------------------------------------------------------- one trial


class Surplus(Exception):
    """Two workers asked for the last trial at once; the later one is dropped (marked failed)."""


@dataclass
class Worker:
    cfg: dict  # the base recipe, validated, with its sweep section
    session: Session
    dense_val_ppl: float
    space: dict

    def objective(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        sweep = self.cfg["sweep"]
        if is_surplus(trial, sweep["trials"]):
            raise Surplus()
        cfg = trial_config(self.cfg, suggest(trial, self.space))
        measured: dict[str, float] = {}

        def measure_validation() -> None:  # on the compressed model, before its held-out evaluation
            measured.update(self.validation(trial, cfg))

        try:
            results = compress(self.session, cfg, before_eval=measure_validation).results
        finally:
            self.session.bench.restore()
        measured["sparsity"] = results["sparsity"][f"achieved_{cfg['sparsity_unit']}"]
        record(trial, results, measured)
        values = tuple(measured[o] for o in sweep["objectives"])
        return values if len(values) > 1 else values[0]

    def validation(self, trial: optuna.Trial, cfg: dict) -> dict[str, float]:
        """Validation perplexity ratio of the compressed model (and its forward seconds for the latency
        objective). It is measured over growing chunks of the validation windows, each running value
        reported, so that the pruner stops a clearly worse trial before its held-out evaluation."""
        sweep, windows = self.cfg["sweep"], self.session.windows.validation
        assert windows is not None  # start_worker opens the session with sweep.validation_windows (at least 1)
        model, batch, device = self.session.model, cfg["eval"]["batch_size"], self.session.device
        prunable = len(sweep["objectives"]) == 1  # Optuna reports and prunes single-objective trials only
        nll, tokens = 0.0, 0
        chunks = [c for c in windows.tensor_split(min(sweep["prune_steps"], windows.shape[0])) if c.numel()]
        for step, chunk in enumerate(chunks):
            n = chunk[:, 1:].numel()
            nll += math.log(perplexity(model, chunk, batch, device, "validation perplexity")) * n
            tokens += n
            if prunable:
                trial.report(math.exp(nll / tokens) / self.dense_val_ppl, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        measured = {"ppl": math.exp(nll / tokens) / self.dense_val_ppl}
        if "latency" in sweep["objectives"]:
            measured["latency"] = forward_seconds(model, windows, batch, device)
        return measured


def is_surplus(trial: optuna.Trial, total: int) -> bool:
    """Whether ``total`` trials numbered before this one are finished or running: two workers asked
    for the last trial at once, and this is the later one."""
    return sum(t.number < trial.number for t in trial.study.get_trials(deepcopy=False, states=TAKEN)) >= total


def record(trial: optuna.Trial, results: dict, measured: dict[str, float]) -> None:
    """What the outputs show of a trial, kept with it in the storage."""
    attrs = {"test_ppl": results["perplexity"]["compressed"], "test_ratio": results["perplexity"]["ratio"],
             "val_ratio": measured["ppl"], "achieved_sparsity": measured["sparsity"],
             "replaced": [f"L{r['layer']}.{r['type']}" for r in results["replaced"]]}
    if "latency" in measured:
        attrs["latency_s"] = measured["latency"]
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


# ----------------------------------------------------------------------------- workers


def run_worker(cfg: dict, on_trial=None) -> dict:
    """Join (or create) the study and run trials until it holds ``sweep.trials`` finished ones;
    then write the study's tables and best recipe. ``on_trial(study, trial)`` after each trial."""
    sweep = cfg["sweep"]
    space = check_space(cfg)
    study = open_study(cfg)  # a wrong storage fails before the model loads
    if count(study, FINISHED) < sweep["trials"]:  # a study already complete: only the outputs, no model
        if sweep["enqueue_base"] and not study.get_trials(deepcopy=False):
            study.enqueue_trial(base_values(cfg, space))  # trial 0: the recipe as written, for comparison
        run_trials(study, start_worker(cfg, space, study), on_trial)
    return write_outputs(cfg, study)


def start_worker(cfg: dict, space: dict, study: optuna.Study) -> Worker:
    """Open the Session every trial of this worker reuses; the dense perplexities go into the study."""
    session = open_session(trial_config(cfg, []), validation_windows=cfg["sweep"]["validation_windows"])
    assert session.windows.validation is not None  # sweep.validation_windows is at least 1
    dense_val = perplexity(session.model, session.windows.validation, cfg["eval"]["batch_size"], session.device,
                           "dense validation perplexity")
    study.set_user_attr("dense_val_ppl", dense_val)
    study.set_user_attr("dense_test_ppl", session.dense_ppl)
    return Worker(cfg, session, dense_val, space)


def run_trials(study: optuna.Study, worker: Worker, on_trial=None) -> None:
    """Run trials while the study needs more than are running, then wait for the last ones that run
    elsewhere (and take over those of a dead worker) until the study holds ``sweep.trials`` finished."""
    sweep = worker.cfg["sweep"]
    total = sweep["trials"]
    callbacks = [lambda s, trial: note(s, trial, total), *([on_trial] if on_trial else []),
                 optuna.study.MaxTrialsCallback(total, states=TAKEN)]  # stop once no trial is left to start
    while count(study, FINISHED) < total:
        if count(study, TAKEN) < total:
            study.optimize(worker.objective, catch=(Surplus,), callbacks=callbacks)
        else:
            wait_for_other_workers(study, sweep["heartbeat_s"])


def wait_for_other_workers(study: optuna.Study, heartbeat_s: int) -> None:
    """The trials the study still needs are running in other workers: give them time, and fail
    those whose worker is dead, which queues their parameters again for this worker."""
    # Optuna storages cannot notify a change, so the study is read again after a short sleep. The wait
    # ends with the running trials: a live worker finishes its own, a dead worker's is failed here
    # after two heartbeats (SQL) or once it has run 3x longer than any finished trial (every storage).
    time.sleep(min(5.0, heartbeat_s / 2))
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op on storages without a heartbeat
    fail_overdue_trials(study)


def fail_overdue_trials(study: optuna.Study) -> None:
    """A trial running for more than 3x the longest finished trial belongs to a dead worker; mark it
    failed and queue its parameters again. This is the only guard on storages without a heartbeat
    (journal files), and the fallback on SQL ones: a worker killed before its trial's first
    heartbeat leaves a RUNNING trial that Optuna's heartbeat check never fails."""
    took = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.duration is not None]
    if not took:
        return
    now = datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.datetime_start and (now - t.datetime_start).total_seconds() > 3 * max(took):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # it finished, or another worker failed it, since it was read
            study.enqueue_trial(t.params, skip_if_exists=False)


def note(study: optuna.Study, trial: optuna.trial.FrozenTrial, total: int) -> None:
    """One progress line per trial of this worker, on stderr."""
    if trial.state == TrialState.COMPLETE:
        what = f"val {trial.user_attrs['val_ratio']:.3f}x, test {trial.user_attrs['test_ratio']:.3f}x"
    else:
        what = trial.state.name.lower()
    print(f"[{count(study, FINISHED)}/{total}] trial {trial.number}: {what}  {trial.params}", file=sys.stderr,
          flush=True)


# ----------------------------------------------------------------------------- outputs


def rows_of(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        a = t.user_attrs
        rows.append({"trial": t.number, "state": t.state.name.lower(), "val_ratio": a.get("val_ratio"),
                     "test_ratio": a.get("test_ratio"), "test_ppl": a.get("test_ppl"),
                     "achieved_sparsity": a.get("achieved_sparsity"), "latency_s": a.get("latency_s"),
                     "seconds": t.duration.total_seconds() if t.duration is not None else None,
                     "params": dict(t.params), "replaced": a.get("replaced", [])})
    return rows


def best_trials(study: optuna.Study, objectives: list[str]) -> list[optuna.trial.FrozenTrial]:
    """Single objective: the best trial. Several: the Pareto front, by validation perplexity."""
    if not count(study, (TrialState.COMPLETE,)):
        return []
    if len(objectives) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.values[0])


def fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


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


def best_recipe(cfg: dict, trial: optuna.trial.FrozenTrial) -> dict:
    """The plain recipe of a trial: ``subfit-run strategy=<this file>`` reproduces its test numbers."""
    recipe = trial_config(cfg, list(trial.params.items()))
    recipe.update({"name": f"{cfg['sweep']['study_name']}-trial{trial.number}", "save": True,
                   "description": f"best trial {trial.number} of sweep '{cfg['sweep']['study_name']}' over "
                                  f"{cfg['name']}: validation ppl ratio {trial.user_attrs['val_ratio']:.4f}, "
                                  f"held-out {trial.user_attrs['test_ratio']:.4f}"})
    recipe.pop("sweep", None)  # validate() filled in the default section
    return recipe


def describe(cfg: dict, study: optuna.Study, finished: int) -> str:
    """The paragraph under every table: what was swept, and on which splits the ratios are measured."""
    sweep, dense = cfg["sweep"], study.user_attrs
    return (f"Study '{sweep['study_name']}' of recipe {cfg['name']} on {cfg['model']} at sparsity {cfg['sparsity']} "
            f"({cfg['sparsity_unit']}); objective(s): {', '.join(sweep['objectives'])}; {finished} finished trials. "
            f"Validation: {sweep['validation_windows']} x {cfg['calib']['seq_len']} tokens of the calibration text, "
            f"disjoint from calibration and scoring (dense perplexity {dense.get('dense_val_ppl', float('nan')):.2f}); "
            f"test: {cfg['eval']['windows']} x {cfg['eval']['seq_len']} held-out tokens (dense "
            f"{dense.get('dense_test_ppl', float('nan')):.2f}), never optimised. Ratios are compressed / dense on the "
            "same split.")


def write_outputs(cfg: dict, study: optuna.Study) -> dict:
    """Tables, plots and the best recipe of the study as it stands (from the storage alone)."""
    sweep = cfg["sweep"]
    rows = rows_of(study)
    best = best_trials(study, sweep["objectives"])
    front = [r for r in rows if r["trial"] in {t.number for t in best}]
    summary = {"meta": describe(cfg, study, len(rows)), "study_name": sweep["study_name"],
               "objectives": sweep["objectives"], "space": sweep["space"],
               "dense_val_ppl": study.user_attrs.get("dense_val_ppl"),
               "dense_test_ppl": study.user_attrs.get("dense_test_ppl"), "trials": rows,
               "best": [r["trial"] for r in front], "finished": len(rows),
               "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    recipe = best_recipe(cfg, best[0]) if best else None
    out = Path(sweep["output_dir"])
    # workers of one study rewrite the same summary: take turns
    atomic_dir(out, lambda tmp: write_files(tmp, summary, rows, front, recipe), wait=120)
    summary["output_dir"] = str(out)
    return summary


def write_files(folder: Path, summary: dict, rows: list[dict], front: list[dict], recipe: dict | None) -> None:
    """The files of ``write_outputs``; a plotting failure is recorded in ``summary``, not raised."""
    params, meta, objectives = list(summary["space"]), summary["meta"], summary["objectives"]
    (folder / "trials.md").write_text(markdown(rows, params, meta, "All finished trials"))
    (folder / "trials.csv").write_text(csv_text(rows, params))
    if recipe is not None:
        (folder / "best.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if len(objectives) > 1:
        (folder / "pareto.md").write_text(markdown(front, params, meta, "Pareto front"))
        (folder / "pareto.csv").write_text(csv_text(front, params))
    try:
        if rows:
            plot_history(rows, folder / "history.png")
        if len(objectives) > 1 and front:
            plot_pareto(rows, front, objectives, folder / "pareto.png")
    except Exception as exc:  # noqa: BLE001 - the tables are the result; a plotting problem must not lose them
        summary["plot_error"] = f"{type(exc).__name__}: {exc}"
    (folder / "results.json").write_text(json.dumps(summary, indent=2))


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
