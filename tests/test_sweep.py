"""subfit-sweep and the optuna selector: workers sharing one storage, a killed sweep resuming, the
best recipe reproducing its numbers, the validation split kept apart, and masks that always
respect the budget."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.usefixtures("one_thread")
EXE = Path(sys.executable).parent / "subfit-sweep"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sweep(tmp_path_factory.mktemp("sweep"))


def write_tiny_sweep(folder: Path) -> Path:
    """A tiny local model directory, a structured text, and a recipe with a sweep section."""
    from conftest import write_local_model_and_text

    folder = write_local_model_and_text(folder, seed=1, lines=1500)
    recipe = {
        "name": "tiny-sweep", "model": str(folder / "model"), "sparsity": 0.34, "cache_stats": False,
        "calib": {"dataset": str(folder / "text.txt"), "samples": 6, "seq_len": 16, "batch_size": 8},
        "scoring": {"samples": 2}, "eval": {"windows": 3, "seq_len": 16, "domains": []},  # word-level toy text only
        "scorer": {"name": "output"}, "selector": {"name": "greedy", "rescore": False},
        "fitter": {"name": "per-type", "attn": {"name": "low-rank", "rank": 8}, "ffn": {"name": "low-rank", "rank": 8}},
        "sweep": {"validation_windows": 4, "prune_steps": 2, "seed": 0, "heartbeat_s": 1,
                  "space": {"fitter.attn.rank": {"int": [2, 16], "log": True},
                            "fitter.ffn.ridge": {"float": [1e-4, 1e-1], "log": True},
                            "selector.ratio": {"categorical": [True, False]}}},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def cfg_for(folder: Path, *overrides: str) -> dict:
    from subfit_core.apps.cli import resolve_recipe

    return resolve_recipe([f"strategy={folder / 'recipe.yaml'}", *overrides])


def finished(storage: str, name: str = "subfit-sweep") -> list:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    return [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]


def test_one_worker_pays_for_dense_statistics_once_and_its_best_recipe_reproduces(tiny, tmp_path, monkeypatch):
    from subfit_core.apps.sweep import run_worker
    from subfit_core.config import validate
    from subfit_core.engine import dense_statistics
    from subfit_core.engine.pipeline import run

    passes = []
    original = dense_statistics.DenseStatistics.accumulate
    monkeypatch.setattr(dense_statistics.DenseStatistics, "accumulate", lambda self, ids: (passes.append(1), original(self, ids))[1])
    out = tmp_path / "sweep"
    summary = run_worker(cfg_for(tiny, "sweep.trials=5", f"sweep.output_dir={out}"))
    assert len(passes) == 1  # five trials, one dense calibration pass
    assert summary["finished"] == 5 and len(summary["trials"]) == 5
    assert (tmp_path / "sweep.db").exists()  # the default storage: an SQLite file next to the output
    assert {"results.json", "trials.md", "trials.csv", "best.yaml", "history.png"} <= {p.name for p in out.iterdir()}
    first = next(r for r in summary["trials"] if r["trial"] == 0)  # trial 0: the recipe as written
    assert first["params"]["fitter.attn.rank"] == 8
    best = next(r for r in summary["trials"] if r["trial"] == summary["best"][0])
    complete = [r for r in summary["trials"] if r["state"] == "complete"]
    assert best["val_ratio"] == min(r["val_ratio"] for r in complete)
    assert best["val_ratio"] != best["test_ratio"]  # two different splits

    # --report rewrites the outputs from the storage alone (no model is loaded)
    from subfit_core.apps.sweep import sweep_main

    monkeypatch.setattr("subfit_core.apps.sweep.open_session", lambda *a, **k: pytest.fail("--report loaded the model"))
    assert sweep_main([f"strategy={tiny / 'recipe.yaml'}", "--report", f"sweep.storage={tmp_path / 'sweep.db'}",
                       f"sweep.output_dir={tmp_path / 'report'}"]) == 0
    assert (tmp_path / "report" / "trials.csv").read_text() == (out / "trials.csv").read_text()
    # and a worker that finds the study complete writes the outputs and stops, without the model too
    assert run_worker(cfg_for(tiny, "sweep.trials=5", f"sweep.output_dir={out}"))["finished"] == 5

    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert "sweep" not in recipe and recipe["fitter"]["attn"]["rank"] == best["params"]["fitter.attn.rank"]
    recipe.update({"save": False})
    again = run(validate(recipe))
    assert again["perplexity"]["compressed"] == pytest.approx(best["test_ppl"], rel=1e-6)


def test_validation_windows_are_disjoint_and_leave_the_other_windows_unchanged(tiny):
    from transformers import AutoTokenizer

    from subfit_core.engine.corpus import make_windows
    from subfit_core.engine.pipeline import load_text
    from subfit_core.plugins import get_plugins

    text = load_text(get_plugins(), str(tiny / "text.txt"))
    tok = AutoTokenizer.from_pretrained(tiny / "model")
    kw = dict(calib_samples=6, scoring_samples=2, seq_len=16, heldout=text, eval_windows=3, eval_seq_len=16, seed=0)
    plain, carved = make_windows(text, tok, **kw), make_windows(text, tok, **kw, validation_samples=5)
    assert plain.validation is None and carved.validation.shape == (5, 16)
    for name in ("calib", "scoring", "heldout"):
        assert torch.equal(getattr(plain, name), getattr(carved, name))
    rows = lambda t: {tuple(r.tolist()) for r in t}  # noqa: E731
    assert not rows(carved.validation) & (rows(carved.calib) | rows(carved.scoring) | rows(carved.heldout))


@pytest.mark.parametrize("override, message", [
    ("sweep.space={fitter.attn.rnk: {int: [2, 8]}}", "sweep.space: fitter.attn.rnk: unknown key for this component; "),
    ("sweep.space={selektor.ratio: {categorical: [true]}}", "did you mean 'selector'"),
    ("sweep.space={calib.samples: {int: [4, 8]}}", "'calib' is shared by every trial"),
    ("sweep.space={fitter.attn.rank: {int: [8, 2]}}", "give [low, high] finite ints with low <= high"),
    ("sweep.space={fitter.attn.rank: {int: [0, 8]}}", "sweep.space: fitter.attn: rank: 0 must be at least 1"),
    ("sweep.space={fitter.attn.rank: {uniform: [2, 8]}}", "expected one of"),
    ("sweep.objectives=[ppl,speed]", "sweep.objectives: ['ppl', 'speed']"),
    ("sweep.sampler=cmaes", "sweep.sampler: 'cmaes' is not allowed"),
    ("sweep.storage=nosuchdb://x", "sweep.storage: cannot open nosuchdb://x: "),
    ("runner.name=dynamic", "runner.name: dynamic delivers its own kind of model; a sweep compresses one model"),
])
def test_bad_sweep_sections_fail_in_one_line_before_any_work(tiny, tmp_path, capsys, override, message):
    from subfit_core.apps.sweep import sweep_main

    assert sweep_main([f"strategy={tiny / 'recipe.yaml'}", override, f"sweep.output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("subfit-sweep: error:") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists() and not (tmp_path / "o.db").exists()


def test_the_shipped_sweep_recipe_is_valid():
    from subfit_core.apps.cli import resolve_recipe
    from subfit_core.apps.sweep import base_values, check_space

    cfg = resolve_recipe(["strategy=subfit-sweep"])
    space = check_space(cfg)
    assert base_values(cfg, space) == {"fitter.attn.rank": 64, "fitter.ffn.rank": 256, "fitter.ffn.ridge": 1e-3,
                                       "scorer.metric": "kl",
                                       "selector.ratio": True, "selector.rescore": True, "anchored": False}


def test_two_objectives_write_a_pareto_front(tiny, tmp_path):
    from subfit_core.apps.sweep import run_worker

    out = tmp_path / "pareto"
    summary = run_worker(cfg_for(tiny, "sweep.trials=4", "sweep.objectives=[ppl,sparsity]", f"sweep.output_dir={out}",
                                 "sweep.space={sparsity: {float: [0.1, 0.4]}, fitter.attn.rank: {int: [2, 8]}}"))
    rows = [r for r in summary["trials"] if r["state"] == "complete"]
    front = [r for r in rows if r["trial"] in summary["best"]]
    assert front and len(rows) == 4
    for r in front:  # nothing on the front is dominated
        assert not any(o["val_ratio"] <= r["val_ratio"] and o["achieved_sparsity"] >= r["achieved_sparsity"]
                       and (o["val_ratio"], o["achieved_sparsity"]) != (r["val_ratio"], r["achieved_sparsity"])
                       for o in rows)
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "Pareto front" in (out / "pareto.md").read_text() and (out / "pareto.csv").exists()


def worker(tiny: Path, storage: str, out: Path, trials: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUBFIT_PROGRESS": "0"}
    return subprocess.Popen([str(EXE), f"strategy={tiny / 'recipe.yaml'}", f"sweep.trials={trials}",
                             f"sweep.storage={storage}", f"sweep.output_dir={out}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_workers_on_one_journal_file_finish_n_trials_together(tiny, tmp_path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    log = tmp_path / "study.log"
    procs = [worker(tiny, str(log), tmp_path / f"out{i}", 8, "sweep.pruner=none") for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    trials = finished(JournalStorage(JournalFileBackend(str(log))))
    assert len(trials) == 8 and len({t.number for t in trials}) == 8  # none lost, none run twice
    ran = [int(line.split("trial ")[1].split(":")[0]) for o in outs for line in o[1].splitlines() if "] trial " in line]
    done_numbers = sorted(t.number for t in trials)
    assert sorted(n for n in ran if n in done_numbers) == done_numbers  # each finished trial ran in exactly one worker
    # (whether both workers got a trial depends on how fast each starts on a loaded machine, so it is not asserted)


def read_progress_until(proc: subprocess.Popen, finished_trials: int) -> None:
    """Read a worker's progress lines ("[k/N] trial ...") until k reaches ``finished_trials``; a
    worker that is not there within 600 s is killed (generous: a loaded machine, not a hang)."""
    timer = threading.Timer(600, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            progress = re.match(r"\[(\d+)/\d+\] trial ", line)
            if progress and int(progress.group(1)) >= finished_trials:
                return
    finally:
        timer.cancel()


def test_a_killed_sweep_resumes_keeps_its_finished_trials_and_reruns_the_one_it_left_running(tiny, tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = optuna.storages.RDBStorage(url)  # slow to open: done first, so the kill comes soon after trial 2
    proc = worker(tiny, url, tmp_path / "out", 10, "sweep.pruner=none")
    read_progress_until(proc, 2)
    study = optuna.load_study(study_name="subfit-sweep", storage=storage)
    running = (optuna.trial.TrialState.RUNNING,)
    deadline = time.monotonic() + 600  # the worker starts its next trial at once; kill it during that trial
    while not study.get_trials(states=running) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = {t.number: t.values for t in finished(url)}
    assert 2 <= len(before) < 10
    orphans = study.get_trials(states=running)  # almost always one (it may have finished before the kill)
    again = worker(tiny, url, tmp_path / "out", 10, "sweep.pruner=none")
    out, err = again.communicate(timeout=900)  # generous: a loaded machine, not a hang
    assert again.returncode == 0, err[-2000:]
    after = {t.number: t.values for t in finished(url)}
    assert len(after) == 10
    assert all(after[n] == v for n, v in before.items())  # the finished trials were kept as they were
    assert "10 finished trials" in out
    trials = study.get_trials()
    assert not [t for t in trials if t.state.name == "RUNNING"]  # a dead worker's trial is failed (heartbeat)
    for orphan in orphans:  # ... and its parameters are run again
        assert trials[orphan.number].state.name == "FAIL"
        assert any(t.number > orphan.number and t.number in after and
                   all(t.params.get(k) == v for k, v in orphan.params.items()) for t in trials)


def test_a_worker_waits_for_the_last_trial_and_reruns_it_when_its_worker_is_dead(tiny, tmp_path):
    """The study needs one more trial and it is running in a worker that died, on a journal file (no
    heartbeat): the worker waits, fails that trial once it has run 3x longer than any finished trial,
    and runs its parameters itself."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from subfit_core.apps.sweep import open_study, run_worker

    cfg = cfg_for(tiny, "sweep.trials=2", f"sweep.storage={tmp_path / 'study.log'}",
                  f"sweep.output_dir={tmp_path / 'o'}")
    study, _ = open_study(cfg)
    dists = {"fitter.attn.rank": IntDistribution(2, 16, log=True),
             "fitter.ffn.ridge": FloatDistribution(1e-4, 1e-1, log=True),
             "selector.ratio": CategoricalDistribution([True, False])}
    done = {"fitter.attn.rank": 8, "fitter.ffn.ridge": 1e-3, "selector.ratio": True}
    attrs = {"val_ratio": 2.0, "test_ratio": 2.0, "test_ppl": 1.0, "achieved_sparsity": 0.34, "replaced": []}
    study.add_trial(optuna.trial.create_trial(params=done, distributions=dists, value=2.0, user_attrs=attrs))  # 0 s
    left = {"fitter.attn.rank": 4, "fitter.ffn.ridge": 1e-2, "selector.ratio": False}
    study.add_trial(optuna.trial.create_trial(params=left, distributions=dists, state=optuna.trial.TrialState.RUNNING))
    summary = run_worker(cfg)
    assert summary["finished"] == 2
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == left


