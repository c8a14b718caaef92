"""The compressed model is an ordinary causal LM: cached generation stays exact with any
attention removed (layer 0 included), removed attentions hold no KV cache, and save/load
reproduces the logits exactly."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import TINY_ARCHS, build_tiny_model  # noqa: E402

from subfit_core import load_compressed  # noqa: E402
from subfit_core.artifact import folder  # noqa: E402
from subfit_core.engine.bypass import LowRankBypass, ZeroBypass  # noqa: E402
from subfit_core.engine.interfaces import Submodule  # noqa: E402
from subfit_core.engine.models import find_adapter  # noqa: E402
from subfit_core.engine.surgery import apply_bypasses, records  # noqa: E402
from subfit_core.plugins import get_plugins  # noqa: E402
from subfit_plugins.fitters.shared_basis import SharedBasisBypass  # noqa: E402

CONFIGS = TINY_ARCHS  # every supported family
D, LAYERS = 32, 4


def make_model(arch: str, seed: int = 0):
    return build_tiny_model(arch, seed=seed, tie_word_embeddings=True)


def random_bypasses(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    shared = torch.nn.Parameter(torch.randn(8, D, generator=g) * 0.1, requires_grad=False)
    return {
        Submodule(0, "attn"): LowRankBypass(torch.randn(4, D, generator=g) * 0.1, torch.randn(D, 4, generator=g) * 0.1,
                                            torch.randn(D, generator=g) * 0.1),
        Submodule(2, "attn"): ZeroBypass(),
        Submodule(1, "ffn"): SharedBasisBypass(shared, torch.randn(D, 8, generator=g) * 0.1, None, "shared0"),
        Submodule(3, "ffn"): SharedBasisBypass(shared, torch.randn(D, 8, generator=g) * 0.1, None, "shared0"),
    }


def compress(arch: str):
    model = make_model(arch)
    bypasses = random_bypasses()
    apply_bypasses(find_adapter(get_plugins(), model), bypasses)
    return model, bypasses


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_cached_generation_matches_uncached_forward(arch):
    model, _ = compress(arch)
    prompt = torch.tensor([[5, 17, 42, 9, 77, 3]])
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    seq = prompt
    for _ in range(12):  # greedy decoding by full forwards, no cache at all
        nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_removed_attention_shrinks_kv_cache_exactly(arch):
    """The cache holds exactly the kept attentions' keys and values: each kept attention's slot has
    its own type (Gemma's sliding-window slots hold at most a window), removed ones hold nothing."""
    prompt = torch.tensor([[5, 17, 42, 9, 77, 3, 8, 1]])
    dense_cache = make_model(arch)(input_ids=prompt, use_cache=True).past_key_values
    per_layer = [cache_bytes(SimpleNamespace(layers=[layer])) for layer in dense_cache.layers]
    model, bypasses = compress(arch)
    cache = model(input_ids=prompt, use_cache=True).past_key_values
    removed = {s.layer for s in bypasses if s.kind == "attn"}
    assert min(per_layer) > 0
    assert cache_bytes(cache) == sum(b for layer, b in enumerate(per_layer) if layer not in removed)
    assert cache.get_seq_length() == prompt.shape[1]  # slot 0 is a real attention although layer 0's is gone


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def test_save_load_gives_identical_logits(tmp_path):
    model, bypasses = compress("llama")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = tmp_path / "compressed"
    folder.save_compressed(model, tiny_tokenizer(), records(bypasses), out, {"name": "test"}, {"ok": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed"]  # no temporary left behind
    saved = json.loads((out / "config.json").read_text())["subfit"]["replacements"]
    assert [(r["layer"], r["kind"], r["bypass"]["kind"]) for r in saved] == [
        (0, "attn", "lowrank"), (1, "ffn", "shared_basis"), (2, "attn", "zero"), (3, "ffn", "shared_basis")]
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any("layers.0.self_attn.q_proj" in k or "layers.1.mlp.up_proj" in k for k in keys)
    loaded, _ = load_compressed(out)
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    assert torch.equal(before, after)
    members = [loaded.model.layers[i].mlp for i in (1, 3)]
    assert members[0].basis_matrix() is members[1].basis_matrix()  # the shared basis is shared again after loading
    assert sum(k.endswith(".basis") for k in keys) == 1  # and stored once, under its first member
    assert "model.layers.1.mlp.basis" in keys


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model, bypasses = compress("llama")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(folder, "write_safetensors", broken)
    with pytest.raises(OSError):
        folder.save_compressed(model, tiny_tokenizer(), records(bypasses), tmp_path / "out", {}, {})
    assert list(tmp_path.iterdir()) == []
