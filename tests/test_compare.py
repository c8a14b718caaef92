"""subfit-compare: several strategies and sparsities from one shared dense pass, with a failing
strategy reported rather than fatal; also exercises a local model directory and a local text file."""

from __future__ import annotations

import csv
import json
import math

import pytest

from subfit_core.apps.compare import compare
from subfit_core.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def local_model_and_text(tmp_path_factory):
    from conftest import write_local_model_and_text

    folder = write_local_model_and_text(tmp_path_factory.mktemp("tiny"), seed=1, lines=1500)
    (folder / "broken.yaml").write_text(  # a learning rate that makes the trained FFN diverge: fails at fit time
        "name: broken\nscorer: {name: angular-distance}\nselector: {name: contiguous}\n"
        "fitter: {name: llm-streamline, lr: 1.0e+30, epochs: 3, batch_tokens: 16}\n")
    return folder


def test_compare_shares_one_dense_pass_and_reports_failures(local_model_and_text, monkeypatch):
    folder = local_model_and_text
    from subfit_core.engine import dense_statistics

    passes = []
    original = dense_statistics.DenseStatistics.accumulate
    monkeypatch.setattr(dense_statistics.DenseStatistics, "accumulate", lambda self, ids: (passes.append(1), original(self, ids))[1])
    out = folder / "compare"
    summary = compare([
        "strategies=[subfit,shortgpt,sleb," + str(folder / "broken.yaml") + "]", "sparsities=[0.17,0.34]",
        f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=6", "calib.seq_len=16",
        "scoring.samples=2", "eval.windows=3", "eval.seq_len=16", "cache_stats=false", "calibration=shared",
        f"output_dir={out}"])
    assert len(passes) == 1  # one dense calibration pass for 8 (strategy, sparsity) runs
    rows = summary["rows"]
    assert [(r["strategy"], r["sparsity"]) for r in rows] == [
        (s, x) for s in ["subfit", "shortgpt", "sleb", str(folder / "broken.yaml")] for x in (0.17, 0.34)]
    failed = [r for r in rows if r["status"] != "ok"]
    assert [r["strategy"] for r in failed] == [str(folder / "broken.yaml")] * 2
    assert "NumericalError: " in failed[0]["error"] and "training diverged" in failed[0]["error"] and "\n" not in failed[0]["error"]
    for r in rows:
        if r["status"] == "ok":
            assert r["achieved_layers"] >= r["sparsity"] - 1e-9 and r["ppl_ratio"] > 0
    shortgpt = [r for r in rows if r["strategy"] == "shortgpt"]
    assert all(r["attn_removed"] == r["ffn_removed"] for r in shortgpt)  # whole layers only
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "table.md", "table.csv", "ppl_vs_sparsity.png", "removed_map_0.17.png"} <= names
    assert "failed: NumericalError" in (out / "table.md").read_text()
    table = list(csv.DictReader((out / "table.csv").open()))
    assert len(table) == 8 and table[0]["strategy"] == "subfit"
    stored = json.loads((out / "results.json").read_text())
    assert stored["sparsities"] == [0.17, 0.34] and stored["model"] == str(folder / "model")  # combine= names it
    assert (out / "ppl_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    # the bundled domains (none calibrated on here): a column each, their geometric mean, and its plot
    head = (out / "table.md").read_text().splitlines()[0]
    assert "| kjv ppl ratio | shakespeare ppl ratio | pydocs ppl ratio | jargon ppl ratio | out-of-domain ppl ratio |" in head
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert set(r["domains"]) == {"kjv", "shakespeare", "pydocs", "jargon"}
        assert r["ood_ppl_ratio"] == pytest.approx(math.prod(r["domains"].values()) ** 0.25)
    assert (out / "ood_ppl_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"


def test_each_strategy_calibrates_as_its_recipe_says_against_one_dense_reference(local_model_and_text, monkeypatch):
    """calibration=recipe (the default): strategies whose recipes calibrate differently get their own
    windows and dense pass, the model and dense reference are measured once, and each row equals what
    a comparison of that strategy alone gives."""
    folder = local_model_and_text
    from subfit_core.engine import dense_statistics, pipeline

    (folder / "wide.yaml").write_text(  # SLEB on more scoring windows and half sampled calibration text
        "name: wide\nscorer: {name: output, metric: loss}\nselector: {name: iterative, unit: layer}\n"
        "fitter: {name: identity}\ncalib: {samples: 8, generated: 0.5}\nscoring: {samples: 3, stride: 1}\n")
    (folder / "plain.yaml").write_text(  # no protocol of its own: the schema's, as shortgpt's
        "name: plain\nscorer: {name: angular-distance}\nselector: {name: contiguous}\nfitter: {name: identity}\n")
    passes, dense = [], []
    accumulate, perplexity = dense_statistics.DenseStatistics.accumulate, pipeline.perplexity
    monkeypatch.setattr(dense_statistics.DenseStatistics, "accumulate",
                        lambda self, ids, *a, **k: (passes.append(ids.shape[0]), accumulate(self, ids, *a, **k))[1])
    monkeypatch.setattr(pipeline, "perplexity", lambda model, ids, *a: (dense.append(a[-1]), perplexity(model, ids, *a))[1])
    wide, plain = str(folder / "wide.yaml"), str(folder / "plain.yaml")
    common = [f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.seq_len=16",
              "eval.windows=3", "eval.seq_len=16", "cache_stats=false", "sparsities=[0.34]"]
    summary = compare([f"strategies=[shortgpt,{wide},{plain}]", *common, f"output_dir={folder / 'own'}"])
    assert passes == [64, 8]  # shortgpt and plain share the schema's protocol (64 windows), wide has its own
    assert sum(desc.startswith("dense perplexity") for desc in dense) == 5  # one dense reference: 4 domains + main
    rows = {r["strategy"]: r for r in summary["rows"]}
    assert rows["shortgpt"]["calibration"] == rows[plain]["calibration"] == "calibration 64 x 16, scoring 4 windows (stride 2)"
    assert rows[wide]["calibration"] == "calibration 8 x 16 (50% sampled from the model), scoring 3 windows"
    assert summary["protocols"] == {rows["shortgpt"]["calibration"]: ["shortgpt", plain], rows[wide]["calibration"]: [wide]}
    assert [r["strategy"] for r in summary["rows"]] == ["shortgpt", wide, plain]  # the order given
    table = {r["strategy"]: r for r in csv.DictReader((folder / "own" / "table.csv").open())}
    assert table[wide]["calibration"] == rows[wide]["calibration"]
    assert rows[wide]["calibration"] in (folder / "own" / "table.md").read_text()  # the protocols under the table
    alone = compare([f"strategies=[{wide}]", *common, f"output_dir={folder / 'alone'}"])
    assert alone["rows"][0]["ppl_ratio"] == pytest.approx(rows[wide]["ppl_ratio"], rel=1e-6)
    assert alone["rows"][0]["replaced"] == rows[wide]["replaced"]
    # shared: every strategy on the first one's protocol, one pass
    passes.clear()
    shared = compare([f"strategies=[{wide},shortgpt]", *common, "calibration=shared", f"output_dir={folder / 'shared'}"])
    assert passes == [8] and {r["calibration"] for r in shared["rows"]} == {rows[wide]["calibration"]}
    with pytest.raises(ConfigError, match=r"calibration: 'own' is not one of recipe, shared"):
        compare(["strategies=[sleb]", "sparsities=[0.3]", "calibration=own"])


def test_a_protocol_the_text_cannot_serve_fails_its_rows_and_not_the_others(local_model_and_text, monkeypatch):
    """A recipe asking for more calibration windows than the text holds fails its own rows, named;
    the other protocols still run, and a rerun whose rows are all journalled measures only the dense
    reference, on one window, before writing the results."""
    folder = local_model_and_text
    from subfit_core.apps import compare as compare_module
    from subfit_core.engine import dense_statistics

    (folder / "huge.yaml").write_text(
        "name: huge\nscorer: {name: angular-distance}\nselector: {name: contiguous}\nfitter: {name: identity}\n"
        "calib: {samples: 1000000}\n")
    huge = str(folder / "huge.yaml")
    passes = []
    accumulate = dense_statistics.DenseStatistics.accumulate
    monkeypatch.setattr(dense_statistics.DenseStatistics, "accumulate",
                        lambda self, ids, *a, **k: (passes.append(ids.shape[0]), accumulate(self, ids, *a, **k))[1])
    args = [f"strategies=[{huge},shortgpt]", "sparsities=[0.34]", f"model={folder / 'model'}",
            f"calib.dataset={folder / 'text.txt'}", "calib.seq_len=16", "eval.windows=3", "eval.seq_len=16",
            "cache_stats=false", f"output_dir={folder / 'huge-run'}"]
    monkeypatch.setattr(compare_module, "plot", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stopped after every row, before the results were written
        compare(args)
    assert passes == [64]  # huge never reached its pass; shortgpt ran on the schema's 64 windows
    passes.clear()
    monkeypatch.setattr(compare_module, "plot", lambda *a: None)
    monkeypatch.setattr(compare_module, "compress", lambda *a: pytest.fail("a journalled row was run again"))
    summary = compare(args)
    assert passes == [1]  # all journalled except the failed rows, retried: huge fails again, then the reference
    failed, ok = summary["rows"]
    assert failed["status"] == "failed" and ok["status"] == "ok" and ok["strategy"] == "shortgpt"
    assert failed["error"].startswith(f"SubFitError: calibration protocol of {huge} (calibration 1000000 x 16")
    assert "calib.samples: " in failed["error"] and "\n" not in failed["error"]
    assert summary["dense_ppl"] > 0 and (folder / "huge-run" / "table.md").exists()


@pytest.mark.parametrize("name, protocol", [
    ("sleb", "calibration 64 x 256, scoring 40 windows"),  # the released code's ~10K tokens, every position
    ("finercut", "calibration 64 x 256, scoring 100 windows"),
    ("blockpruner", "calibration 64 x 256, scoring 150 windows"),
    ("laco", "calibration 64 x 256, scoring 1 window (stride 2)"),
    ("replaceme", "calibration 1024 x 256, scoring 40 windows"),
    ("subfit-delete", "calibration 256 x 256 (50% sampled from the model), scoring 8 windows (stride 2)"),
])
def test_baseline_recipes_carry_their_papers_protocols(name, protocol):
    from subfit_core.apps.compare import protocol_of, strategy_config

    assert protocol_of(strategy_config(name, 0.25, [], None)) == protocol
    base = strategy_config("subfit", 0.25, [], None)  # in a comparison: the recipe's protocol, the shared text
    assert protocol_of(strategy_config(name, 0.25, [("calib.dataset", "shakespeare")], base, "recipe")) == protocol
    assert strategy_config(name, 0.25, [], base, "shared")["scoring"] == base["scoring"]


def test_a_shared_override_invalid_for_one_strategy_fails_before_any_work(local_model_and_text):
    from subfit_core.errors import SubFitError

    folder = local_model_and_text
    with pytest.raises(SubFitError, match=r"strategy shortgpt: selector.rounds: unknown key"):
        compare(["strategies=[subfit,shortgpt]", "sparsities=[0.2]", f"model={folder / 'model'}",
                 "selector.rounds=2", f"output_dir={folder / 'never'}"])
    assert not (folder / "never").exists()


@pytest.mark.parametrize("args, message", [
    (["sparsities=[0.2]"], "strategies: give a list"),
    (["strategies=[subfit]", "sparsities=[1.5]"], "sparsities: [1.5]; give a list of numbers in (0, 1)"),
    (["strategies=[subfitt]", "sparsities=[0.2]"], "did you mean 'subfit'"),
])
def test_compare_cli_errors_are_one_line(args, message, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "subfit-compare"
    done = subprocess.run([str(exe), *args, f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("subfit-compare: error:") and message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def tiny_args(folder) -> list[str]:
    return [f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=6",
            "calib.seq_len=16", "scoring.samples=2", "eval.windows=3", "eval.seq_len=16", "cache_stats=false"]


def test_every_shipped_strategy_runs_and_meets_its_budget(local_model_and_text):
    from pathlib import Path

    import subfit_strategies

    folder = local_model_and_text
    import yaml

    recipes = sorted(Path(subfit_strategies.__file__).parent.glob("*.yaml"))
    names = [p.stem for p in recipes if "runner" not in yaml.safe_load(p.read_text())]  # compressed models only
    assert {"replaceme", "replaceme-cosine", "llm-streamline", "laco", "blockpruner", "finercut"} <= set(names)
    summary = compare([f"strategies=[{','.join(names)}]", "sparsities=[0.34]",
                       f"output_dir={folder / 'all'}", *tiny_args(folder)])
    rows = {r["strategy"]: r for r in summary["rows"]}
    assert {n: rows[n]["status"] for n in names} == {n: "ok" for n in names}
    factored = {n for n in names if "factorizer" in (Path(subfit_strategies.__file__).parent / f"{n}.yaml").read_text()}
    assert factored == {"svd", "svd-llm", "aa-svd", "subfit-svd"}  # their budget is factorizer.kept_ratio
    for name, r in rows.items():
        assert r["ppl_ratio"] > 0 and (name in factored or r["achieved_layers"] >= 0.34 - 1e-9)


def test_every_shipped_strategy_makes_the_same_model_streamed(local_model_and_text):
    """offload=disk reads each module's weights when it runs: fitters that read or copy weights
    instead (ReplaceMe's fold, LLM-Streamline's start) get them through ``bench.loaded``."""
    from pathlib import Path

    import yaml

    import subfit_strategies

    folder = local_model_and_text
    names = [p.stem for p in sorted(Path(subfit_strategies.__file__).parent.glob("*.yaml"))
             if "runner" not in yaml.safe_load(p.read_text())]
    ratios = {}
    for mode in ("none", "disk"):
        summary = compare([f"strategies=[{','.join(names)}]", "sparsities=[0.25]", f"offload={mode}",
                           f"output_dir={folder / ('streamed-' + mode)}", *tiny_args(folder)])
        ratios[mode] = {r["strategy"]: (r["status"], r.get("ppl_ratio")) for r in summary["rows"]}
    assert {n: s for n, (s, _) in ratios["disk"].items()} == dict.fromkeys(names, "ok")
    for name in names:
        assert ratios["disk"][name][1] == pytest.approx(ratios["none"][name][1], rel=1e-5), name


@pytest.mark.parametrize("strategy", ["replaceme", "llm-streamline", "laco", "linear-patch"])
def test_window_strategies_save_and_load_with_identical_logits(local_model_and_text, tmp_path, strategy):
    """ReplaceMe and LaCo edit kept layers, LLM-Streamline adds a trained FFN, LinearPatch a patch on
    the stream: all survive save/load."""
    import torch

    from subfit_core import load_compressed
    from subfit_core.apps.cli import resolve_recipe
    from subfit_core.artifact.folder import save_compressed
    from subfit_core.engine.pipeline import compress, open_session
    from subfit_core.engine.surgery import records

    folder = local_model_and_text
    extra = ["fitter.epochs=1"] if strategy == "llm-streamline" else []
    cfg = resolve_recipe([f"strategy={strategy}", "sparsity=0.34", *extra, *tiny_args(folder)])
    session = open_session(cfg)
    outcome = compress(session, cfg)
    assert outcome.results["edited"] == {"replaceme": [f"L{outcome.plan.subs[0].layer - 1}.ffn"],
                                         "llm-streamline": [], "laco": outcome.results["edited"],
                                         "linear-patch": []}[strategy]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = session.model(input_ids=ids).logits
    save_compressed(session.model, session.tokenizer, records(outcome.bypasses), tmp_path / "out", cfg,
                    outcome.results)
    loaded, _ = load_compressed(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)


def test_an_interrupted_comparison_resumes_where_it_stopped(local_model_and_text, monkeypatch):
    from subfit_core.apps import compare as compare_module

    folder, calls = local_model_and_text, []
    real = compare_module.compress

    def interrupted_on_third(session, cfg):
        calls.append((cfg["name"], cfg["sparsity"]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(session, cfg)

    args = ["strategies=[shortgpt,uidl]", "sparsities=[0.17,0.34]", f"output_dir={folder / 'resumed'}",
            *tiny_args(folder)]
    monkeypatch.setattr(compare_module, "compress", interrupted_on_third)
    with pytest.raises(KeyboardInterrupt):
        compare(args)
    journal = folder / ".resumed.journal.jsonl"
    assert len(journal.read_text().splitlines()) == 3  # header + two finished runs
    assert not (folder / "resumed").exists()  # nothing half-written
    calls.clear()
    monkeypatch.setattr(compare_module, "compress", lambda s, c: (calls.append((c["name"], c["sparsity"])), real(s, c))[1])
    summary = compare(args)
    assert calls == [("uidl", 0.17), ("uidl", 0.34)]  # the shortgpt runs were not repeated
    assert [(r["strategy"], r["sparsity"], r["status"]) for r in summary["rows"]] == [
        ("shortgpt", 0.17, "ok"), ("shortgpt", 0.34, "ok"), ("uidl", 0.17, "ok"), ("uidl", 0.34, "ok")]
    assert not journal.exists() and (folder / "resumed" / "table.md").exists()


def test_an_interrupted_comparison_is_not_resumed_on_a_changed_model(local_model_and_text, monkeypatch):
    """The journal's rows were measured on the model's files as they were: replaced at the same path,
    the comparison starts again rather than report old rows beside new ones."""
    import os

    from subfit_core.apps import compare as compare_module

    folder, calls = local_model_and_text, []
    real = compare_module.compress

    def interrupted_on_second(session, cfg):
        calls.append(cfg["name"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(session, cfg)

    args = ["strategies=[shortgpt]", "sparsities=[0.17,0.34]", f"output_dir={folder / 'changed'}", *tiny_args(folder)]
    monkeypatch.setattr(compare_module, "compress", interrupted_on_second)
    with pytest.raises(KeyboardInterrupt):
        compare(args)
    weights = next((folder / "model").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten in place
    calls.clear()
    monkeypatch.setattr(compare_module, "compress", lambda s, c: (calls.append(c["name"]), real(s, c))[1])
    compare(args)
    assert calls == ["shortgpt", "shortgpt"]  # both measured again, none served from the journal


def test_table_shows_retained_accuracy_only_when_tasks_ran():
    from subfit_core.apps.compare import markdown

    row = {"strategy": "subfit", "sparsity": 0.25, "status": "ok", "ppl_ratio": 1.47, "achieved_layers": 0.2568,
           "achieved_params": 0.2568, "attn_removed": 6, "ffn_removed": 9, "kv_saving": 0.2,
           "compression_s": 61.7, "compression_over_dense_forward": 3.5, "retained_accuracy": None, "ttft_speedup": None}
    failed = {"strategy": "broken", "sparsity": 0.25, "status": "failed", "error": "ConfigError: x"}
    plain = markdown([row, failed], "meta").splitlines()
    assert "retained accuracy" not in plain[0] and plain[2].count("|") == plain[0].count("|") == 9
    with_tasks = markdown([{**row, "retained_accuracy": 0.784}, failed], "meta").splitlines()
    assert "| KV-cache saving | retained accuracy | compression (x dense forward) |" in with_tasks[0]
    assert "| 20.0% | 0.784 | 62 s (3.50x) |" in with_tasks[2]  # seconds: each ratio has its own protocol's forward
    assert with_tasks[3].count("|") == with_tasks[0].count("|") == 10  # the failed row keeps the shape


def write_comparison(folder, model, rows):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"meta": "m", "model": model, "rows": rows}))
    return folder


def comparison_row(strategy, sparsity, ppl, ood, accuracy, achieved):
    return {"strategy": strategy, "sparsity": sparsity, "status": "ok", "ppl_ratio": ppl, "ood_ppl_ratio": ood,
            "retained_accuracy": accuracy, "achieved_layers": achieved, "achieved_params": achieved, "kv_saving": 0.1}


def test_combine_takes_the_geometric_mean_over_models_and_names_what_is_missing(tmp_path):
    from subfit_core.apps.combine import combine

    a = write_comparison(tmp_path / "a", "model-a", [
        comparison_row("subfit", 0.25, 2.0, 3.0, 0.8, 0.25), comparison_row("shortgpt", 0.25, 4.0, 5.0, 0.7, 0.27),
        comparison_row("laco", 0.25, 9.0, 9.0, 0.5, 0.25)])
    b = write_comparison(tmp_path / "b", "model-b", [
        comparison_row("subfit", 0.25, 8.0, 12.0, 0.9, 0.27), comparison_row("shortgpt", 0.25, 1.0, 20.0, 0.9, 0.23),
        {"strategy": "laco", "sparsity": 0.25, "status": "failed", "error": "x"}])
    out = tmp_path / "both"
    merged = combine([f"combine=[{a},{b}]", f"output_dir={out}"])
    rows = {r["strategy"]: r for r in merged["rows"]}
    assert rows["subfit"]["ppl_ratio"] == pytest.approx(4.0)  # sqrt(2 * 8)
    assert rows["subfit"]["ood_ppl_ratio"] == pytest.approx(6.0)  # sqrt(3 * 12)
    assert rows["subfit"]["retained_accuracy"] == pytest.approx(math.sqrt(0.8 * 0.9))
    assert rows["subfit"]["achieved_layers"] == pytest.approx(0.26)
    assert rows["shortgpt"]["ppl_ratio"] == pytest.approx(2.0) and rows["shortgpt"]["ood_ppl_ratio"] == pytest.approx(10.0)
    assert rows["laco"]["status"] == "missing" and rows["laco"]["missing"] == ["model-b"]
    table = (out / "table.md").read_text()
    assert "| strategy | sparsity | model-a ppl ratio | model-b ppl ratio | ppl ratio (geo-mean) |" in table
    assert "| subfit | 0.250 | 2.00x | 8.00x | 4.00x | 6.00x | 0.849 | 0.2600 |" in table
    assert "| laco | 0.250 | not finished on model-b |" in table
    for name in ("ppl_vs_sparsity.png", "tradeoff.png", "ood_tradeoff.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["combine=[a]"], "combine: ['a']; give two or more subfit-compare output folders"),
    (["combine=[a,missing]"], "combine: 'missing' has no results.json"),
    (["combine=[a,a]"], "the folders hold the same model more than once (model-a, model-a)"),
    (["combine=[a,b]", "sparsities=[0.2]"],
     "sparsities: not a key of subfit-compare combine=[...]; allowed: combine, output_dir, overwrite"),
])
def test_combine_errors_are_one_line(args, message, tmp_path, monkeypatch, capsys):
    from subfit_core.apps.compare import compare_main

    write_comparison(tmp_path / "a", "model-a", [comparison_row("subfit", 0.25, 2.0, 3.0, 0.8, 0.25)])
    write_comparison(tmp_path / "b", "model-b", [comparison_row("subfit", 0.25, 2.0, 3.0, 0.8, 0.25)])
    monkeypatch.chdir(tmp_path)
    assert compare_main([*args, "output_dir=out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("subfit-compare: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_tradeoff_plots_need_accuracy(tmp_path):
    from subfit_core.apps.compare import plot_tradeoff

    rows = [comparison_row("subfit", s, 1 + 4 * s, 1 + 6 * s, 1 - s, s) for s in (0.125, 0.25)]
    plot_tradeoff([{**r, "retained_accuracy": None} for r in rows], tmp_path)
    assert not list(tmp_path.iterdir())
    plot_tradeoff(rows, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tradeoff.png", "ood_tradeoff.png"}


def test_a_dense_reference_serves_only_sessions_that_would_measure_the_same_numbers():
    from subfit_core.config import validate
    from subfit_core.engine.pipeline import Reference

    cfg = validate({"calib": {"dataset": "kjv"}})
    ref = Reference(cfg, 20.0, {}, {}, None, None)
    assert ref.serves(validate({"calib": {"dataset": "kjv", "samples": 1024}, "scoring": {"samples": 40}}))
    assert not ref.serves(validate({"calib": {"dataset": "kjv"}, "eval": {"windows": 31}}))  # other held-out text
    assert not ref.serves(validate({"calib": {"dataset": "shakespeare"}}))  # another main domain
    assert not ref.serves(validate({"calib": {"dataset": "kjv"}, "dtype": "bfloat16"}))