# ----------------------------------------------------------------------------- the optuna selector


@pytest.fixture
def bench(tiny_model, random_windows):
    from subfit_core.engine.workbench import Workbench
    from subfit_plugins.adapters.llama import LlamaFamilyAdapter

    model = tiny_model("llama", seed=3, num_hidden_layers=4)
    bench = Workbench(model, LlamaFamilyAdapter(model), random_windows(calib=6, scoring=3, seq_len=16, seed=5),
                      batch_size=8, device=torch.device("cpu"))
    bench.collect()
    return bench


def test_optuna_selector_never_proposes_a_mask_off_budget(bench, monkeypatch):
    from subfit_core.engine.budget import Budget
    from subfit_plugins.fitters.linear import LowRankFitter
    from subfit_plugins.scorers.output import OutputScorer
    from subfit_plugins.selectors import optuna_search
    from subfit_plugins.selectors.budget_fill import achieved
    from subfit_plugins.selectors.optuna_search import OptunaSearchParams, OptunaSearchSelector

    proposed = []
    original = optuna_search.fill
    monkeypatch.setattr(optuna_search, "fill", lambda *a: (proposed.append(original(*a)), proposed[-1])[1])
    fitter = LowRankFitter(LowRankFitter.Params(rank=4))
    budget = Budget(0.3, "params", bench.adapter)
    plan = OptunaSearchSelector(OptunaSearchParams(trials=30, sampler="tpe")).select(bench, OutputScorer(), fitter, budget)
    assert len(proposed) == 30
    dim = bench.adapter.hidden_size
    for mask in proposed:
        assert achieved(budget, fitter, mask, dim) >= 0.3 - 1e-9  # reaches the budget
        for s in mask:  # and removes nothing it does not need
            assert achieved(budget, fitter, [m for m in mask if m != s], dim) < 0.3 - 1e-9
    assert achieved(budget, fitter, plan.subs, dim) >= 0.3 - 1e-9


