"""The Python API: compress a model already in memory with texts passed as a list or a Dataset,
get the model and its report back, save it, and load it in transformers."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import write_local_model_and_text  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from subfit_core import Report, compress, load_compressed, save  # noqa: E402
from subfit_core.errors import ConfigError  # noqa: E402

SMALL = dict(sparsity=0.25, calib={"samples": 8, "seq_len": 32, "generated": 0.0}, scoring={"samples": 2},
             eval={"windows": 4, "seq_len": 32, "domains": []}, cache_stats=False)


@pytest.fixture()
def local(tmp_path):
    folder = write_local_model_and_text(tmp_path, seed=3, lines=1200)
    model = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    return folder, model, tokenizer, (folder / "text.txt").read_text().splitlines()


def test_compress_in_memory_then_save_and_load_in_transformers(local, tmp_path):
    folder, model, tokenizer, texts = local
    compressed, report = compress(model, tokenizer, recipe="subfit", calibration=texts, **SMALL)
    assert compressed is model  # compressed in place, like llm-compressor's oneshot
    assert isinstance(report, Report) and report["sparsity"]["achieved_layers"] >= 0.25 - 1e-9
    assert report.recipe["calib"]["dataset"] == "calibration" and report.recipe["calib"]["samples"] == 8
    assert "perplexity dense -> compressed" in str(report)
    assert "1200 texts passed to compress()" in report["data"]["source"]
    out = save(compressed, report, tmp_path / "saved")
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = compressed(input_ids=ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)(input_ids=ids).logits
        ours = load_compressed(out)[0](input_ids=ids).logits
    assert torch.equal(ours, before)
    assert torch.allclose(theirs, before, atol=1e-5, rtol=0)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["output_dir"] == str(out) and recipe["sparsity"] == 0.25
    saved = yaml.safe_load((out / "config.json").read_text())["subfit"]["replacements"]
    assert [(r["layer"], r["kind"]) for r in saved] == [(r["layer"], r["type"]) for r in
                                                         sorted(report["replaced"], key=lambda r: (r["layer"], r["type"]))]
    with pytest.raises(Exception, match="already exists"):
        save(compressed, report, out)


def test_a_named_model_is_the_one_compressed_and_saves_from_streamed_weights(local, tmp_path):
    """``compress("folder")`` compresses that folder (not the recipe's model), and a model compressed with
    streamed weights saves (its weights are read back from the stream) with the in-memory run's logits."""
    folder, model, tokenizer, texts = local
    ids = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for offload in ("none", "disk"):
        compressed, report = compress(str(folder / "model"), recipe="subfit", calibration=texts, offload=offload, **SMALL)
        assert report.recipe["model"] == str(folder / "model") and report.recipe["offload"] == offload
        assert report["model"]["fit_device"] == "cpu"  # where the fits ran, auto resolved
        out = save(compressed, report, tmp_path / offload)
        with torch.no_grad():
            logits[offload] = load_compressed(out)[0](input_ids=ids).logits
    assert torch.allclose(logits["disk"], logits["none"], atol=1e-6)


def test_compress_takes_a_dataset_and_dotted_keys(local):
    from datasets import Dataset

    _, model, tokenizer, texts = local
    small = {k: v for k, v in SMALL.items() if k != "calib"}
    _, report = compress(model, tokenizer, calibration=Dataset.from_dict({"text": texts}),
                         **{"calib.samples": 8, "calib.seq_len": 32, "calib.generated": 0.0}, **small)
    assert report["data"]["calibration"] == "8 x 32 tokens"


def spread(model):
    """The model as accelerate's device_map leaves it when it splits the layers over devices."""
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": "cpu"}
    return model


@pytest.mark.parametrize("call, message", [
    (lambda m, t, x: compress(m, calibration=x, **SMALL), "tokenizer: compress() of a loaded model needs its tokenizer"),
    (lambda m, t, x: compress(m, t, calibration=x[:1], **SMALL), "calibration: give at least two non-empty texts"),
    (lambda m, t, x: compress(m, t, calibration=x, sparsty=0.2), "did you mean 'sparsity'"),
    (lambda m, t, x: compress(m, t, calibration=x, calib={"samples": 0}), "calib.samples"),
    (lambda m, t, x: compress(42), "model: expected a loaded causal LM or a name/path, got int"),
    (lambda m, t, x: compress(m, t, calibration=x, offload="disk", **SMALL),
     "offload: 'disk' streams a model's weights, and a model passed to compress() is already in memory; allowed"),
    (lambda m, t, x: compress(spread(m), t, calibration=x, **SMALL),
     "model: compress() of a loaded model needs it on one device; this one is spread by device_map over 0, 1, cpu"),
])
def test_bad_arguments_are_one_line_errors(local, call, message):
    _, model, tokenizer, texts = local
    with pytest.raises(ConfigError) as err:
        call(model, tokenizer, texts)
    assert message in str(err.value) and "\n" not in str(err.value)
