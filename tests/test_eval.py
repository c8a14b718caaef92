"""Downstream evaluation: lm-eval runs the shipped offline tasks on a tiny model in memory, the
numbers reach results.json, dense scores are computed once per Session, and a bad task name is a
one-line error listing the available ones, raised before the model loads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from subfit_core.apps.cli import run_main
from subfit_core.config import validate
from subfit_core.errors import ConfigError
from subfit_core.evaluation import tasks as lm_tasks
from subfit_core.plugins import get_plugins

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = ("subfit_heldout_ppl", "subfit_kjv_cloze", "subfit_shakespeare_nextline")


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <|endoftext|>): any text, ids < 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def byte_model_dir(tmp_path_factory):
    from conftest import build_tiny_model

    folder = tmp_path_factory.mktemp("bytes") / "model"
    tok = byte_tokenizer()
    model = build_tiny_model("llama", seed=2, vocab_size=len(tok), max_position_embeddings=512, num_hidden_layers=4)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_shipped_tasks_are_registered_with_absolute_data_files():
    tasks = lm_tasks.local_tasks(get_plugins())
    assert set(SHIPPED) <= set(tasks)
    for name in SHIPPED:
        path = tasks[name]["dataset_kwargs"]["data_files"]["test"]
        assert path.endswith(f"{name}.jsonl") and Path(path).is_file()


def test_shipped_task_data_is_what_the_script_builds():
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("build_eval_tasks", root / "scripts" / "build_eval_tasks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    files = script.build(script.SEED)
    for name, text in files.items():
        assert (root / "plugins" / "eval_tasks" / name).read_text() == text, name
    items = [json.loads(l) for l in files["subfit_kjv_cloze.jsonl"].splitlines()]
    assert len(items) == 500 and all(len(i["choices"]) == 4 and 0 <= i["label"] < 4 for i in items)
    assert len({i["label"] for i in items}) == 4  # the answer position is shuffled


def test_bad_task_name_is_one_line_error_listing_the_available_ones(monkeypatch):
    monkeypatch.setattr(lm_tasks, "_lm_eval_index", lambda: {"arc_easy", "lambada_openai"})  # no slow indexing
    with pytest.raises(ConfigError) as err:
        lm_tasks.check_tasks(["subfit_kjv_cloz"], get_plugins())
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("eval.tasks: unknown task 'subfit_kjv_cloz'")
    assert all(n in msg for n in SHIPPED + ("hellaswag", "arc_easy")) and "did you mean 'subfit_kjv_cloze'" in msg
    lm_tasks.check_tasks(["lambada_openai", "piqa", "subfit_kjv_cloze"], get_plugins())  # known to lm-eval: fine


def test_bad_task_name_fails_before_the_model_loads(monkeypatch, capsys, tmp_path):
    import subfit_core.engine.pipeline as pipeline

    monkeypatch.setattr(lm_tasks, "_lm_eval_index", lambda: set())
    monkeypatch.setattr(pipeline, "open_session", lambda cfg: pytest.fail("the model was loaded"))
    code = run_main(["eval.tasks=[subfit_kjv_cloze,hellaswagg]", f"output_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown task 'hellaswagg'" in err and "did you mean 'hellaswag'" in err


def test_eval_keys_are_validated():
    with pytest.raises(ConfigError, match=r"eval.tasks: 3 is not a str"):
        validate({"eval": {"tasks": ["piqa", 3]}})
    with pytest.raises(ConfigError, match=r"speed.batch_sizes: \[1, 0\]; every entry must be at least 1"):
        validate({"speed": {"batch_sizes": [1, 0]}})
    cfg = validate({"eval": {"tasks": ["piqa"], "limit": 5, "speed": True}})
    assert cfg["eval"]["tasks"] == ["piqa"] and cfg["speed"]["new_tokens"] == 32


def test_lm_eval_on_shipped_tasks_reaches_results_json(byte_model_dir, tmp_path, monkeypatch, capfd):
    from subfit_core.engine import pipeline

    calls = []
    original = lm_tasks.run_tasks
    monkeypatch.setattr(pipeline, "run_tasks", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    words = "and the lord said unto moses let my people go that they may serve me".split()
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) + f" {i}" for i in range(400)))
    out = tmp_path / "run"
    code = run_main([f"model={byte_model_dir}", f"calib.dataset={text}", "calib.samples=4", "calib.seq_len=32",
                     "scoring.samples=2", "eval.windows=2", "eval.seq_len=32", "sparsity=0.3", "cache_stats=false",
                     "eval.tasks=[subfit_kjv_cloze,subfit_heldout_ppl]", "eval.limit=6", "eval.speed=true",
                     "speed.prompt_lengths=[8]", "speed.batch_sizes=[2]", "speed.new_tokens=3", "speed.repeats=1",
                     f"output_dir={out}"])
    assert code == 0
    err = capfd.readouterr().err
    assert "%|" not in err and "it/s]" not in err, err  # SUBFIT_PROGRESS=0: no bars, lm-eval's or transformers'
    assert len(calls) == 2  # dense once, compressed once
    res = json.loads((out / "results.json").read_text())
    ds = res["downstream"]
    cloze, ppl = ds["tasks"]["subfit_kjv_cloze"], ds["tasks"]["subfit_heldout_ppl"]
    assert cloze["metric"] == "acc" and cloze["dense"]["items"] == cloze["compressed"]["items"] == 6
    assert 0 <= cloze["compressed"]["acc"] <= 1 and "acc_norm" in cloze["dense"]
    assert ppl["metric"] == "word_perplexity" and ppl["dense"]["word_perplexity"] > 1
    assert ppl["degradation"] == pytest.approx(ppl["compressed"]["word_perplexity"] / ppl["dense"]["word_perplexity"])
    assert ds["perplexity_degradation"] == pytest.approx(ppl["degradation"]) and ds["limit"] == 6
    dep = res["deployment"]
    assert set(dep["models"]) == {"dense", "compressed"} and dep["ratios"]["weights"] < 1
    kept = res["kv_cache_bytes_per_token"]["after"] / res["kv_cache_bytes_per_token"]["before"]
    assert dep["ratios"]["kv_cache"] == pytest.approx(kept)  # measured cache agrees with the config formula


def test_dense_scores_are_computed_once_per_session(monkeypatch):
    from types import SimpleNamespace

    from subfit_core.engine import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_tasks", lambda *a, **k: calls.append(1) or {"t": {"acc": 0.5}})
    session = SimpleNamespace(dense_tasks=None, dense_speed=None, model=None, tokenizer=None, batch_sizes={"eval": 8},
                              device="cpu")
    cfg = validate({"eval": {"tasks": ["piqa"]}})
    pipeline.evaluate_dense(session, cfg)
    pipeline.evaluate_dense(session, cfg)
    assert calls == [1] and session.dense_tasks == {"t": {"acc": 0.5}}


def test_compare_tasks_metrics():
    dense = {"a": {"acc": 0.5}, "b": {"acc": 0.8}, "p": {"word_perplexity": 10.0}, "q": {"word_perplexity": 20.0}}
    comp = {"a": {"acc": 0.4}, "b": {"acc": 0.8}, "p": {"word_perplexity": 20.0}, "q": {"word_perplexity": 160.0}}
    out = lm_tasks.compare_tasks(dense, comp)
    assert out["retained_accuracy"] == pytest.approx((0.8 + 1.0) / 2)
    assert out["perplexity_degradation"] == pytest.approx(4.0)  # geometric mean of 2x and 8x


def test_the_dense_forward_timing_runs_the_batches_asked_and_scales_to_all_windows(monkeypatch):
    """Compression cost is reported against one dense forward over the calibration set; timing a
    few batches and scaling must give what timing every batch gives when each costs the same."""
    import torch

    from subfit_core.evaluation import perplexity as module

    clock = [0.0]
    calls = []

    def model(input_ids, use_cache):
        calls.append(input_ids.shape[0])
        clock[0] += 1.0  # one second per batch

    monkeypatch.setattr(module.time, "perf_counter", lambda: clock[0])
    windows = torch.zeros(20, 4, dtype=torch.long)
    assert module.forward_seconds(model, windows, 2, torch.device("cpu")) == 10.0 and len(calls) == 10
    calls.clear()
    assert module.forward_seconds(model, windows, 2, torch.device("cpu"), batches=3) == 10.0 and calls == [2, 2, 2]
    calls.clear()
    assert module.forward_seconds(model, windows, 8, torch.device("cpu"), batches=8) == 3.0 and calls == [8, 8, 4]


def test_lm_eval_scores_a_streamed_model_as_it_does_the_loaded_one(byte_model_dir, tmp_path):
    """lm-eval puts its inputs on the model's device, taken from its first weight: meta for streamed
    weights. The run hands it the compute device, and the scores match the in-memory run's."""
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    words = "and the lord said unto moses let my people go that they may serve me".split()
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) + f" {i}" for i in range(400)))
    scores = {}
    for mode in ("none", "disk"):
        out = tmp_path / mode
        assert run_main([f"model={byte_model_dir}", f"calib.dataset={text}", "calib.samples=4", "calib.seq_len=32",
                         "scoring.samples=2", "eval.windows=2", "eval.seq_len=32", "sparsity=0.3", "cache_stats=false",
                         "eval.tasks=[subfit_kjv_cloze]", "eval.limit=4", "eval.domains=[]", f"offload={mode}",
                         f"output_dir={out}"]) == 0
        scores[mode] = json.loads((out / "results.json").read_text())["downstream"]["tasks"]["subfit_kjv_cloze"]
    assert scores["disk"]["dense"]["items"] == 4
    assert scores["disk"]["dense"]["acc"] == scores["none"]["dense"]["acc"]
    assert scores["disk"]["compressed"]["acc"] == scores["none"]["compressed"]["acc"]