def test_optuna_selector_finds_the_brute_force_optimum_on_a_small_case(bench):
    from subfit_core.engine.budget import Budget
    from subfit_plugins.fitters.identity import IdentityFitter
    from subfit_plugins.scorers.output import OutputScorer
    from subfit_plugins.selectors.budget_fill import achieved
    from subfit_plugins.selectors.optuna_search import OptunaSearchParams, OptunaSearchSelector

    fitter, dim = IdentityFitter(), bench.adapter.hidden_size
    budget = Budget(0.25, "layers", bench.adapter)
    subs = bench.subs

    def ok(m):
        return achieved(budget, fitter, m, dim) >= 0.25 - 1e-9

    minimal = [m for k in range(1, len(subs) + 1) for m in itertools.combinations(subs, k)
               if ok(m) and not any(ok([x for x in m if x != s]) for s in m)]
    assert len(minimal) > 5  # a real search
    optimum = min(bench.metric_with_many({s: bench.fit(fitter, s) for s in m}, "kl") for m in minimal)
    plan = OptunaSearchSelector(OptunaSearchParams(trials=40, sampler="random", warm_start=False)).select(
        bench, OutputScorer(), fitter, budget)
    assert plan.notes["best_metric"] == pytest.approx(optimum)
    assert bench.metric_with_many({s: bench.fit(fitter, s) for s in plan.subs}, "kl") == pytest.approx(optimum)


