"""``subfit-sweep``: an Optuna study over a recipe's knobs, on one machine or many.

The search space is the recipe's ``sweep.space``: dotted recipe keys mapped to distributions. A
worker opens one Session (model, windows, dense reference, dense statistics: computed once, or
read from the statistics cache another worker wrote) and runs trials on it; each trial is the
recipe with the sampled values applied, compressed with ``pipeline.compress``. The objective is
perplexity on a *validation* split cut from the calibration text (disjoint from calibration,
scoring and the held-out text); the held-out perplexity each trial also reports is the test
number and is never optimised. Several workers join one study by running the same command against
the same storage (an SQLite or journal file on one machine, a database server such as PostgreSQL
for many); each stops once the study holds ``sweep.trials`` finished trials.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import random
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import optuna
import sqlalchemy.exc
import yaml
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from subfit_core.apps.cli import command, resolve_recipe
from subfit_core.apps.plotting import pyplot, save_ratio_plot
from subfit_core.artifact.outputs import atomic_dir
from subfit_core.config import ConfigError, apply_overrides, flatten, validate
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
    if cfg["runner"]["name"] != "none":
        raise ConfigError(f"runner.name: {cfg['runner']['name']} delivers its own kind of model; a sweep compresses one "
                          "model per trial (set runner.name=none)")
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


def storage_spec(sweep: dict) -> str:
    """``sweep.storage`` as given, or the default SQLite file ``<output_dir>.db``."""
    return sweep["storage"] or f"{sweep['output_dir'].rstrip('/')}.db"


def storage_for(sweep: dict) -> optuna.storages.BaseStorage:
    """An Optuna storage: a URL as given, a ``.log``/``.jsonl``/``.journal`` path as a journal file,
    any other path as an SQLite file (default ``<output_dir>.db``)."""
    spec = storage_spec(sweep)
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


def passwords(url: str) -> list[str]:
    """The secrets a storage URL carries (``user:PASSWORD@``, ``?password=``), as written and decoded."""
    found = []
    userinfo = re.match(r"[^:/?#]+://([^/?#]*)@", url)
    if userinfo and ":" in userinfo.group(1):
        found.append(userinfo.group(1).split(":", 1)[1])
    found += re.findall(r"[?&]password=([^&#]*)", url)
    return sorted({v for f in found for v in (f, unquote(f)) if v}, key=len, reverse=True)


def redact(url: str) -> str:
    """A storage URL fit to print or write: its password replaced by ``***``
    (``postgresql://user:***@host/db``). Paths and URLs without a password are unchanged."""
    url = re.sub(r"^([^:/?#]+://[^/?#:@]*:)[^/?#]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def scrub(text: str, url: str) -> str:
    """``text`` (an error message) with the URL redacted and its password nowhere in it."""
    text = text.replace(url, redact(url))
    for secret in passwords(url):
        if len(secret) >= 4:  # a shorter one would blot out ordinary words; drivers do not echo it anyway
            text = text.replace(secret, "***")
    return text


def database_url(url: str) -> str:
    """The URL SQLAlchemy opens: a driverless ``postgresql://`` (or ``postgres://``) uses psycopg 3,
    the driver the ``postgres`` extra installs, whatever SQLAlchemy's own default driver is."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return f"postgresql://{rest}"
        return f"postgresql+psycopg://{rest}"
    return url


def engine_options(url: str) -> dict:
    """PostgreSQL: give up on an unreachable server after 10 s (not the system's minutes), and check a
    pooled connection before use (a trial can leave it idle for long, and firewalls drop those)."""
    if not url.startswith("postgres"):
        return {}
    return {"pool_pre_ping": True, **({} if "connect_timeout" in url else {"connect_args": {"connect_timeout": 10}})}


def sql_storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """A database storage with a heartbeat: the running trial of a worker silent for two heartbeats
    is failed, and its parameters are queued once more for the next worker. Connection errors are
    one line without the password."""
    shown = redact(url)
    for attempt in range(8):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental; they are what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(database_url(url), engine_kwargs=engine_options(url),
                                                  heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                                                  **retry_stale_trial_once())
        except ImportError as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            raise SubFitError(f"sweep.storage: no database driver for {shown} ({scrub(reason(cause), url)}); "
                              "for PostgreSQL install the postgres extra: pip install -e '.[postgres]'") from None
        except sqlalchemy.exc.DBAPIError as exc:
            if creating_tables_at_once(exc) and attempt < 7:
                time.sleep(random.uniform(0.1, 0.3) * 2 ** min(attempt, 3))
                continue
            raise SubFitError(f"sweep.storage: cannot connect to {shown}: {scrub(db_reason(exc), url)}") from None
        except Exception as exc:  # noqa: BLE001 - a wrong URL is the user's to fix
            raise SubFitError(f"sweep.storage: cannot open {shown}: {scrub(reason(exc), url)}") from None
    raise AssertionError("unreachable")


def creating_tables_at_once(exc: sqlalchemy.exc.DBAPIError) -> bool:
    """Whether opening failed because another worker was creating Optuna's tables in the same new
    database at that moment (workers started together): opening again finds them made."""
    text = str(exc.orig)
    return isinstance(exc, sqlalchemy.exc.IntegrityError) or "already exists" in text or "database is locked" in text


def db_reason(exc: sqlalchemy.exc.DBAPIError) -> str:
    """The driver's own message in one line, with a hint for the usual mistakes."""
    text = " ".join(str(exc.orig).split()).removeprefix("connection failed: ")
    text = text.split(" Is the server running")[0].replace("FATAL: ", "")
    if "database" in text and "does not exist" in text:
        text += " (create it first: createdb -O USER NAME, or CREATE DATABASE NAME OWNER USER)"
    elif "password authentication failed" in text:
        text += " (check the user and password, or ~/.pgpass / PGPASSWORD)"
    return text[:300]


def retry_stale_trial_once() -> dict:
    """RDBStorage's keyword for the callback that re-queues a stale trial (renamed in Optuna 4.9)."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": retry_once()}
    return {"failed_trial_callback": retry_once()}


def retry_once() -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """Optuna's callback that queues a failed trial's parameters once more (as a new trial whose
    system attribute ``failed_trial`` names the failed one), unless that trial was itself a retry."""
    with warnings.catch_warnings():  # marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
            return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        return optuna.storages.RetryFailedTrialCallback(max_retry=1)


def reason(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def make_sampler(sweep: dict) -> optuna.samplers.BaseSampler:
    """The study's sampler; with ``sweep.seed``, trial n is sampled with seed + n (``SeedPerTrial``)."""
    if sweep["seed"] is None:  # each worker draws from its own random state
        return sampler_of(sweep, None)
    return SeedPerTrial(lambda seed: sampler_of(sweep, seed), sweep["seed"])


def sampler_of(sweep: dict, seed: int | None) -> optuna.samplers.BaseSampler:
    name = sweep["sampler"]
    if name == "auto":
        name = "tpe" if len(sweep["objectives"]) == 1 else "nsga2"
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, sweep["trials"] // 3)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, sweep["trials"] // 4)))
    return optuna.samplers.RandomSampler(seed=seed)


class SeedPerTrial(optuna.samplers.BaseSampler):
    """A seeded sampler that samples trial n with a fresh sampler seeded ``seed + n``. Workers started
    together would otherwise hold identically seeded samplers and propose the same values, trial
    for trial; trial numbers are handed out by the storage, a different one to every trial."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self.make, self.seed = make, seed
        self.inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.inner = self.make(self.seed + trial.number)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


# Keys that say where and how a worker runs, not what a trial measures: workers of one study may differ in them.
# Of the sweep section, what a trial measures depends on the space, the objectives, the validation split and the
# pruning steps.
WORKER_KEYS = {"name", "description", "output_dir", "overwrite", "save", "device", "fit_device", "offload",
               "eval.batch_size"}
MEASURED_SWEEP_KEYS = ("sweep.space.", "sweep.objectives", "sweep.validation_windows", "sweep.prune_steps")


def study_recipe(cfg: dict) -> dict[str, str]:
    """What a study's trials measure, key by key (JSON values), stored with the study when it is created."""
    return {key: json.dumps(value, sort_keys=True, default=str) for key, value in flatten(cfg)
            if key not in WORKER_KEYS and (not key.startswith("sweep.") or key.startswith(MEASURED_SWEEP_KEYS))}


def check_recipe(study: optuna.Study, cfg: dict) -> None:
    """A study joined (or reported) under another recipe would mix or mislabel its trials: refused,
    naming the first key that differs. Studies made before recipes were stored are not checked."""
    stored = study.user_attrs.get("recipe")
    if not isinstance(stored, dict):
        return
    current = study_recipe(cfg)
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) != current.get(key):
            raise SubFitError(f"sweep.study_name: study '{cfg['sweep']['study_name']}' in "
                              f"{redact(storage_spec(cfg['sweep']))} measured {key}={stored.get(key, '(unset)')}, "
                              f"this command has {key}={current.get(key, '(unset)')}; use another sweep.study_name "
                              "or sweep.output_dir for another recipe")


def open_study(cfg: dict, create: bool = True) -> tuple[optuna.Study, bool]:
    """The study ``sweep.study_name`` in the storage, and whether this call created it (of workers
    started together exactly one does: the storage refuses a second study of one name)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = cfg["sweep"]
    directions = [OBJECTIVES[o][0] for o in sweep["objectives"]]
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
              if sweep["pruner"] == "median" and len(directions) == 1 else optuna.pruners.NopPruner())
    storage, name, sampler = storage_for(sweep), sweep["study_name"], make_sampler(sweep)
    if create:
        try:
            study = optuna.create_study(storage=storage, study_name=name, directions=directions, pruner=pruner,
                                        sampler=sampler)
            study.set_user_attr("recipe", study_recipe(cfg))
            return study, True  # a new study has the directions asked for
        except optuna.exceptions.DuplicatedStudyError:
            pass
    try:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner, sampler=sampler)
    except KeyError:
        raise SubFitError(f"sweep.study_name: no study '{name}' in {redact(storage_spec(sweep))}") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise SubFitError(f"sweep.objectives: study '{sweep['study_name']}' in this storage was created for "
                          f"{len(study.directions)} objective(s); use another sweep.study_name")
    check_recipe(study, cfg)
    return study, False


def join_study(cfg: dict, space: dict[str, dict]) -> optuna.Study:
    """Open (or create) the study; the worker that creates it queues the recipe as written as its
    first trial, so the baseline runs once per study however many workers start together."""
    study, created = open_study(cfg)
    if created and cfg["sweep"]["enqueue_base"]:
        study.enqueue_trial(base_values(cfg, space))
    return study


def count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    """Trials of the study in these states, over all workers."""
    return len(study.get_trials(deepcopy=False, states=states))


# ----------------------------------------------------------------------------- one trial


WORKER = f"{socket.gethostname()}:{os.getpid()}"


class Surplus(Exception):
    """Two workers asked for the last trial at once; the later one is dropped (marked failed)."""


@dataclass
class Worker:
    cfg: dict  # the base recipe, validated, with its sweep section
    session: Session
    dense_val_ppl: float
    space: dict

    current: int | None = None  # the number of the trial this worker runs
    measured: bool = False  # whether that trial's objective ran to its end (or found the trial failed meanwhile)

    def objective(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        self.current, self.measured = trial.number, False
        try:
            values = self.measure(trial)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed this trial while it ran
            self.measured = True
            raise
        self.measured = True
        return values

    def measure(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        sweep = self.cfg["sweep"]
        if is_surplus(trial, sweep["trials"]):
            raise Surplus()
        cfg = trial_config(self.cfg, suggest(trial, self.space))
        trial.set_user_attr("worker", WORKER)  # who runs it (optuna-dashboard shows it), its values drawn
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
        model, batch, device = self.session.model, self.session.batch_sizes["eval"], self.session.device
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
    """Whether ``total`` trials numbered before this one are finished, running or queued: two
    workers asked for the last trial at once, and this is the later one (a queued trial, the re-run
    of a failed one, is taken before any new one)."""
    ahead = (*TAKEN, TrialState.WAITING)
    return sum(t.number < trial.number for t in trial.study.get_trials(deepcopy=False, states=ahead)) >= total


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
    study = join_study(cfg, space)  # a wrong storage fails before the model loads
    if count(study, FINISHED) < sweep["trials"]:  # a study already complete: only the outputs, no model
        run_trials(study, start_worker(cfg, space, study), on_trial)
    return write_outputs(cfg, study)


def start_worker(cfg: dict, space: dict, study: optuna.Study) -> Worker:
    """Open the Session every trial of this worker reuses; the dense perplexities go into the study."""
    session = open_session(trial_config(cfg, []), validation_windows=cfg["sweep"]["validation_windows"])
    assert session.windows.validation is not None  # sweep.validation_windows is at least 1
    dense_val = perplexity(session.model, session.windows.validation, session.batch_sizes["eval"], session.device,
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
    seen: dict[int, float] = {}
    while count(study, FINISHED) < total:
        if count(study, TAKEN) < total:
            try:
                study.optimize(worker.objective, catch=(Surplus,), callbacks=callbacks)
            except (ValueError, AssertionError):  # Optuna's "Cannot tell a FAIL trial" (or its assert, when the
                # objective itself had returned): see failed_elsewhere
                if not (worker.measured and failed_elsewhere(study, worker.current)):
                    raise
        else:
            wait_for_other_workers(study, sweep["heartbeat_s"], seen, has_heartbeat(sweep))
    drop_waiting(study, total)


def drop_waiting(study: optuna.Study, total: int) -> None:
    """Fail the trials still queued once the study holds ``total`` finished ones. Such a trial is
    the re-run of a failed trial, queued after a new trial had already taken the last place (two
    workers at once): the study ends with the trials asked for, and none is left queued in it."""
    storage = study._storage  # a queued trial is claimed as Optuna's ask() claims it, atomically
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
            continue  # another worker claimed it first
        why = f"the study already has its sweep.trials={total} finished"
        storage.set_trial_system_attr(t._trial_id, "dropped", why)
        study.tell(t.number, state=TrialState.FAIL)
        rerun = t.system_attrs.get("failed_trial")
        what = f"a re-run of trial {rerun}" if rerun is not None else "queued"
        print(f"trial {t.number} ({what}) dropped: {why}", file=sys.stderr, flush=True)


def failed_elsewhere(study: optuna.Study, number: int | None) -> bool:
    """Whether this worker's trial was failed by another worker, so that its result could not be
    stored: its heartbeat was late (the database out of reach, the machine stalled). Its parameters
    are queued again and run by some worker; this one goes on with the next trial."""
    if number is None:
        return False
    trial = study.get_trials(deepcopy=False)[number]
    if trial.state != TrialState.FAIL:
        return False
    print(f"trial {number}: failed by another worker (this worker's heartbeat was late); its result is dropped "
          "and its parameters run again", file=sys.stderr, flush=True)
    return True


def has_heartbeat(sweep: dict) -> bool:
    """Whether the storage is a database (workers' heartbeats recorded), not a journal file."""
    spec = storage_spec(sweep)
    return "://" in spec or Path(spec).suffix not in JOURNAL_SUFFIXES


def wait_for_other_workers(study: optuna.Study, heartbeat_s: int, seen: dict[int, float], heartbeat: bool) -> None:
    """The trials the study still needs are running in other workers: give them time, and fail
    those whose worker is dead, which queues their parameters again for this worker."""
    # Optuna storages cannot notify a change, so the study is read again after a short sleep. The wait
    # ends with the running trials: a live worker finishes its own, a dead worker's is failed here
    # after two heartbeats (SQL) or once it has run 3x longer than any finished trial (every storage).
    time.sleep(min(5.0, heartbeat_s / 2))
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op on storages without a heartbeat
    fail_overdue_trials(study, seen, heartbeat)


def fail_overdue_trials(study: optuna.Study, seen: dict[int, float], heartbeat: bool = False) -> None:
    """A trial this worker has seen running for more than 3x the longest finished trial belongs to a
    dead worker; mark it failed and queue its parameters again. This is the only guard on storages
    without a heartbeat (journal files). On databases (``heartbeat``) it covers only trials
    without the ``worker`` attribute, which the objective records once the trial's values are
    drawn: a worker killed before then may have left no heartbeat. The others are left to the
    heartbeat check: a trial on a slower machine may well take 3x longer than the longest yet.
    ``seen``: trial number -> when this worker first saw it running, on its own monotonic clock
    (a trial's stored start time is another machine's local clock: off by its time zone or drift)."""
    took = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.duration is not None]
    now = time.monotonic()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if heartbeat and "worker" in t.user_attrs:
            continue
        if now - seen.setdefault(t.number, now) > 3 * max(took, default=math.inf):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # it finished, or another worker failed it, since it was read
            retry_once()(study, t)


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
               "storage": redact(storage_spec(sweep)),
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
    study, _ = open_study(cfg, create=False)
    if not study.get_trials(deepcopy=False):
        raise SubFitError(f"sweep.study_name: study '{cfg['sweep']['study_name']}' has no trials in this storage yet")
    return write_outputs(cfg, study)


def database_failure(exc: BaseException) -> BaseException | None:
    """The database error behind ``exc`` (the server restarted, the network down, an SQLite file
    locked), if any: Optuna wraps it, and can raise another error while handling it."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain and not isinstance(exc, SubFitError):  # ours: already one line
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)  # type: ignore[assignment]
    for kind in (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError):
        found = [e for e in chain if isinstance(e, kind)]
        if found:
            return found[0]
    return None


# ----------------------------------------------------------------------------- command line

USAGE = """usage: subfit-sweep strategy=NAME|PATH.yaml [sweep.trials=N] [sweep.storage=URL|FILE] [key=value ...]

Tune a recipe with Optuna over its sweep.space (see strategies/subfit-sweep.yaml). Several workers,
on one machine or many, join one study by running the same command against the same storage
(an SQLite file by default; a .log path is a journal file; a database URL such as
postgresql://user@host/db for workers on several machines: pip install -e '.[postgres]');
a killed sweep resumes when run again. Writes trials.md/.csv, history.png, best.yaml (a plain
recipe for subfit-run) and, with two objectives, pareto.md/.csv/.png under sweep.output_dir.
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
    spec = storage_spec(cfg["sweep"])
    thread_hook = threading.excepthook

    def quiet_database_failures(args) -> None:  # a heartbeat thread's: the main thread reports it, in one line
        if args.exc_value is None or database_failure(args.exc_value) is None:
            thread_hook(args)

    threading.excepthook = quiet_database_failures
    try:
        summary = report_only(cfg) if "--report" in argv else run_worker(cfg)
    except Exception as exc:
        failure = database_failure(exc)
        if failure is None:
            raise
        why = db_reason(failure) if isinstance(failure, sqlalchemy.exc.DBAPIError) else reason(failure)
        raise SubFitError(f"sweep.storage: {redact(spec)} failed during the sweep ({scrub(why, spec)}); "
                          "finished trials are kept there: run the same command again to resume") from None
    finally:
        threading.excepthook = thread_hook
    best = [r for r in summary["trials"] if r["trial"] in summary["best"]]
    print(markdown(best, list(summary["space"]), summary["meta"], "Best trial" if len(best) == 1 else "Pareto front"))
    print(f"{summary['finished']} finished trials in {summary['storage']}; written to {summary['output_dir']}")
    return 0
