"""ReplaceMe, LLM-Streamline, LaCo and LinearPatch: planted answers, exact arithmetic, and their errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from subfit_core.engine.budget import Budget
from subfit_core.engine.bypass import ZeroBypass, build_bypasses
from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.surgery import apply_bypasses
from subfit_core.engine.workbench import Workbench
from subfit_core.errors import ConfigError
from subfit_plugins.adapters.llama import LlamaFamilyAdapter
from subfit_plugins.fitters.hadamard import hadamard
from subfit_plugins.fitters.identity import IdentityFitter
from subfit_plugins.fitters.linear_patch import (
    ChannelScales,
    LinearPatchFitter,
    LinearPatchParams,
    PatchBypass,
    patch_matrix,
    rotation,
)
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


def empty_layers(model, *layers) -> None:
    """Make layers add nothing to the stream (their attention and FFN outputs are zero)."""
    with torch.no_grad():
        for layer in layers:
            model.model.layers[layer].self_attn.o_proj.weight.zero_()
            model.model.layers[layer].mlp.down_proj.weight.zero_()


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
    empty_layers(model, 3, 4)
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


# ---------------------------------------------------------------- LinearPatch
@pytest.mark.parametrize("n", [12, 20, 28, 36, 64, 576, 640, 896])
def test_hadamard_is_orthonormal_with_entries_of_one_magnitude(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_a_width_without_a_hadamard_construction_is_named():
    assert hadamard(10) is None and hadamard(100) is None  # 10: none exists; 100: not built here
    with pytest.raises(ConfigError, match="hidden size 100.*use random or none"):
        rotation(100, "hadamard", 0)
    q = rotation(100, "random", 0)
    assert torch.allclose(q @ q.T, torch.eye(100, dtype=torch.float64), atol=1e-12)


def test_channel_scales_recover_a_planted_scaling_despite_outlier_tokens():
    gen = torch.Generator().manual_seed(0)
    d, rot = 36, hadamard(36)
    x = torch.randn(5, 40, d, generator=gen, dtype=torch.float64)
    x[:, 0] *= 1000  # a massive first token, as in LLMs' residual streams
    d_true = torch.rand(d, generator=gen, dtype=torch.float64) * 2 + 0.1
    y = x @ patch_matrix(rot, d_true)  # the window maps the stream by H D H^T
    acc = ChannelScales(rot)
    for b in range(2):  # batches, as over calibration windows
        acc.before(b, x[b * 3:(b + 1) * 3])
        acc.after(b, y[b * 3:(b + 1) * 3])
    assert torch.allclose(acc.result("t"), d_true, rtol=1e-10)
    assert torch.allclose(x @ patch_matrix(rot, acc.result("t")), y, rtol=1e-8, atol=1e-8)


def test_a_window_that_does_nothing_gets_the_identity_patch_and_the_model_stays_exact(bench):
    model = bench.model
    empty_layers(model, 3, 4)
    dense = logits(model, bench)
    fitted = LinearPatchFitter().fit_selection(whole(3, 4), bench)
    patch = fitted.bypasses[Submodule(4, "ffn")]
    assert isinstance(patch, PatchBypass) and fitted.notes["channel_scales"]["L3-L4"]["min"] == pytest.approx(1.0)
    assert torch.allclose(patch.patch, torch.eye(bench.adapter.hidden_size), atol=1e-6)
    bench.apply(fitted.bypasses)
    assert torch.allclose(logits(model, bench), dense, atol=1e-4)
    assert type(model.model.layers[4].post_attention_layernorm).__name__ == "Identity"  # it reads the stream


def test_the_patch_multiplies_the_stream_at_the_cut_and_the_workbench_computes_what_the_model_does(bench):
    model = bench.model
    fitted = LinearPatchFitter().fit_selection(whole(1), bench)
    p = fitted.bypasses[Submodule(1, "ffn")].patch
    assert torch.allclose(p, p.T, atol=1e-6)  # H D H^T is symmetric
    patched = copy.deepcopy(model)
    apply_bypasses(LlamaFamilyAdapter(patched), fitted.bypasses)
    seen = {}
    layers = patched.model.layers
    layers[1].register_forward_pre_hook(lambda m, args, kw: seen.update(into=kw["hidden_states"] if "hidden_states" in kw else args[0]),
                                        with_kwargs=True)
    layers[1].register_forward_hook(lambda m, args, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
    ids = bench.windows.scoring
    with torch.no_grad():
        logq = F.log_softmax(patched(input_ids=ids).logits[:, :-1].float(), -1)
    assert torch.allclose(seen["out"], seen["into"] @ p, atol=1e-5)
    loss = float(F.nll_loss(logq.flatten(0, 1), ids[:, 1:].flatten()))
    assert bench.metric_with_many(fitted.bypasses, "loss") == pytest.approx(loss, rel=1e-4)


def test_the_patch_is_charged_once_per_window_and_partial_layers_are_refused(bench):
    d = bench.adapter.hidden_size
    fitter = LinearPatchFitter()
    charges = fitter.charges(whole(1, 2, 4), d)
    assert {s for s, c in charges.items() if c} == {Submodule(2, "ffn"), Submodule(4, "ffn")}
    assert set(charges.values()) == {0, d * d}
    with pytest.raises(ConfigError, match="layer 3 is selected only in part"):
        fitter.fit_selection([Submodule(3, "attn"), *whole(4)], bench)
    with pytest.raises(ConfigError, match="anchored: true is not supported by fitter linear-patch"):
        fitter.fit_selection(whole(4), bench, anchored=True)


def test_an_adapter_that_cannot_feed_the_stream_is_refused(bench):
    class NoStream(LlamaFamilyAdapter):
        stream_bypasses = False

    bench.adapter.__class__ = NoStream
    with pytest.raises(ConfigError, match="adapter NoStream cannot feed a bypass"):
        LinearPatchFitter(LinearPatchParams()).fit_selection(whole(2), bench)


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