def test_clearly_worse_trials_are_pruned_before_their_test_evaluation(tiny, tmp_path, monkeypatch):
    from subfit_core.apps import sweep

    # A random tiny model's perplexity hardly depends on what is removed, so the validation
    # perplexity is made 10x worse for the 60% trials; the pruning machinery is the real one.
    current = {}
    real_compress, real_ppl = sweep.compress, sweep.perplexity
    monkeypatch.setattr(sweep, "compress", lambda session, cfg, **kw: (current.update(s=cfg["sparsity"]),
                                                                     real_compress(session, cfg, **kw))[1])
    monkeypatch.setattr(sweep, "perplexity", lambda model, w, b, d, desc: real_ppl(model, w, b, d, desc) * (
        10.0 if desc == "validation perplexity" and current.get("s") == 0.6 else 1.0))
    # seed 2: trials 0-2 draw 0.1, 0.6, 0.1 (trial n is sampled with seed + n), so the median after the
    # pruner's three start-up trials is a 0.1 trial's, and the next 0.6 trial is clearly worse
    summary = sweep.run_worker(cfg_for(tiny, "sweep.trials=12", "sweep.sampler=random", "sweep.seed=2",
                                       f"sweep.output_dir={tmp_path / 'p'}",
                                       "sweep.space={sparsity: {categorical: [0.1, 0.6]}}"))
    rows = summary["trials"]
    pruned = [r for r in rows if r["state"] == "pruned"]
    assert len(rows) == 12 and pruned
    assert all(r["params"]["sparsity"] == 0.6 and r["test_ppl"] is None for r in pruned)  # no held-out evaluation
    assert all(r["val_ratio"] < 2 for r in rows if r["state"] == "complete" and r["params"]["sparsity"] == 0.1)


