"""LinearPatch: the Hadamard rotation, the channel scaling it measures (a planted scaling is
recovered exactly), the patch at each cut, and its exactness on a window that does nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.surgery import apply_bypasses
from subfit_core.engine.workbench import Workbench
from subfit_core.errors import ConfigError
from subfit_plugins.adapters.llama import LlamaFamilyAdapter
from subfit_plugins.fitters.hadamard import hadamard
from subfit_plugins.fitters.linear_patch import (
    ChannelScales,
    LinearPatchFitter,
    LinearPatchParams,
    PatchBypass,
    patch_matrix,
    rotation,
)

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
    with torch.no_grad():
        for layer in (3, 4):
            model.model.layers[layer].self_attn.o_proj.weight.zero_()
            model.model.layers[layer].mlp.down_proj.weight.zero_()
        dense = model(input_ids=bench.windows.scoring).logits
    fitted = LinearPatchFitter().fit_selection(whole(3, 4), bench)
    patch = fitted.bypasses[Submodule(4, "ffn")]
    assert isinstance(patch, PatchBypass) and fitted.notes["channel_scales"]["L3-L4"]["min"] == pytest.approx(1.0)
    assert torch.allclose(patch.patch, torch.eye(bench.adapter.hidden_size), atol=1e-6)
    bench.apply(fitted.bypasses)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=bench.windows.scoring).logits, dense, atol=1e-4)
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
