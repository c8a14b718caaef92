"""Engine services: adapter discovery, the statistics cache (resume), anchored refitting."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from subfit_core.engine.corpus import Windows  # noqa: E402
from subfit_core.engine.dense_statistics import DenseStatistics  # noqa: E402
from subfit_core.engine.interfaces import Submodule  # noqa: E402
from subfit_core.engine.models import find_adapter  # noqa: E402
from subfit_core.engine.workbench import Workbench  # noqa: E402
from subfit_core.errors import SubFitError  # noqa: E402
from subfit_core.plugins import get_plugins  # noqa: E402
from subfit_plugins.adapters.llama import LlamaFamilyAdapter  # noqa: E402
from subfit_plugins.fitters.linear import LinearFitter, LinearParams  # noqa: E402


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def windows(seed: int = 0) -> Windows:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 128, (n, 24), generator=g)  # noqa: E731
    return Windows(calib=ids(6), scoring=ids(2), heldout=ids(2), source="random tokens")


def bench_for(model, cache=None) -> Workbench:
    bench = Workbench(model, LlamaFamilyAdapter(model), windows(), batch_size=4, device=torch.device("cpu"))
    bench.collect(cache)
    return bench


def test_unsupported_architecture_names_the_supported_ones():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(SubFitError) as err:
        find_adapter(get_plugins(), model)
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg
    assert "adapter plugin" in msg and "\n" not in msg


def test_statistics_cache_resumes_without_a_calibration_pass(tmp_path, monkeypatch):
    model = tiny_llama()
    path = tmp_path / "stats.safetensors"
    first = bench_for(model, path)
    assert path.exists()

    def no_pass(self, ids):
        raise AssertionError("calibration pass ran although cached statistics exist")

    monkeypatch.setattr(DenseStatistics, "accumulate", no_pass)
    second = bench_for(model, path)
    for sub in first.subs:
        assert torch.equal(first.stats[sub].gram, second.stats[sub].gram)
        assert torch.equal(first.stats[sub].cross, second.stats[sub].cross)
        assert first.stats[sub].tokens == second.stats[sub].tokens
        assert set(first.stats[sub].extra) == set(first.statistics) == {"rotation", "magnitude", "layer-cosine"}
        assert all(torch.equal(first.stats[sub].extra[n], second.stats[sub].extra[n]) for n in first.statistics)
    assert second.metric("kl") == pytest.approx(0.0, abs=1e-6)  # scoring states rebuilt from the dense model


def test_anchored_refit_of_the_first_replacement_equals_the_dense_fit():
    # Nothing is replaced before the first selected submodule, so its compressed-model inputs are the
    # dense inputs and the anchored fit must equal the ordinary fit; later ones see the drift.
    model = tiny_llama()
    bench = bench_for(model)
    fitter = LinearFitter(LinearParams(ridge=1e-4))
    first, later = Submodule(0, "ffn"), Submodule(2, "attn")
    fits = bench.refit_anchored(fitter, [first, later])
    dense_first, dense_later = fitter.fit(first, bench.stats[first]), fitter.fit(later, bench.stats[later])
    torch.testing.assert_close(fits[first].weight, dense_first.weight, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fits[later].weight, dense_later.weight, atol=1e-4)
    assert set(bench.replaced) == {first, later}  # the model is left compressed with the anchored fits
    bench.restore()
    assert bench.metric("kl") == pytest.approx(0.0, abs=1e-6)


@torch.inference_mode()
def stream_error(bench: Workbench, layer: int) -> float:
    """Squared distance, over the calibration windows, of the (compressed) model's stream after ``layer``
    from the dense model's; both read where no norm is applied yet."""
    ids = bench.windows.calib
    compressed = bench.model(ids, output_hidden_states=True).hidden_states[layer + 1]
    replaced = dict(bench.replaced)
    bench.restore()
    dense = bench.model(ids, output_hidden_states=True).hidden_states[layer + 1]
    bench.apply(replaced)
    return float((compressed - dense).double().square().sum())


def test_full_drift_correction_restores_the_dense_stream_best():
    # With drift_correction 1 the later bypass is the least-squares map from its compressed input to
    # the dense stream minus the compressed one: on the calibration windows no other share of the
    # drift leaves the stream after it closer to the dense stream.
    model = tiny_llama()
    bench = bench_for(model)
    fitter = LinearFitter(LinearParams(ridge=1e-6))
    first, later = Submodule(0, "attn"), Submodule(1, "ffn")
    errors = {}
    for share in (0.0, 0.5, 1.0):
        bench.drift_correction = share
        bench.refit_anchored(fitter, [first, later])
        errors[share] = stream_error(bench, later.layer)
    assert errors[1.0] < errors[0.5] < errors[0.0]
    assert errors[1.0] < 0.9 * errors[0.0]