def test_a_trial_left_running_without_a_heartbeat_is_failed_and_rerun(tmp_path):
    """A worker killed before its trial's first heartbeat: Optuna's heartbeat check never fails
    that trial, so the sweep fails it once it has been seen running 3x longer than any finished
    trial, on the waiting worker's own clock (the stored start time is the other machine's). A
    trial whose objective started (it has a heartbeat) is left to the heartbeat check."""
    import warnings

    import optuna

    from subfit_core.apps.sweep import fail_overdue_trials

    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name="s")
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=1.0))  # took ~0 s
    with warnings.catch_warnings():  # ask() outside optimize: exactly the trial no heartbeat covers
        warnings.simplefilter("ignore", UserWarning)
        orphan = study.ask(dist)  # RUNNING, and no heartbeat was ever recorded for it
        slow = study.ask(dist)
    slow.set_user_attr("worker", "elsewhere:1")  # its objective started: the heartbeat check's
    seen: dict[int, float] = {}
    fail_overdue_trials(study, seen, heartbeat=True)  # first seen now: not yet overdue
    assert study.get_trials(deepcopy=False)[orphan.number].state.name == "RUNNING"
    time.sleep(0.05)
    fail_overdue_trials(study, seen, heartbeat=True)
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    assert states[orphan.number] == "FAIL" and states[slow.number] == "RUNNING"
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING"]
    assert [(t.params, t.system_attrs["failed_trial"]) for t in waiting] == [(orphan.params, orphan.number)]


def test_a_queued_re_run_goes_ahead_of_a_new_trial_and_is_dropped_if_the_study_is_full(tmp_path, capsys):
    """A failed trial's re-run, queued, counts ahead of any new trial numbered after it (which is then
    the surplus one). A re-run still queued once the study holds its trials is failed with the reason,
    so that no trial is left queued in a finished study."""
    import optuna

    from subfit_core.apps.sweep import drop_waiting, is_surplus

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=1.0))
    study.add_trial(optuna.trial.create_trial(params={"x": 0.2}, distributions=dist, state=optuna.trial.TrialState.WAITING,
                                              system_attrs={"failed_trial": 7}))  # trial 1: a queued re-run
    new = optuna.Trial(study, study._storage.create_new_trial(study._study_id))  # trial 2, started beside it
    assert new.number == 2 and is_surplus(new, 2) and not is_surplus(new, 3)
    study.tell(new.number, state=optuna.trial.TrialState.FAIL)

    drop_waiting(study, 1)
    rerun = study.get_trials(deepcopy=False)[1]
    assert rerun.state.name == "FAIL" and rerun.system_attrs["dropped"] == "the study already has its sweep.trials=1 finished"
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "trial 1 (a re-run of trial 7) dropped: the study already has its sweep.trials=1 finished"
    drop_waiting(study, 1)  # nothing queued: nothing to do
    assert "dropped" not in capsys.readouterr().err


