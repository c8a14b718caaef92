"""subfit-speed on a saved run (dense original from its recipe) and subfit-report over several runs:
tables, JSON, PNG plots, atomic output, one-line errors."""

from __future__ import annotations

import json

import pytest

from subfit_core.apps.cli import run_main
from subfit_core.apps.report import report_main
from subfit_core.apps.speed import speed_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from conftest import write_local_model_and_text

    folder = write_local_model_and_text(tmp_path_factory.mktemp("report"), seed=4, lines=800)
    common = [f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=4", "calib.seq_len=16",
              "scoring.samples=2", "eval.windows=2", "eval.seq_len=16", "cache_stats=false"]
    runs = []
    for sparsity in (0.2, 0.4):
        out = folder / f"run{sparsity}"
        assert run_main(common + [f"sparsity={sparsity}", f"output_dir={out}"]) == 0
        runs.append(out)
    return runs


def test_bench_measures_a_saved_run_against_its_dense_original(two_runs, capsys):
    run = two_runs[1]
    code = speed_main([f"output_dir={run}", "device=cpu", "speed.prompt_lengths=[5]", "speed.batch_sizes=[1,2]",
                       "speed.new_tokens=3", "speed.repeats=1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "TTFT speed-up" in out and out.count("| dense |") == 2
    dep = json.loads((run / "deployment.json").read_text())
    assert dep["device"].startswith("cpu") and set(dep["models"]) == {"dense", "compressed"}
    res = json.loads((run / "results.json").read_text())
    kv = res["kv_cache_bytes_per_token"]
    assert dep["ratios"]["kv_cache"] == pytest.approx(kv["after"] / kv["before"])  # measured == formula
    assert (run / "deployment.md").read_text().startswith("# Deployment")


def test_speed_errors_are_one_line(two_runs, capsys, tmp_path):
    assert speed_main([f"output_dir={tmp_path}"]) == 2
    assert "is not a saved subfit-run directory" in capsys.readouterr().err
    assert speed_main([f"output_dir={two_runs[0]}", "speed.new_token=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'new_tokens'" in err
    assert speed_main([f"output_dir={two_runs[0]}", "prompt=3"]) == 2
    assert "prompt: unknown key" in capsys.readouterr().err


def test_report_over_runs_writes_table_json_and_plots(two_runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report_main([str(two_runs[0]), f"runs=[{two_runs[1]}]", f"output_dir={out}"]) == 0
    assert {"report.md", "report.json", "accuracy_ppl_vs_sparsity.png", "latency_kv_vs_sparsity.png"} <= {
        p.name for p in out.iterdir()}
    data = json.loads((out / "report.json").read_text())
    rows = data["rows"]
    assert [r["sparsity"] for r in rows] == [0.2, 0.4]
    ratios = [r["ppl_ratio"] for r in rows]
    assert data["geometric_means"]["ppl_ratio"] == pytest.approx((ratios[0] * ratios[1]) ** 0.5)
    text = (out / "report.md").read_text()
    assert text.count(f"| {two_runs[0]} |") == 1 and "geometric means" in text
    assert (out / "latency_kv_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    assert report_main([str(two_runs[0]), f"output_dir={out}"]) == 2  # exists, no overwrite
    assert "already exists" in capsys.readouterr().err
    assert report_main([str(tmp_path / "nothing")]) == 2
    assert "holds no results.json" in capsys.readouterr().err
