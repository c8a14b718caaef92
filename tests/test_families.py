"""Every supported family on tiny random configs: the adapter runs the model piecewise exactly,
counts its parameters, keeps each kept attention's KV-cache type (Gemma's interleaved sliding
windows), folds maps where the family allows and says why where it does not, and
``subfit-run model=<folder>`` compresses, saves, reloads and generates."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY_ARCHS, build_tiny_model, piecewise_logits, write_local_model_and_text
from transformers import AutoModelForCausalLM

from subfit_core import load_compressed
from subfit_core.apps.cli import run_main
from subfit_core.engine.bypass import ZeroBypass
from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.models import find_adapter
from subfit_core.engine.surgery import apply_bypasses
from subfit_core.errors import SubFitError
from subfit_core.plugins import get_plugins

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))  # longer than Gemma's window of 4


def adapter_of(model):
    return find_adapter(get_plugins(), model)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_piecewise_run_is_the_model_forward(arch):
    model = build_tiny_model(arch, seed=3)
    adapter = adapter_of(model)
    with torch.no_grad():
        assert torch.allclose(piecewise_logits(adapter, IDS), model(input_ids=IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_submodules_with_their_norms_make_up_each_layer(arch):
    model = build_tiny_model(arch)
    adapter = adapter_of(model)
    for layer, block in enumerate(model.model.layers):
        halves = [adapter.param_count(Submodule(layer, kind)) for kind in ("attn", "ffn")]
        assert sum(halves) == adapter.layer_param_count(layer) == numel(block)
    pre = [adapter.input_params(s) for s in adapter.submodules()]
    assert pre == ([0] * 8 if arch == "olmo2" else [32] * 8)  # OLMo 2 has no pre-norms
    active = [adapter.active_param_count(s) for s in adapter.submodules()]
    full = [adapter.param_count(s) for s in adapter.submodules()]
    if arch in ("mixtral", "qwen3_moe"):  # a token runs 2 of 4 experts
        experts = numel(model.model.layers[0].mlp.experts)
        assert active[1] == full[1] - experts // 2 and active[0] == full[0]
    else:
        assert active == full


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_kept_attentions_keep_their_cache_type(arch):
    """Layers F S S F: with attentions 0 (full) and 1 (sliding) removed, layer 3 takes full slot 0 and
    layer 2 sliding slot 1, so the cache's length and masks come from real attentions."""
    model = build_tiny_model(arch, seed=2)
    apply_bypasses(adapter_of(model), {Submodule(0, "attn"): ZeroBypass(), Submodule(1, "attn"): ZeroBypass()})
    assert [model.model.layers[i].self_attn.layer_idx for i in (2, 3)] == [1, 0]
    prompt = torch.tensor([[5, 17, 42, 9, 77, 3]])
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    seq = prompt
    for _ in range(8):  # the same tokens from full forwards, no cache
        seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_removing_every_attention_of_layer_0s_type_is_refused():
    model = build_tiny_model("gemma3")
    with pytest.raises(SubFitError, match="every full_attention attention is removed"):
        apply_bypasses(adapter_of(model), {Submodule(0, "attn"): ZeroBypass(), Submodule(3, "attn"): ZeroBypass()})


@pytest.mark.parametrize("arch", ["llama", "phi3", "mixtral", "qwen3_moe"])
def test_a_map_folded_into_an_ffn_multiplies_its_output(arch):
    model = build_tiny_model(arch, seed=4)
    adapter, sub = adapter_of(model), Submodule(1, "ffn")
    t = torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 32)
    ffn = adapter.originals[sub]
    with torch.no_grad():
        assert torch.allclose(adapter.fold_output(sub, ffn, t)(x), ffn(x) @ t.float(), atol=1e-5)


@pytest.mark.parametrize("arch", ["gemma3", "olmo2"])
def test_folding_past_a_post_norm_is_refused_with_the_reason(arch):
    model = build_tiny_model(arch)
    adapter, sub = adapter_of(model), Submodule(1, "ffn")
    with pytest.raises(SubFitError, match="post_feedforward_layernorm.*cannot be folded"):
        adapter.fold_output(sub, adapter.originals[sub], torch.eye(32, dtype=torch.float64))


