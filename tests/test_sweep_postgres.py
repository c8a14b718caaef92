"""subfit-sweep on a real PostgreSQL server (started here, on a loopback port, for these tests):
workers started together make one study and run the baseline once, a worker killed mid-trial has
its trial failed and run again by the others, ``--report`` rebuilds the outputs from the database
alone, connection mistakes are one-line errors, and the password is nowhere in what is printed
or written.

The server comes from Debian's postgresql package, which ``make test`` installs when it is missing
(as root; see tests/postgres_server.py). Without it these tests fail, unless SUBFIT_SKIP_POSTGRES=1.
"""

from __future__ import annotations

import datetime
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from postgres_server import MISSING, PostgresServer, free_port, server_binaries
from test_sweep import (
    JOIN,
    assert_one_study_with_the_baseline_queued_once,
    cfg_for,
    read_progress_until,
    start_together,
    worker,
    write_tiny_sweep,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def require_postgres() -> None:
    """Skip only when asked to; fail, saying what to install, when the server binaries are missing."""
    if os.environ.get("SUBFIT_SKIP_POSTGRES") == "1":
        pytest.skip("SUBFIT_SKIP_POSTGRES=1")
    if server_binaries() is None:
        pytest.fail(MISSING, pytrace=False)


@pytest.fixture(scope="session")
def postgres():
    require_postgres()
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sweep(tmp_path_factory.mktemp("pgsweep"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The tiny sweep with a larger model (hidden 256, 8 layers): a trial takes about a second,
    so that three workers run trials side by side and one can be killed inside one."""
    from conftest import build_tiny_model

    folder = write_tiny_sweep(tmp_path_factory.mktemp("pgsweep-small"))
    build_tiny_model("llama", seed=1, num_hidden_layers=8, hidden_size=256, intermediate_size=512,
                     head_dim=64).save_pretrained(folder / "model")
    return folder


def new_database(server: PostgresServer, name: str) -> str:
    """The URL of a new, empty database (Optuna's tables not made yet) owned by the test user."""
    server.admin(f"CREATE DATABASE {name} OWNER {server.user}")
    return server.url_with(database=name)


def no_password_in(server: PostgresServer, texts: list[str], folders: list[Path]) -> None:
    for text in texts:
        assert server.password not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert server.password.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("part, message", [
    ("port", "Connection refused"),
    ("password", 'password authentication failed for user "subfit" (check the user and password'),
    ("database", 'database "nosuch" does not exist (create it first: createdb'),
])
def test_connection_mistakes_are_one_line_errors_without_the_password(postgres, tiny, tmp_path, capsys, part, message):
    from subfit_core.apps.sweep import sweep_main

    wrong = {"port": {"port": free_port()}, "password": {"password": "wrong-password"},
             "database": {"database": "nosuch"}}[part]
    url = postgres.url_with(**wrong)
    assert sweep_main([f"strategy={tiny / 'recipe.yaml'}", f"sweep.storage={url}",
                       f"sweep.output_dir={tmp_path / 'o'}"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("subfit-sweep: error: sweep.storage: cannot connect to postgresql://subfit:***@127.0.0.1:")
    assert message in err and err.count("\n") == 1, err
    assert postgres.password not in out + err and "wrong-password" not in out + err
    assert not (tmp_path / "o").exists()


def test_a_missing_driver_is_a_one_line_error_naming_the_extra(tiny, tmp_path, capsys, monkeypatch):
    from subfit_core.apps.sweep import sweep_main

    for module in ("psycopg", "psycopg2"):
        monkeypatch.setitem(__import__("sys").modules, module, None)  # as if not installed
    url = "postgresql://subfit:very-secret@127.0.0.1:1/sweeps"
    assert sweep_main([f"strategy={tiny / 'recipe.yaml'}", f"sweep.storage={url}",
                       f"sweep.output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("subfit-sweep: error: sweep.storage: no database driver for "
                          "postgresql://subfit:***@127.0.0.1:1/sweeps")
    assert "pip install -e '.[postgres]'" in err and err.count("\n") == 1 and "very-secret" not in err


def test_the_password_can_stay_out_of_the_url(postgres, tiny, tmp_path, monkeypatch):
    """libpq reads PGPASSWORD (or ~/.pgpass): the URL on the command line then holds no secret."""
    from subfit_core.apps.sweep import open_study

    url = new_database(postgres, "nopassword").replace(f":{postgres.password}@", "@")
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    study, created = open_study(cfg_for(tiny, f"sweep.storage={url}", f"sweep.output_dir={tmp_path / 'o'}"))
    assert created and study.study_name == "subfit-sweep"


def test_workers_started_together_on_a_new_database_make_one_study_with_one_baseline(postgres, tiny, tmp_path):
    """Three workers open a new database at the same moment: they race to make Optuna's tables (the
    losers open it again) and to create the study (one wins and queues the recipe as written)."""
    url = new_database(postgres, "together")
    args = [f"strategy={tiny / 'recipe.yaml'}", f"sweep.storage={url}", f"sweep.output_dir={tmp_path / 'o'}"]
    outs = start_together(JOIN, 3, *args)
    assert not any(postgres.password in o for o in outs)
    assert_one_study_with_the_baseline_queued_once(url, cfg_for(tiny, *args[1:]))


def test_three_workers_on_postgres_survive_one_killed_mid_trial_and_report_from_the_database(postgres, small, tmp_path):
    """Three worker processes on one new database; one is killed with SIGKILL inside a trial. The
    others fail that trial (heartbeat) and run its parameters again; the study ends with exactly
    the trials asked for, no two alike, the baseline run once; ``--report`` rebuilds the outputs
    from the database alone; the password is in no output, message or file."""
    from subfit_core.apps.sweep import base_values, check_space

    url, total = new_database(postgres, "sweep"), 9
    out = tmp_path / "out"
    extra = ("sweep.pruner=none", "sweep.heartbeat_s=2")  # a silent worker's trial is failed after 4 s
    began = time.monotonic()
    procs = [worker(small, url, out, total, *extra) for _ in range(3)]
    victim, survivors = procs[0], procs[1:]
    try:
        study = wait_for_study(url, victim)
        orphan = kill_inside_a_trial(victim, study)  # SIGKILL inside the first trial of its own
        killed_at = datetime.datetime.now()
        victim_err = victim.stderr.read() if victim.stderr else ""
        victim.wait()
        results = [p.communicate(timeout=600) for p in survivors]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    seconds = time.monotonic() - began
    assert victim.returncode == -signal.SIGKILL
    assert [p.returncode for p in survivors] == [0, 0], [r[1][-3000:] for r in results]

    trials = study.get_trials()
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == total and all(t.state.name == "COMPLETE" for t in done)  # exactly the trials asked for
    assert len({tuple(sorted(t.params.items())) for t in done}) == total  # no two with the same parameters
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert trials[orphan.number].state.name == "FAIL"  # the killed worker's trial: failed by the heartbeat ...
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    killed = trials[orphan.number]  # as the killed worker left it: parameters sampled, no result
    assert len(rerun) == 1 and rerun[0].params == killed.params  # ... and queued again, once: run by another
    if rerun[0].state.name == "COMPLETE":  # worker, or dropped when a new trial had taken the last place first
        assert rerun[0].user_attrs["worker"] != killed.user_attrs["worker"]
    else:
        assert rerun[0].state.name == "FAIL" and "dropped" in rerun[0].system_attrs
    dropped = [t for t in trials if "dropped" in t.system_attrs]  # only re-runs are ever dropped
    assert all("failed_trial" in t.system_attrs for t in dropped)
    cfg = cfg_for(small, f"sweep.output_dir={out}")
    base = base_values(cfg, check_space(cfg))
    queued = [t for t in trials if t.system_attrs.get("fixed_params") == base]  # the recipe as written ...
    assert len([t for t in queued if "failed_trial" not in t.system_attrs]) == 1  # ... queued once
    assert len([t for t in queued if t in done]) == 1  # ... and finished once
    workers = {t.user_attrs["worker"] for t in done}
    assert len(workers) >= 2

    # --report: the outputs again, from the database alone, in a new folder
    report = tmp_path / "report"
    rep = worker(small, url, report, total, *extra, "--report")
    rep_out, rep_err = rep.communicate(timeout=300)
    assert rep.returncode == 0, rep_err[-2000:]
    for name in ("trials.csv", "trials.md", "best.yaml"):
        assert (report / name).read_text() == (out / name).read_text(), name
    assert len((report / "trials.csv").read_text().splitlines()) == total + 1
    assert "sweep" not in yaml.safe_load((report / "best.yaml").read_text())
    assert f"{total} finished trials in postgresql://subfit:***@127.0.0.1:{postgres.port}/sweep" in rep_out
    assert all("postgresql://subfit:***@" in r[0] for r in results)
    no_password_in(postgres, [victim_err, rep_out, rep_err, *[o + e for o, e in results]], [out, report])

    failed_at, rerun_done = trials[orphan.number].datetime_complete, rerun[0].datetime_complete
    assert failed_at is not None and rerun_done is not None
    print(f"\npostgres sweep: 3 workers (1 killed with SIGKILL inside trial {orphan.number}), {total} trials finished "
          f"by {len(workers)} workers, {len(trials)} trials in all; the killed trial was failed "
          f"{(failed_at - killed_at).total_seconds():.1f} s after the kill (heartbeat 2 s, grace 4 s) and its "
          f"re-run (trial {rerun[0].number}) {rerun[0].state.name.lower()} "
          f"{(rerun_done - killed_at).total_seconds():.1f} s after it; "
          f"{seconds:.0f} s in all")


def wait_for_study(url: str, proc):
    import optuna

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return optuna.load_study(study_name="subfit-sweep", storage=url)
        except KeyError:  # not created yet
            time.sleep(0.1)
    raise AssertionError("no worker created the study")


def kill_inside_a_trial(proc, study):
    """SIGKILL a worker while a trial of its own is running: it is stopped (SIGSTOP) once such a
    trial shows in the database, and killed only if that trial is still running then (a frozen
    worker cannot finish it); the trial."""
    import optuna

    from subfit_core.apps.sweep import WORKER

    mine = f"{WORKER.rsplit(':', 1)[0]}:{proc.pid}"
    running = (optuna.trial.TrialState.RUNNING,)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        ours = [t for t in study.get_trials(states=running) if t.user_attrs.get("worker") == mine]
        if ours:
            proc.send_signal(signal.SIGSTOP)
            still = [t for t in study.get_trials(states=running) if t.number == ours[0].number]
            if still:
                proc.send_signal(signal.SIGKILL)
                return still[0]
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError("the worker never ran a trial")


def test_the_database_failing_mid_sweep_is_a_one_line_error(tiny, tmp_path):
    """The server stops while a worker runs trials: one line, exit 2, no traceback, no password;
    the finished trials are kept (the same command resumes once the server is back)."""
    require_postgres()
    server = PostgresServer.start()  # its own: this one is stopped
    try:
        proc = worker(tiny, server.url, tmp_path / "o", 500, "sweep.heartbeat_s=2")
        read_progress_until(proc, 2)
        server.run("pg_ctl", "-D", str(server.folder / "data"), "-m", "immediate", "-w", "stop")
        out, err = proc.communicate(timeout=120)
    finally:
        server.stop()
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and server.password not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"subfit-sweep: error: sweep.storage: postgresql://subfit:***@127.0.0.1:{server.port}/sweeps "
                           "failed during the sweep (")
    assert last.endswith("finished trials are kept there: run the same command again to resume")