def test_a_trial_started_by_a_machine_in_another_time_zone_is_not_overdue(tmp_path):
    """A trial's stored start time is the local clock of the machine that started it: one of a
    machine an hour ahead (another time zone) must not look an hour old to this worker."""
    import datetime

    import optuna

    from subfit_core.apps.sweep import fail_overdue_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=1.0))  # took ~0 s
    started = datetime.datetime.now() - datetime.timedelta(hours=1)
    study.add_trial(optuna.trial.FrozenTrial(
        number=0, state=optuna.trial.TrialState.RUNNING, value=None, datetime_start=started, datetime_complete=None,
        params={"x": 0.1}, distributions=dist, user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=0))
    assert study.get_trials(deepcopy=False)[1].datetime_start == started
    fail_overdue_trials(study, {})  # just seen running here: not overdue, whatever its start time says
    assert study.get_trials(deepcopy=False)[1].state.name == "RUNNING"


def start_together(code: str, n: int, *args: str) -> list[str]:
    """Run ``code`` in ``n`` Python processes released at the same moment (each imports first, says
    ready, and waits for a line on stdin); their outputs."""
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for _ in range(n)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.communicate()[0]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, outs
    return outs


JOIN = """
import sys
from subfit_core.apps.cli import resolve_recipe
from subfit_core.apps.sweep import check_space, join_study
cfg = resolve_recipe(sys.argv[1:])
space = check_space(cfg)
print("ready", flush=True)
sys.stdin.readline()
join_study(cfg, space)
"""