def test_moe_ffn_width_is_what_a_token_runs():
    assert adapter_of(build_tiny_model("mixtral")).ffn_width(0) == 2 * 64  # top-2 experts of width 64
    assert adapter_of(build_tiny_model("qwen3_moe")).ffn_width(0) == 2 * 16
    assert adapter_of(build_tiny_model("phi3")).ffn_width(0) == 64


TINY_RUN = ["strategy=subfit", "sparsity=0.25", "calib.samples=6", "calib.seq_len=24", "scoring.samples=2",
            "eval.windows=2", "eval.seq_len=24", "selector.rounds=1", "cache_stats=false", "calib.generated=0"]


# qwen2: transformers loads any tokenizer in a Qwen2 folder as Qwen2Tokenizer, which does not keep
# this test's word-level vocabulary (a real Qwen2 tokenizer loads fine); its adapter is Llama's
@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a != "qwen2"])
def test_subfit_run_compresses_saves_reloads_and_generates(arch, tmp_path, capsys):
    folder = write_local_model_and_text(tmp_path, seed=1, lines=300, layers=4, arch=arch)
    out = tmp_path / "out"
    assert run_main([*TINY_RUN, f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}",
                     f"output_dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["architecture"] == type(build_tiny_model(arch)).__name__
    assert results["sparsity"]["achieved_layers"] >= 0.25 - 1e-9
    active = results["active_params_per_token"]
    assert active["after"] < active["before"] <= results["decoder_params"]["before"]
    ours, _ = load_compressed(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = torch.tensor([[5, 17, 42, 9, 77, 3]])
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=0)
    common = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **common), theirs.generate(prompt, **common))


@pytest.mark.parametrize("arch", ["phi3", "gemma3", "olmo2", "mixtral"])
def test_every_shipped_strategy_runs_or_says_why_not(arch, tmp_path):
    """Every baseline on every family: ReplaceMe folds its map into an FFN's output projection, which
    a post-norm family (Gemma, OLMo 2) does not allow; it must say so, and every other strategy runs."""
    from pathlib import Path

    import subfit_strategies
    from subfit_core.apps.compare import compare

    folder = write_local_model_and_text(tmp_path, seed=1, lines=400, layers=6, arch=arch)
    recipes = sorted(Path(subfit_strategies.__file__).parent.glob("*.yaml"))
    names = [p.stem for p in recipes if "runner" not in yaml.safe_load(p.read_text())]  # compressed models only
    summary = compare([f"strategies=[{','.join(names)}]", "sparsities=[0.34]", f"output_dir={tmp_path / 'all'}",
                       f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=6",
                       "calib.seq_len=16", "scoring.samples=2", "eval.windows=3", "eval.seq_len=16", "cache_stats=false"])
    rows = {r["strategy"]: r for r in summary["rows"]}
    refused = {"replaceme", "replaceme-cosine"} if arch in ("gemma3", "olmo2") else set()
    assert {n for n in names if rows[n]["status"] != "ok"} == refused
    for name in refused:
        assert "post_feedforward_layernorm" in rows[name]["error"] and "cannot be folded" in rows[name]["error"]
    for name in set(names) - refused:
        assert rows[name]["ppl_ratio"] > 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_streamed_model_of_every_family_computes_what_the_loaded_one_does(arch, tmp_path):
    """Built without weights (offload=disk), buffers that are not saved (Gemma's embedding scale,
    rotary frequencies per attention type) must come back right."""
    from subfit_core.engine.streaming import build_streamed

    model = build_tiny_model(arch, seed=5, tie_word_embeddings=True)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    # mixtral, qwen3_moe: experts saved one by one, stacked (and renamed) as transformers stacks them while loading
    streamed, stream = build_streamed(tmp_path, torch.float32, torch.device("cpu"), "disk")
    with torch.no_grad():
        assert torch.equal(streamed(IDS).logits, model(IDS).logits)
    assert stream.resident_bytes() == 0