def test_reanchor_fits_a_candidate_as_the_final_anchored_refit_would(tmp_path):
    # Mid-selection, a candidate is judged with the bypass an anchored run would give it: fitted on
    # the inputs the chosen (anchored) bypasses upstream leave it, with the same drift share. And the
    # scoring boundaries behind the refitted choice are those of a fresh commit of it.
    model = tiny_llama()
    bench = bench_for(model)
    bench.drift_correction = 0.5
    fitter = LinearFitter(LinearParams(ridge=1e-4))
    chosen, candidate = Submodule(0, "attn"), Submodule(1, "ffn")
    bench.commit(chosen, bench.fit(fitter, chosen))  # as the selector leaves it: a fit to the dense model
    dense_fit = bench.fit(fitter, candidate)
    bench.reanchor(fitter, [chosen], [candidate])
    probe = bench.fit(fitter, candidate)
    assert set(bench.replaced) == {chosen}
    with torch.inference_mode():
        judged = bench.metric_with(candidate, probe, "kl")
    final = bench.refit_anchored(fitter, [chosen, candidate])
    torch.testing.assert_close(probe.state_dict(), final[candidate].state_dict())
    # the drifted inputs give another map than the fit to the dense model
    assert not torch.allclose(probe.weight, dense_fit.weight)
    bench.restore()
    bench.commit(chosen, final[chosen])
    bench.commit(candidate, final[candidate])
    assert bench.metric("kl") == pytest.approx(judged, rel=1e-5)


def test_anchored_refit_stops_at_the_deepest_replacement(monkeypatch):
    # The streams past the deepest bypass feed no fit: the pass must not run the layers behind it.
    model = tiny_llama()
    bench = bench_for(model)
    fitter = LinearFitter(LinearParams(ridge=1e-4))
    deepest = Submodule(1, "attn")
    assert max(bench.subs) > deepest
    visited = []
    real = type(bench.adapter).contribution
    monkeypatch.setattr(type(bench.adapter), "contribution",
                        lambda self, sub, *a, **k: (visited.append(sub), real(self, sub, *a, **k))[1])
    fits = bench.refit_anchored(fitter, [Submodule(0, "ffn"), deepest])
    assert max(visited) == deepest and set(fits) == {Submodule(0, "ffn"), deepest}
    assert set(bench.replaced) == set(fits)


# ----------------------------------------------------------------------------- batch sizes


def test_auto_batch_size_is_what_fits_in_a_share_of_free_memory(monkeypatch):
    from subfit_core.engine import batching

    model = tiny_llama()
    adapter = LlamaFamilyAdapter(model)
    cfg = model.config
    t, d, f, h, v = 16, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.vocab_size
    per = (7 * t * d + 3 * t * f) * 4 + (2 * h * t * t + 3 * t * d + 3 * t * v) * 4  # float32 weights
    assert batching.window_bytes(adapter, t, torch.float32) == per
    assert batching.window_bytes(adapter, t, torch.bfloat16) == per - (7 * t * d + 3 * t * f) * 2
    cpu = torch.device("cpu")
    for free, expected in ((per * 4 * 5 + 7, 5), (10, 1), (per * 4 * 1000, batching.MAX_AUTO)):
        monkeypatch.setattr(batching, "available_memory", lambda device, free=free: free)
        assert batching.resolve_batch_size("auto", adapter, t, torch.float32, cpu) == expected
    assert batching.resolve_batch_size(3, adapter, t, torch.float32, cpu) == 3  # a number is kept


def test_a_run_with_auto_batch_sizes_records_what_it_used(tmp_path, monkeypatch, capsys):
    import json

    from conftest import write_local_model_and_text

    from subfit_core.apps.cli import run_main
    from subfit_core.engine import batching

    folder = write_local_model_and_text(tmp_path, seed=2, lines=300, layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    per = batching.window_bytes(LlamaFamilyAdapter(model), 16, torch.float32)  # calib and eval: 16 tokens
    monkeypatch.setattr(batching, "available_memory", lambda device: 12 * per)
    args = [f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=6", "calib.seq_len=16",
            "calib.generated=0", "scoring.samples=2", "eval.windows=3", "eval.seq_len=16", "eval.domains=[]",
            "cache_stats=false", "sparsity=0.25", "strategy=shortgpt", "calib.batch_size=auto", "eval.batch_size=auto",
            f"output_dir={tmp_path / 'out'}"]
    assert run_main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["batch_sizes"] == {"calib": 3, "eval": 3}  # a quarter of 12 windows' worth of free memory
    capsys.readouterr()
    assert run_main([*args[:-1], "eval.batch_size=lots", f"output_dir={tmp_path / 'bad'}"]) == 2
    assert "eval.batch_size: 'lots' is not an int; allowed: a number or auto" in capsys.readouterr().err