def assert_one_study_with_the_baseline_queued_once(storage, cfg: dict) -> None:
    import optuna

    from subfit_core.apps.sweep import base_values, check_space

    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["subfit-sweep"]
    trials = optuna.load_study(study_name="subfit-sweep", storage=storage).get_trials()
    assert len(trials) == 1 and trials[0].state.name == "WAITING"
    assert trials[0].system_attrs["fixed_params"] == base_values(cfg, check_space(cfg))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_workers_started_together_queue_the_recipe_as_written_once(tiny, tmp_path, kind):
    """Of workers started together on a new study, only the one that created it queues the baseline
    (before, every worker that found no trial queued it, and each ran it)."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = f"sqlite:///{tmp_path / 's.db'}" if kind == "sqlite" else str(tmp_path / "s.log")
    args = [f"strategy={tiny / 'recipe.yaml'}", f"sweep.storage={storage}", f"sweep.output_dir={tmp_path / 'o'}"]
    start_together(JOIN, 3, *args)
    assert_one_study_with_the_baseline_queued_once(
        storage if kind == "sqlite" else JournalStorage(JournalFileBackend(storage)), cfg_for(tiny, *args[1:]))


def test_only_the_worker_that_creates_the_study_queues_the_baseline(tiny, tmp_path):
    """The interleaving that made two workers each run the recipe as written: one creates the study,
    another joins it before the first has queued anything (it finds no trial)."""
    from subfit_core.apps.sweep import base_values, check_space, join_study, open_study

    cfg = cfg_for(tiny, f"sweep.output_dir={tmp_path / 'o'}")
    space = check_space(cfg)
    _, created = open_study(cfg)  # created, nothing queued yet
    assert created and join_study(cfg, space).get_trials() == []  # the second worker queues nothing
    assert not open_study(cfg)[1]
    cfg = cfg_for(tiny, f"sweep.output_dir={tmp_path / 'p'}")
    assert [t.system_attrs["fixed_params"] for t in join_study(cfg, space).get_trials()] == [base_values(cfg, space)]


def test_a_study_refuses_a_command_whose_trials_would_measure_another_recipe(tiny, tmp_path):
    """Joined (or reported) with another model, sparsity or space, a study would mix or mislabel its
    trials: refused in one line naming the key. Where and how long a worker runs may differ."""
    from subfit_core.apps.sweep import open_study, study_recipe
    from subfit_core.errors import SubFitError

    out = f"sweep.output_dir={tmp_path / 'o'}"
    assert "sweep.space.fitter.attn.rank.int" in study_recipe(cfg_for(tiny, out))
    assert open_study(cfg_for(tiny, out))[1]
    assert not open_study(cfg_for(tiny, out, "sweep.trials=50", "device=cpu", f"output_dir={tmp_path / 'x'}"))[1]
    with pytest.raises(SubFitError) as err:
        open_study(cfg_for(tiny, out, "sparsity=0.5"))
    assert "sweep.study_name: study 'subfit-sweep'" in str(err.value) and "this command has sparsity=0.5;" in str(err.value)
    with pytest.raises(SubFitError, match="sweep.validation_windows"):
        open_study(cfg_for(tiny, out, "sweep.validation_windows=3"), create=False)


def test_workers_with_one_seed_propose_different_values(tiny, tmp_path):
    """Trial n is sampled with seed + n: two workers that open the study at once (same seed, same
    trial count) do not propose the same values, and the sampler stays reproducible."""
    import warnings

    from subfit_core.apps.sweep import check_space, open_study, suggest

    cfg = cfg_for(tiny, f"sweep.output_dir={tmp_path / 'o'}", "sweep.sampler=random")
    space = check_space(cfg)
    (a, _), (b, _) = open_study(cfg), open_study(cfg)
    with warnings.catch_warnings():  # ask() outside optimize, on a storage with a heartbeat
        warnings.simplefilter("ignore", UserWarning)
        drawn = [tuple(v for _, v in suggest(study.ask(), space)) for _ in range(3) for study in (a, b)]
        assert len(set(drawn)) == 6
        other, _ = open_study(cfg_for(tiny, f"sweep.output_dir={tmp_path / 'p'}", "sweep.sampler=random"))
        assert tuple(v for _, v in suggest(other.ask(), space)) == drawn[0]  # trial 0 of another study: alike


def test_a_live_worker_whose_trial_another_worker_failed_goes_on(tiny, tmp_path, capsys):
    """A worker whose heartbeat was late (its trial failed and queued again by another worker)
    drops that trial's result and goes on; an error of its own still stops it."""
    import optuna

    from subfit_core.apps.sweep import Worker, open_study, run_trials

    cfg = cfg_for(tiny, "sweep.trials=3", f"sweep.storage={tmp_path / 's.db'}", f"sweep.output_dir={tmp_path / 'o'}")
    study, _ = open_study(cfg)
    other, _ = open_study(cfg)  # another worker's view of the study

    class Late(Worker):
        def measure(self, trial):
            x = trial.suggest_float("x", 0.0, 1.0)
            trial.set_user_attr("val_ratio", x)
            trial.set_user_attr("test_ratio", x)
            if trial.number == 0:  # another worker finds this trial's heartbeat late
                other.tell(0, state=optuna.trial.TrialState.FAIL)
                other.enqueue_trial(trial.params)
            return x

    run_trials(study, Late(cfg, None, 1.0, {}))  # type: ignore[arg-type]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert trials[1].params == trials[0].params  # run again
    assert "trial 0: failed by another worker" in capsys.readouterr().err

    class Broken(Worker):
        def measure(self, trial):
            raise ValueError("a bug of its own")

    cfg["sweep"]["trials"] = 4
    with pytest.raises(ValueError, match="a bug of its own"):
        run_trials(study, Broken(cfg, None, 1.0, {}))  # type: ignore[arg-type]


@pytest.mark.parametrize("url, shown", [
    ("postgresql://bob:s3cret-pw@db.example:5432/sweeps", "postgresql://bob:***@db.example:5432/sweeps"),
    ("postgresql+psycopg://bob:p%40ss%2Fw@db/s?sslmode=require", "postgresql+psycopg://bob:***@db/s?sslmode=require"),
    ("mysql+pymysql://bob@db/s?password=hunter22&x=1", "mysql+pymysql://bob@db/s?password=***&x=1"),
    ("postgresql://bob@db/sweeps", "postgresql://bob@db/sweeps"),
    ("sqlite:///runs/sweep.db", "sqlite:///runs/sweep.db"),
    ("runs/sweep.log", "runs/sweep.log"),
])
def test_storage_urls_are_shown_without_their_password(url, shown):
    from subfit_core.apps.sweep import passwords, redact, scrub

    assert redact(url) == shown
    for secret in passwords(url):
        assert secret not in scrub(f"cannot log in as bob with {secret} to {url}", url)
