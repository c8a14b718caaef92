"""ReplaceMe, LLM-Streamline and LaCo: planted answers, exact arithmetic, and their errors."""

from __future__ import annotations

import copy

import pytest
import torch

from subfit_core.engine.budget import Budget
from subfit_core.engine.bypass import ZeroBypass, build_bypasses
from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.workbench import Workbench
from subfit_core.errors import ConfigError
from subfit_plugins.adapters.llama import LlamaFamilyAdapter
from subfit_plugins.fitters.identity import IdentityFitter
from subfit_plugins.fitters.replaceme import (
    NormalEquations,
    ReplaceMeFitter,
    ReplaceMeParams,
    fit_cosine,
    solve_transform,
)
from subfit_plugins.fitters.streamline import GatedFFN, MLPBypass, StreamlineFitter, StreamlineParams, train_ffn
from subfit_plugins.fitters.windows import removed_windows
from subfit_plugins.scorers.output import OutputScorer
from subfit_plugins.selectors.laco import LaCoParams, LaCoSelector, merge_coefs, merged_module

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = 6
whole = lambda *layers: [Submodule(l, k) for l in layers for k in ("attn", "ffn")]


@pytest.fixture
def bench(tiny_model, random_windows):
    model = tiny_model("llama", seed=3, num_hidden_layers=LAYERS)
    bench = Workbench(model, LlamaFamilyAdapter(model), random_windows(calib=6, scoring=3, seq_len=16, seed=5),
                      batch_size=4, device=torch.device("cpu"))
    bench.collect()
    return bench


def logits(model, bench):
    with torch.no_grad():
        return model(input_ids=bench.windows.scoring).logits


# ---------------------------------------------------------------- ReplaceMe
def test_replaceme_least_squares_recovers_a_planted_map():
    gen = torch.Generator().manual_seed(0)
    d, t_true = 12, torch.randn(12, 12, generator=gen, dtype=torch.float64)
    normal = NormalEquations(d)
    for _ in range(3):  # streamed in batches, as over calibration windows
        x, h_i = torch.randn(200, d, generator=gen), torch.randn(200, d, generator=gen)
        normal.add(x, h_i, h_i - x + (x.double() @ t_true).float())  # h_{i+n} = (h_i - X) + X T
    t = solve_transform(*normal.result("test"), ridge=1e-10, name="test")
    assert torch.allclose(t, t_true, atol=1e-4)


def test_replaceme_cosine_fit_reaches_a_planted_map():
    gen = torch.Generator().manual_seed(1)
    x, attn = torch.randn(512, 8, generator=gen), torch.randn(512, 8, generator=gen)
    target = attn + x @ (torch.eye(8) + 0.3 * torch.randn(8, 8, generator=gen))
    cos_loss = lambda t: float((1 - torch.cosine_similarity(attn + x @ t.float(), target, dim=-1)).mean())
    t = fit_cosine(x, attn, target, ReplaceMeParams(loss="cosine", init="identity", epochs=150, lr=1e-2, batch_tokens=128), "t")
    assert cos_loss(torch.eye(8)) > 0.02 and cos_loss(t) < 1e-3


def test_replaceme_cosine_from_least_squares_improves_the_cosine_loss():
    gen = torch.Generator().manual_seed(4)
    x, attn = torch.randn(1024, 8, generator=gen), torch.randn(1024, 8, generator=gen)
    target = attn + x @ torch.randn(8, 8, generator=gen) + torch.randn(1024, 8, generator=gen) ** 3  # not linear
    normal = NormalEquations(8)
    normal.add(x, attn + x, target)
    t_ls = solve_transform(*normal.result("t"), ridge=1e-6, name="t")
    cos_loss = lambda t: float((1 - torch.cosine_similarity(attn + x @ t.float(), target, dim=-1)).mean())
    t = fit_cosine(x, attn, target, ReplaceMeParams(loss="cosine", epochs=20, lr=1e-3, batch_tokens=256), "t", t_ls)
    assert cos_loss(t) < cos_loss(t_ls)


def test_folding_into_down_proj_multiplies_the_mlp_output(bench):
    mlp = bench.originals[Submodule(2, "ffn")]
    t = torch.randn(mlp.down_proj.out_features, mlp.down_proj.out_features, dtype=torch.float64)
    x = torch.randn(3, 5, mlp.down_proj.out_features)
    with torch.no_grad():
        folded = bench.adapter.fold_output(Submodule(2, "ffn"), mlp, t)
        assert torch.allclose(folded(x), mlp(x) @ t.float(), atol=1e-5)


def test_replaceme_on_an_identity_window_keeps_the_model_exact(bench):
    """Layers that add nothing: Y = X, so T = I and the compressed model equals the dense one."""
    model = bench.model
    with torch.no_grad():
        for layer in (3, 4):
            model.model.layers[layer].self_attn.o_proj.weight.zero_()
            model.model.layers[layer].mlp.down_proj.weight.zero_()
    dense = logits(model, bench)
    fitted = ReplaceMeFitter(ReplaceMeParams(ridge=1e-9)).fit_selection(whole(3, 4), bench)
    assert list(fitted.edits) == [Submodule(2, "ffn")]
    bench.apply({**fitted.bypasses, **fitted.edits})
    assert torch.allclose(logits(model, bench), dense, atol=1e-4)
    assert model.model.layers[3].input_layernorm.__class__.__name__ == "Identity"  # removed, norm too
    bench.restore()
    assert bench.adapter.module(Submodule(2, "ffn")) is bench.originals[Submodule(2, "ffn")]


