"""Faults a hostile or unlucky user brings, one class at a time (issue 11): every outcome is a
surviving file, a one-line error with exit 2, no code executed, no orphan, or the same result
after a resume, never a traceback or a silent replacement."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import write_local_model_and_text  # noqa: E402

from subfit_core import load_compressed  # noqa: E402
from subfit_core.apps.cli import plugins_main, run_main  # noqa: E402
from subfit_core.artifact.outputs import MARKER, atomic_dir, claim  # noqa: E402
from subfit_core.engine import cache  # noqa: E402
from subfit_core.errors import SubFitError  # noqa: E402

BIN = Path(sys.executable).parent


def one_line_error(capsys, prog: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return write_local_model_and_text(tmp_path_factory.mktemp("local"), seed=1, lines=1200)


def tiny_args(local: Path, *extra: str) -> list[str]:
    return ["strategy=subfit", f"model={local / 'model'}", f"calib.dataset={local / 'text.txt'}", "sparsity=0.25",
            "calib.samples=8", "calib.seq_len=32", "calib.generated=0", "scoring.samples=2", "eval.windows=4",
            "eval.seq_len=32", "eval.domains=[]", *extra]


# ----------------------------------------------------------------------------- data loss and silent replacement


def test_overwrite_replaces_only_what_subfit_wrote(local, tmp_path, capsys):
    thesis = tmp_path / "mine" / "thesis.txt"
    thesis.parent.mkdir()
    thesis.write_text("four years of work")
    assert run_main(tiny_args(local, f"output_dir={thesis.parent}", "overwrite=true")) == 2
    one_line_error(capsys, "subfit-run", "was not written by SubFit", "choose another folder")
    assert thesis.read_text() == "four years of work"


@pytest.mark.parametrize("prog", ["subfit-report", "subfit-compare"])
def test_overwrite_must_be_true_or_false(local, tmp_path, capsys, prog):
    from subfit_core.apps.compare import compare_main
    from subfit_core.apps.report import report_main

    target = tmp_path / "out"
    atomic_dir(target, lambda tmp: (tmp / "keep.txt").write_text("kept"))
    if prog == "subfit-report":
        code = report_main([str(tmp_path), f"output_dir={target}", "overwrite=maybe"])
    else:
        code = compare_main(["strategies=[subfit]", "sparsities=[0.25]", f"output_dir={target}", "overwrite=maybe"])
    assert code == 2
    one_line_error(capsys, prog, "overwrite: 'maybe' is not a bool; allowed: true, false")
    assert (target / "keep.txt").read_text() == "kept"


HOLD = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from subfit_core.artifact.outputs import claim
    with claim(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(60)
''')


def test_a_second_writer_fails_at_once(local, tmp_path, capsys):
    target = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_main(tiny_args(local, f"output_dir={target}")) == 2
        one_line_error(capsys, "subfit-run", "is being written by another SubFit process", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert not target.exists()


DIE_WHILE_WRITING = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    from subfit_core.artifact.outputs import atomic_dir
    def write(tmp):
        (tmp / "model.safetensors").write_bytes(b"x" * 1_000_000)
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_dir(Path(sys.argv[1]), write)
''')


def test_kill_9_while_saving_leaves_an_orphan_the_next_writer_removes(tmp_path):
    target = tmp_path / "run"
    died = subprocess.run([sys.executable, "-c", DIE_WHILE_WRITING, str(target)])
    assert died.returncode == -signal.SIGKILL
    orphans = list(tmp_path.glob(".run.tmp-*"))
    assert len(orphans) == 1 and not target.exists()
    atomic_dir(target, lambda tmp: (tmp / "results.json").write_text("{}"))
    assert not list(tmp_path.glob(".run.tmp-*")) and (target / "results.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock file left either
    # an orphan of another folder is cleaned by the next writer of any folder next to it
    died = subprocess.run([sys.executable, "-c", DIE_WHILE_WRITING, str(tmp_path / "other")])
    assert died.returncode == -signal.SIGKILL and list(tmp_path.glob(".other.tmp-*"))
    atomic_dir(tmp_path / "third", lambda tmp: (tmp / "results.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "third"]


def test_a_folder_moved_aside_by_a_dead_writer_is_put_back(tmp_path):
    aside = tmp_path / ".run.old-99999"  # the writer died between its two renames
    aside.mkdir()
    (aside / MARKER).write_text("{}")
    (aside / "results.json").write_text('{"previous": true}')
    foreign = tmp_path / ".run.tmp-foreign"  # not marked as ours: left alone
    foreign.mkdir()
    with claim(tmp_path / "run"):
        pass
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == {"previous": True}
    assert foreign.exists()


@pytest.mark.parametrize("mask, folder, file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_follow_the_umask(tmp_path, mask, folder, file):
    def write(tmp: Path) -> None:
        (tmp / "results.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))

    old = os.umask(mask)
    try:
        atomic_dir(tmp_path / "out", write)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == folder
    assert stat.S_IMODE((tmp_path / "out" / "results.json").stat().st_mode) == file
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == file  # written by safetensors


def test_an_unwritable_output_dir_fails_before_anything_loads(local, tmp_path, capsys, monkeypatch):
    import subfit_core.engine.pipeline

    monkeypatch.setattr(subfit_core.engine.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run_main(tiny_args(local, f"output_dir={blocker / 'run'}")) == 2
    one_line_error(capsys, "subfit-run", "is not a writable folder")
    if os.geteuid() != 0:  # root writes anywhere; the permission check only means something for others
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert run_main(tiny_args(local, f"output_dir={locked / 'run'}")) == 2
        one_line_error(capsys, "subfit-run", "is not a writable folder")


# ----------------------------------------------------------------------------- code that runs without being asked


def test_bench_never_takes_trust_remote_code_from_the_run_folder(tmp_path, monkeypatch, capsys):
    import subfit_core.artifact.folder
    import subfit_core.engine.models
    from subfit_core.apps.speed import speed_main

    run = tmp_path / "received"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")
    (run / "recipe.yaml").write_text("model: someone/evil-model\ntrust_remote_code: true\ndtype: float32\n")
    seen = []

    def fake_load_model(plugins, spec, device, dtype, trust_remote_code):
        seen.append((spec, trust_remote_code))
        raise SubFitError("stop here")

    monkeypatch.setattr(subfit_core.artifact.folder, "load_compressed", lambda *a, **k: (None, None))
    monkeypatch.setattr(subfit_core.engine.models, "load_model", fake_load_model)
    assert speed_main([f"output_dir={run}"]) == 2
    assert speed_main([f"output_dir={run}", "trust_remote_code=true"]) == 2
    assert seen == [("someone/evil-model", False), ("someone/evil-model", True)]
    (run / "recipe.yaml").write_text("model: x\ndtype: load\n")
    assert speed_main([f"output_dir={run}"]) == 2
    assert "dtype" in capsys.readouterr().err.splitlines()[-1]


@pytest.fixture()
def saved(tmp_path):
    from test_export import save_every_kind

    out = tmp_path / "saved"
    save_every_kind("llama", out)
    return out


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, needle", [
    (lambda c: c.update(dtype="load"), "dtype 'load'; allowed: float32"),
    (lambda c: c["subfit"]["base"].update(model_type="os"), "subfit.base.model_type 'os'"),
    (lambda c: c["subfit"]["replacements"][0].update(layer=99), "subfit.replacements[0].layer 99; the model has layers 0..3"),
    (lambda c: c["subfit"]["replacements"][0].update(kind="evil"), "subfit.replacements[0].kind 'evil'; allowed: attn, ffn"),
    (lambda c: c["subfit"]["replacements"][0]["bypass"].update(rank=5), "model.safetensors' cannot be loaded"),
    (lambda c: c["subfit"]["replacements"][0]["bypass"].update(kind="torch.load"), "unknown bypass kind 'torch.load'"),
    (lambda c: c["subfit"].update(format=1), "saved in SubFit format 1"),
])
def test_artifact_fields_are_checked_against_what_is_allowed(saved, change, needle):
    edit_config(saved, change)
    with pytest.raises(SubFitError) as err:
        load_compressed(saved)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_truncated_weights_are_a_one_line_error_in_every_loader(saved, capsys):
    from subfit_core.apps.speed import speed_main

    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SubFitError, match="model.safetensors' cannot be loaded"):
        load_compressed(saved)
    assert speed_main([f"output_dir={saved}", "model=x"]) == 2
    one_line_error(capsys, "subfit-speed", "model.safetensors")


# ----------------------------------------------------------------------------- corruption used silently


@pytest.fixture()
def stats_file(tmp_path, tiny_model, random_windows):
    from subfit_core.engine.workbench import Workbench
    from subfit_plugins.adapters.llama import LlamaFamilyAdapter

    model = tiny_model("llama")
    bench = Workbench(model, LlamaFamilyAdapter(model), random_windows(), 4, torch.device("cpu"))
    bench.collect()
    path = tmp_path / "stats.safetensors"
    cache.save_stats(path, bench.stats)
    return path, bench


def test_cache_entries_with_nan_wrong_shapes_or_changed_bytes_are_recomputed(stats_file, capsys):
    path, bench = stats_file
    dim, subs = bench.adapter.hidden_size, bench.subs
    assert cache.load_stats(path, subs, dim) is not None
    data = bytearray(path.read_bytes())
    data[-9] ^= 0xFF  # one flipped byte in the last tensor
    path.write_bytes(bytes(data))
    assert cache.load_stats(path, subs, dim) is None
    assert "checksum does not match" in capsys.readouterr().err
    first = subs[0]
    bench.stats[first].gram = bench.stats[first].gram.clone()
    bench.stats[first].gram[0, 0] = float("nan")  # a valid checksum over NaN data
    cache.save_stats(path, bench.stats)
    assert cache.load_stats(path, subs, dim) is None
    assert f"{first.name}.gram holds NaN or Inf); recomputing" in capsys.readouterr().err
    bench.stats[first].gram = torch.zeros(3, 3, dtype=torch.float64)
    cache.save_stats(path, bench.stats)
    assert cache.load_stats(path, subs, dim) is None
    assert f"{first.name}.gram has shape (3, 3)" in capsys.readouterr().err


def test_non_finite_numbers_are_refused(local, tmp_path, capsys):
    from subfit_core.apps.sweep import sweep_main

    assert run_main(tiny_args(local, "sparsity=.nan", "save=false")) == 2
    one_line_error(capsys, "subfit-run", "sparsity: nan is not a finite number")
    assert sweep_main(tiny_args(local, "sweep.space={sparsity: {float: [.nan, 0.4]}}",
                                f"sweep.output_dir={tmp_path / 's'}")) == 2
    one_line_error(capsys, "subfit-sweep", "give [low, high] finite floats")


# ----------------------------------------------------------------------------- one line, never a traceback


def test_bad_files_and_arguments_are_one_line_errors(local, tmp_path, capsys):
    from subfit_core.apps.report import report_main
    from subfit_core.apps.sweep import storage_for

    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert run_main([f"strategy={recipe}"]) == 2
    one_line_error(capsys, "subfit-run", "is not UTF-8 text")

    for text in ("{}", "not json", "[1, 2]"):
        run = tmp_path / f"run-{len(text)}"
        run.mkdir()
        (run / "results.json").write_text(text)
        assert report_main([str(run), f"output_dir={tmp_path / 'report'}"]) == 2
        one_line_error(capsys, "subfit-report", str(run / "results.json"))

    journal = tmp_path / "study.log"
    journal.write_text("this is not an optuna journal\n\x00\x01garbage\n")
    with pytest.raises(SubFitError, match="is not an Optuna journal file"):
        storage_for({"storage": str(journal), "output_dir": str(tmp_path / "s"), "heartbeat_s": 60})

    assert plugins_main(["--bogus"]) == 2
    one_line_error(capsys, "subfit-plugins", "'--bogus' is not known")
    assert run_main(tiny_args(local, "fitter.attn.name=nope", "save=false")) == 2
    one_line_error(capsys, "subfit-run", "fitter.attn.name: unknown fitter 'nope'")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert run_main(tiny_args(local, f"model={empty}", "save=false")) == 2
    one_line_error(capsys, "subfit-run", "folder without config.json")


def test_a_corrupted_compare_journal_is_read_around(tmp_path, capsys):
    from subfit_core.apps.compare import Journal

    out = tmp_path / "compare"
    args = {"strategies": ["subfit"], "sparsities": [0.25], "shared": []}
    good = {"strategy": "subfit", "sparsity": 0.25, "status": "ok", "ppl_ratio": 1.5}
    (tmp_path / ".compare.journal.jsonl").write_text(
        json.dumps(args, sort_keys=True) + "\n42\n" + '{"status":"ok"}\n' + json.dumps(good) + "\n{\"strat")
    journal = Journal(out, args)
    assert journal.done == {("subfit", 0.25): good}
    assert "3 unreadable lines ignored" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resume


KILL_AFTER = textwrap.dedent('''
    import os, signal, sys
    from subfit_core.engine import scoring
    evaluate = scoring.ScoringSet.evaluate
    def dying(self, *args, **kwargs):
        if self.evaluations >= int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(self, *args, **kwargs)
    scoring.ScoringSet.evaluate = dying
    from subfit_core.apps.cli import run_main
    sys.exit(run_main(sys.argv[1:]))
''')


def test_a_run_killed_during_selection_resumes_there_with_the_same_result(local, tmp_path):
    def run(cache_dir: Path, out: Path, kill_after: int | None = None):
        env = {**os.environ, "SUBFIT_CACHE": str(cache_dir), "SUBFIT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
        args = tiny_args(local, f"output_dir={out}", "cache_stats=true")
        if kill_after is None:
            done = subprocess.run([str(BIN / "subfit-run"), *args], capture_output=True, text=True, env=env, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            return json.loads((out / "results.json").read_text())
        done = subprocess.run([sys.executable, "-c", KILL_AFTER, *args], capture_output=True, text=True,
                              env={**env, "KILL_AFTER": str(kill_after)}, timeout=600)
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        assert not out.exists()

    whole = run(tmp_path / "cache-a", tmp_path / "whole")
    total = whole["timings"]["scoring_evaluations"]
    assert total > 12
    run(tmp_path / "cache-b", tmp_path / "resumed", kill_after=10)  # killed in the middle of selection
    journal = list((tmp_path / "cache-b" / "evaluations").glob("*.jsonl"))
    assert len(journal) == 1 and len(journal[0].read_text().splitlines()) == 10
    resumed = run(tmp_path / "cache-b", tmp_path / "resumed")
    assert resumed["timings"]["statistics_from_cache"] is True
    assert resumed["timings"]["scoring_evaluations_replayed"] >= 10
    assert 0 < resumed["timings"]["replayed_s"] < resumed["timings"]["compression_s"]  # counted, and said apart
    assert whole["timings"]["replayed_s"] == 0
    assert resumed["timings"]["scoring_evaluations"] == total - 10  # only what the killed run had not done
    assert resumed["replaced"] == whole["replaced"]
    assert resumed["perplexity"]["compressed"] == whole["perplexity"]["compressed"]


def test_no_writer_replaces_a_folder_subfit_did_not_write(tmp_path):
    from subfit_core.apps.sweep import run_worker  # noqa: F401  (sweeps write through atomic_dir too)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(SubFitError, match="was not written by SubFit; it is not replaced"):
        atomic_dir(mine, lambda tmp: (tmp / "results.json").write_text("{}"))
    assert (mine / "notes.txt").read_text() == "mine"


def test_a_waiting_writer_takes_its_turn(tmp_path):
    target = tmp_path / "summary"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.replace("time.sleep(60)", "time.sleep(2)"), str(target)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    atomic_dir(target, lambda tmp: (tmp / "results.json").write_text("{}"), wait=30)
    assert time.monotonic() - t0 > 0.5 and (target / "results.json").exists()
    holder.wait()


@pytest.mark.parametrize("extra, needle", [
    (["strategy=replaceme", "selector.name=greedy"], "selector.name: greedy can select parts of layers, but fitter replaceme"),
    (["strategy=llm-streamline", "anchored=true"], "anchored: true is not supported by fitter llm-streamline"),
    (["strategy=replaceme", "anchored=true"], "anchored: true is not supported by fitter replaceme"),
])
def test_components_that_cannot_work_together_fail_before_any_work(local, capsys, monkeypatch, extra, needle):
    import subfit_core.engine.pipeline

    monkeypatch.setattr(subfit_core.engine.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = [a for a in tiny_args(local, "save=false") if not a.startswith("strategy=")]
    assert run_main([*extra, *args]) == 2
    one_line_error(capsys, "subfit-run", needle)


def test_the_journal_counts_only_earlier_work_as_replayed(tmp_path):
    """An answer to an evaluation this compression made counts nothing (nothing was spent); one recorded
    before it began (an interrupted run, or an earlier compression of the session) counts once, with the
    seconds it took then, so each compression reports what it would cost alone."""
    from subfit_core.engine.journal import EvaluationJournal

    journal = EvaluationJournal()
    journal.open(tmp_path / "j.jsonl")
    journal.record("a", 1.5, 2.0)
    assert journal.replay("a") == 1.5 and journal.replay("b") is None
    assert (journal.replayed, journal.replayed_seconds) == (0, 0.0)
    journal.begin()  # the next compression of the session
    assert journal.replay("a") == journal.replay("a") == 1.5
    assert (journal.replayed, journal.replayed_seconds) == (1, 2.0)
    later = EvaluationJournal()
    assert later.open(tmp_path / "j.jsonl") == 1
    assert later.replay("a") == later.replay("a") == 1.5
    assert (later.replayed, later.replayed_seconds) == (1, 2.0)
