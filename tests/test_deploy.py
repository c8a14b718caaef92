"""Deployment benchmark: KV-cache bytes read from the cache object after generation drop by exactly
the share of removed attentions; timings, memory and ratios come out for every setting."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from subfit_core.engine.bypass import LowRankBypass, ZeroBypass
from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.surgery import apply_bypasses
from subfit_core.evaluation.speed import SpeedSettings, kv_cache_bytes, markdown, measure_speed, ratios
from subfit_plugins.adapters.llama import LlamaFamilyAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 6


def compressed_copy(tiny_model, removed_attn: list[int]):
    model = tiny_model("llama", seed=3, num_hidden_layers=LAYERS)
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    bypasses = {Submodule(l, "attn"): (ZeroBypass() if i % 2 else
                                      LowRankBypass(torch.randn(4, d, generator=g) * 0.1,
                                                    torch.randn(d, 4, generator=g) * 0.1, torch.zeros(d)))
                for i, l in enumerate(removed_attn)}
    bypasses[Submodule(1, "ffn")] = ZeroBypass()  # an FFN removal must not change the cache
    apply_bypasses(LlamaFamilyAdapter(model), bypasses)
    return model


@pytest.mark.parametrize("removed", [[0, 3], [1, 2, 5], [0]])
def test_kv_cache_after_generation_drops_by_removed_attention_share(tiny_model, removed):
    dense = tiny_model("llama", seed=3, num_hidden_layers=LAYERS)
    compressed = compressed_copy(tiny_model, removed)
    settings = SpeedSettings(prompt_lengths=[7], batch_sizes=[2], new_tokens=5, repeats=1)
    result = measure_speed({"dense": dense, "compressed": compressed}, settings, torch.device("cpu"))
    d, c = (result["models"][k]["rows"][0] for k in ("dense", "compressed"))
    # 2 (K and V) x batch x (prompt + new - 1) tokens x KV heads x head_dim x 4 bytes x attentions kept
    per_layer = 2 * 2 * (7 + 5 - 1) * 2 * 8 * 4
    assert d["kv_cache_bytes"] == per_layer * LAYERS
    assert c["kv_cache_bytes"] == per_layer * (LAYERS - len(removed))
    assert Fraction(c["kv_cache_bytes"], d["kv_cache_bytes"]) == 1 - Fraction(len(removed), LAYERS)  # exactly
    assert d["kv_cache_bytes_per_token"] == 2 * 2 * 8 * 4 * LAYERS  # agrees with the config formula
    r = ratios(result)
    assert r["kv_cache"] == pytest.approx(1 - len(removed) / LAYERS)
    assert r["weights"] < 1
    for row in (d, c):
        assert row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["peak_working_bytes"] >= 0


def test_benchmark_covers_every_setting_and_prints_a_table(tiny_model):
    dense = tiny_model("llama", seed=3, num_hidden_layers=LAYERS)
    compressed = compressed_copy(tiny_model, [2])
    settings = SpeedSettings(prompt_lengths=[4, 9], batch_sizes=[1, 3], new_tokens=3, repeats=1)
    result = measure_speed({"dense": dense, "compressed": compressed}, settings, torch.device("cpu"))
    rows = result["models"]["compressed"]["rows"]
    assert [(r["prompt_len"], r["batch"]) for r in rows] == [(4, 1), (4, 3), (9, 1), (9, 3)]
    assert result["device"].startswith("cpu") and result["timing"].startswith("time.perf_counter")
    text = markdown(result, ratios(result))
    assert text.count("\n| compressed |") == 4 and "TTFT speed-up" in text


def test_kv_cache_bytes_reads_tensors_of_initialised_layers_only():
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 8)
    cache.update(k, k.clone(), layer_idx=0)
    assert kv_cache_bytes(cache) == 2 * k.numel() * 4