def test_replaceme_rejects_partial_layers_and_a_window_at_layer_zero(bench):
    fitter = ReplaceMeFitter()
    with pytest.raises(ConfigError, match="layer 3 is selected only in part; use selector contiguous"):
        fitter.fit_selection([Submodule(3, "attn"), *whole(4)], bench)
    with pytest.raises(ConfigError, match="starts at layer 0; use selector.keep_first: true"):
        fitter.fit_selection(whole(0, 1), bench)
    assert removed_windows(whole(1, 2, 4), "x") == [(1, 2), (4, 4)]


# ---------------------------------------------------------------- LLM-Streamline
def test_streamline_training_fits_a_planted_ffn():
    gen = torch.Generator().manual_seed(2)
    teacher = GatedFFN(*(torch.randn(*shape, generator=gen) / 3 for shape in ((16, 8), (16, 8), (8, 16))))
    x = torch.randn(2048, 8, generator=gen)
    with torch.no_grad():
        target = teacher(x)
    student = GatedFFN(*(w + 0.2 * torch.randn(w.shape, generator=gen) for w in (teacher.gate, teacher.up, teacher.down)))
    with torch.no_grad():
        start = float(torch.nn.functional.mse_loss(student(x), target))
    final = train_ffn(student, x, target, StreamlineParams(epochs=40, lr=1e-2, batch_tokens=256), "t")
    assert final < start / 20


def test_streamline_puts_one_trained_ffn_at_the_window_and_charges_it(bench):
    fitter = StreamlineFitter(StreamlineParams(epochs=2))
    fitter.attach(bench.adapter)
    d, hidden = bench.adapter.hidden_size, bench.model.config.intermediate_size
    assert fitter.charges(whole(2, 3), d) == {Submodule(2, "attn"): 3 * d * hidden, Submodule(2, "ffn"): 0,
                                              Submodule(3, "attn"): 0, Submodule(3, "ffn"): 0}
    fitted = fitter.fit_selection(whole(2, 3), bench)
    assert isinstance(fitted.bypasses[Submodule(2, "attn")], MLPBypass)
    assert all(isinstance(fitted.bypasses[s], ZeroBypass) for s in whole(2, 3)[1:])
    assert "L2-L3" in fitted.notes["streamline_final_mse"]
    rebuilt = build_bypasses([fitted.bypasses[Submodule(2, "attn")].spec()], torch.float32)[0]
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {
        n: p.shape for n, p in fitted.bypasses[Submodule(2, "attn")].named_parameters()}


# ---------------------------------------------------------------- LaCo
def test_laco_merge_equals_the_parameter_arithmetic(bench):
    originals = bench.originals
    merged = merged_module(originals, "ffn", 1, merge_coefs({1: 1.0}, [{2: 1.0}, {3: 1.0}]))
    w = lambda l: originals[Submodule(l, "ffn")].up_proj.weight
    assert torch.allclose(merged.up_proj.weight, w(1) + (w(2) - w(1)) + (w(3) - w(1)), atol=1e-6)
    # a merged layer merged again: theta_0 + (theta_1* - theta_0), theta_1* as above
    nested = merge_coefs({0: 1.0}, [merge_coefs({1: 1.0}, [{2: 1.0}, {3: 1.0}])])
    q = lambda l: originals[Submodule(l, "attn")].q_proj.weight
    inner = q(1) + (q(2) - q(1)) + (q(3) - q(1))
    assert torch.allclose(merged_module(originals, "attn", 0, nested).q_proj.weight, q(0) + (inner - q(0)), atol=1e-6)


def test_laco_meets_the_budget_and_its_merges_are_applied(bench):
    budget = Budget(2 / LAYERS, "layers", bench.adapter)
    plan = LaCoSelector(LaCoParams(rear_layers=2, threshold=-1.0)).select(bench, OutputScorer(), IdentityFitter(), budget)
    (merge,) = plan.notes["merges"]  # the first merge from the top takes two rear layers
    assert merge["base"] == LAYERS - 3 and merge["merged"] == [LAYERS - 2, LAYERS - 1]
    assert sorted(plan.subs) == whole(LAYERS - 2, LAYERS - 1)
    assert sorted(plan.edits) == whole(LAYERS - 3)
    assert plan.notes["estimated_sparsity"] == pytest.approx(2 / LAYERS)


# ---------------------------------------------------------------- scoring subset
def test_scoring_subset_judges_only_the_first_windows(tiny_model, random_windows):
    model = tiny_model("llama", seed=3, num_hidden_layers=LAYERS)
    windows = random_windows(calib=6, scoring=3, seq_len=16, seed=5)
    full = Workbench(model, LlamaFamilyAdapter(model), windows, batch_size=2, device=torch.device("cpu"))
    full.collect()
    small_windows = copy.copy(windows)
    small_windows.scoring = windows.scoring[:1]
    small = Workbench(model, LlamaFamilyAdapter(model), small_windows, batch_size=2, device=torch.device("cpu"))
    small.collect()
    sub = Submodule(2, "ffn")
    with full.subset(1):
        for metric in ("kl", "loss", "js"):
            assert full.metric_with(sub, ZeroBypass(), metric) == pytest.approx(
                small.metric_with(sub, ZeroBypass(), metric), rel=1e-5)
    assert full.metric_with(sub, ZeroBypass(), "loss") != pytest.approx(small.metric_with(sub, ZeroBypass(), "loss"))
    with pytest.raises(ConfigError, match=r"selector.scoring_samples: 5 windows requested, allowed 1..3"), \
            full.subset(5):
        pass
