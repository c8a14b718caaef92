"""Parameter accounting and the budget: counts match numel(), achieved sparsity in both units
matches a hand computation, and the greedy selector meets the budget without repeats."""

from __future__ import annotations

import pytest
import torch

from subfit_core.engine.budget import Budget
from subfit_core.engine.bypass import LowRankBypass, ZeroBypass
from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.surgery import apply_bypasses, split_bypass_params
from subfit_core.engine.workbench import Workbench
from subfit_plugins.adapters.llama import LlamaFamilyAdapter
from subfit_plugins.fitters.identity import IdentityFitter
from subfit_plugins.fitters.linear import LinearFitter
from subfit_plugins.fitters.shared_basis import SharedBasisBypass
from subfit_plugins.scorers.local import RotationMagnitudeScorer
from subfit_plugins.scorers.output import OutputScorer
from subfit_plugins.selectors.greedy import GreedyParams, GreedySelector

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() counts a shared tensor once


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("arch", ARCHS)
def test_param_counts_match_numel(tiny_model, arch):
    model = tiny_model(arch)
    adapter = LlamaFamilyAdapter(model)
    layers = model.model.layers
    assert Budget(0.25, "params", adapter).decoder_params == numel(layers)
    for sub in adapter.submodules():
        layer = layers[sub.layer]
        # a submodule is its module plus its pre-norm
        module, norm = (layer.self_attn, layer.input_layernorm) if sub.kind == "attn" else \
            (layer.mlp, layer.post_attention_layernorm)
        assert adapter.param_count(sub) == numel(module) + numel(norm), sub
        assert adapter.input_params(sub) == numel(norm) == 32, sub
    for l in range(adapter.num_layers):
        assert adapter.layer_param_count(l) == numel(layers[l])
        # the two halves make up the whole layer
        attn, ffn = adapter.param_count(Submodule(l, "attn")), adapter.param_count(Submodule(l, "ffn"))
        assert adapter.layer_param_count(l) == attn + ffn
    # the embeddings and lm_head are not decoder parameters
    assert numel(model) > numel(layers)
    # Llama-family attention: q, k, v, o (+ q/k/v biases in Qwen2, + q/k norms in Qwen3)
    d, hd, heads, kv = 32, 8, 4, 2
    attn = 2 * d * heads * hd + 2 * d * kv * hd + {"qwen2": heads * hd + 2 * kv * hd, "qwen3": 2 * hd}.get(arch, 0)
    assert numel(layers[0].self_attn) == attn
    assert numel(layers[0].mlp) == 3 * d * 64


def test_removing_both_halves_of_a_layer_is_exactly_one_layer(tiny_model):
    adapter = LlamaFamilyAdapter(tiny_model("llama"))
    for unit in ("layers", "params"):
        budget = Budget(0.25, unit, adapter)
        whole = budget.achieved({Submodule(1, "attn"): 0, Submodule(1, "ffn"): 0})
        assert whole == pytest.approx(1 / adapter.num_layers, rel=1e-12)
        # a bypass with weights keeps (and is charged) the pre-norm it reads its input through
        with_bypass = budget.saving(Submodule(1, "ffn"), 10)
        assert with_bypass == pytest.approx(budget.saving(Submodule(1, "ffn"), 0) - (10 + 32) / budget.decoder_params)


def test_smollm2_like_shapes(tiny_model):
    """SmolLM2-135M's proportions at 1/12 the width: hidden 576 -> 48, FFN 1536 -> 128, 9 -> 3 heads of
    64 -> 16 dims, 3 -> 1 KV heads. The counts follow from the shapes."""
    d, ffn, heads, kv, head_dim = 48, 128, 3, 1, 16
    shape = dict(hidden_size=d, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv,
                 head_dim=head_dim, num_hidden_layers=3)
    adapter = LlamaFamilyAdapter(tiny_model("llama", **shape))
    attn = 2 * d * heads * head_dim + 2 * d * kv * head_dim + d  # q, o, k, v (no biases in Llama) + RMSNorm
    mlp = 3 * d * ffn + d  # gate, up, down + RMSNorm
    layer = attn + mlp
    assert adapter.param_count(Submodule(0, "attn")) == attn
    assert adapter.param_count(Submodule(0, "ffn")) == mlp
    assert adapter.layer_param_count(1) == layer
    assert adapter.param_count(Submodule(2, "attn")) / adapter.layer_param_count(2) == pytest.approx(0.2510, abs=2e-4)
    # the same ratio as the real SmolLM2-135M: attention is about a quarter of a layer
    real_attn = 2 * 576 * 576 + 2 * 576 * 192 + 576
    real_layer = real_attn + 3 * 576 * 1536 + 576
    assert attn / layer == pytest.approx(real_attn / real_layer, abs=1e-3)
    # removing one attention is a quarter of a layer: over 3 layers, sparsity attn / layer / 3
    assert Budget(0.1, "layers", adapter).saving(Submodule(1, "attn"), 0) == pytest.approx(attn / layer / 3)
    assert Budget(0.1, "params", adapter).saving(Submodule(1, "attn"), 0) == pytest.approx(attn / (3 * layer))
    # qwen2 puts biases on q, k, v
    q2 = LlamaFamilyAdapter(tiny_model("qwen2", **shape))
    assert q2.param_count(Submodule(0, "attn")) == attn + heads * head_dim + 2 * kv * head_dim


# ----------------------------------------------------------------------------- report


def uneven_model(tiny_model):
    """Layer 3's FFN is half as wide, so layers differ in size and the two units give different answers."""
    import copy

    from transformers.models.llama.modeling_llama import LlamaMLP

    model = tiny_model("llama")
    small = copy.deepcopy(model.config)
    small.intermediate_size = 32
    model.model.layers[3].mlp = LlamaMLP(small)
    return model


def test_report_matches_manual_accounting(tiny_model):
    model = uneven_model(tiny_model)
    adapter = LlamaFamilyAdapter(model)
    layers = model.model.layers
    sizes = [numel(l) for l in layers]
    assert sizes[3] < sizes[0]
    n_layers, decoder = len(layers), sum(sizes)
    d, r = 32, 4
    g = torch.Generator().manual_seed(0)
    basis = torch.nn.Parameter(torch.randn(r, d, generator=g), requires_grad=False)
    bypasses = {
        Submodule(0, "attn"): LowRankBypass(torch.randn(r, d, generator=g), torch.randn(d, r, generator=g),
                                            torch.randn(d, generator=g)),
        Submodule(1, "ffn"): SharedBasisBypass(basis, torch.randn(d, r, generator=g), torch.randn(d, generator=g)),
        Submodule(2, "attn"): ZeroBypass(),
        Submodule(3, "ffn"): SharedBasisBypass(basis, torch.randn(d, r, generator=g), None),
    }

    def parts(s):
        layer = layers[s.layer]
        if s.kind == "attn":
            return layer.self_attn, layer.input_layernorm
        return layer.mlp, layer.post_attention_layernorm

    removed_numel = {s: numel(parts(s)[0]) + numel(parts(s)[1]) for s in bypasses}  # module + pre-norm
    kept_norm = {s: 0 if isinstance(b, ZeroBypass) else numel(parts(s)[1]) for s, b in bypasses.items()}
    own, shared = split_bypass_params(bypasses)
    assert own == {Submodule(0, "attn"): 2 * d * r + d, Submodule(1, "ffn"): d * r + d, Submodule(2, "attn"): 0,
                   Submodule(3, "ffn"): d * r}
    assert shared == r * d

    rep = Budget(0.2, "layers", adapter).report(own, shared)
    net = {s: removed_numel[s] - own[s] - kept_norm[s] for s in bypasses}
    manual_params = (sum(net.values()) - shared) / decoder
    manual_layers = sum(net[s] / sizes[s.layer] for s in bypasses) / n_layers \
        - shared / (decoder / n_layers) / n_layers  # the shared basis is charged at the mean layer size
    assert rep["requested"] == 0.2 and rep["unit"] == "layers"
    assert rep["achieved_params"] == pytest.approx(manual_params, rel=1e-12)
    assert rep["achieved_layers"] == pytest.approx(manual_layers, rel=1e-12)
    assert rep["layer_equivalents"] == pytest.approx(manual_layers * n_layers, rel=1e-12)
    assert abs(rep["achieved_layers"] - rep["achieved_params"]) > 1e-3  # uneven layers: the units differ
    # the report does not depend on the unit the budget was requested in
    rep_p = Budget(0.2, "params", adapter).report(own, shared)
    assert (rep_p["achieved_params"], rep_p["achieved_layers"]) == (rep["achieved_params"], rep["achieved_layers"])

    # cross-check with the model itself after surgery: params saved = decoder numel before - after
    apply_bypasses(adapter, bypasses)
    after = numel(model.model.layers)
    assert (decoder - after) / decoder == pytest.approx(rep["achieved_params"], rel=1e-12)


def test_units_agree_on_even_layers(tiny_model):
    adapter = LlamaFamilyAdapter(tiny_model("qwen3"))
    removed = {Submodule(0, "attn"): 100, Submodule(2, "ffn"): 0, Submodule(3, "ffn"): 50}
    rep = Budget(0.3, "params", adapter).report(removed, shared_params=64)
    assert rep["achieved_layers"] == pytest.approx(rep["achieved_params"], rel=1e-12)
    assert Budget(0.3, "params", adapter).achieved(removed) - 64 / adapter.layer_param_count(0) / 4 == \
        pytest.approx(rep["achieved_params"], rel=1e-12)
    layer = adapter.layer_param_count(0)
    manual = (adapter.param_count(Submodule(0, "attn")) - 100 - 32 + adapter.param_count(Submodule(2, "ffn"))
              + adapter.param_count(Submodule(3, "ffn")) - 50 - 32 - 64) / (4 * layer)
    assert rep["achieved_params"] == pytest.approx(manual, rel=1e-12)


# ----------------------------------------------------------------------------- greedy selection


@pytest.fixture(scope="module")
def bench(tiny_model, random_windows):
    model = tiny_model("llama", initializer_range=0.1)
    b = Workbench(model, LlamaFamilyAdapter(model), random_windows(calib=6, scoring=3, seq_len=16), 3,
                  torch.device("cpu"), stride=2)
    b.collect()
    return b


@pytest.fixture
def clean_bench(bench):
    bench.restore()
    bench._fits.clear()  # Workbench.fit memoises on id(fitter), which a fitter of an earlier test may have had
    yield bench
    bench.restore()


def check_plan(plan, bench, fitter, budget, kinds=("attn", "ffn")):
    subs = plan.subs
    assert len(subs) == len(set(subs)), "a submodule was selected twice"
    assert all(s.kind in kinds for s in subs)
    dim = bench.adapter.hidden_size
    charged = {s: fitter.estimate_params(s, dim) for s in subs}
    achieved = budget.achieved(charged)
    assert plan.notes["estimated_sparsity"] == pytest.approx(achieved, rel=1e-12)
    return subs, charged, achieved


@pytest.mark.parametrize("unit", ["layers", "params"])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.55])
def test_greedy_with_identity_fitter_meets_budget(clean_bench, unit, sparsity):
    fitter, budget = IdentityFitter(), Budget(sparsity, unit, clean_bench.adapter)
    selector = GreedySelector(GreedyParams(rescore=False))
    scorer = RotationMagnitudeScorer()
    plan = selector.select(clean_bench, scorer, fitter, budget)
    subs, charged, achieved = check_plan(plan, clean_bench, fitter, budget)
    assert achieved >= sparsity - 1e-9
    # and it stops as soon as the budget is met: without the last pick it would fall short
    last = subs[-1]
    assert achieved - budget.saving(last, charged[last]) < sparsity
    assert "warning" not in plan.notes
    # without re-scoring the picks follow score per unit of budget saved, up to the first candidate
    # that would overshoot the budget; from there only candidates that still fit are taken
    scores = scorer.score(clean_bench.subs, clean_bench, fitter)
    order = sorted(clean_bench.subs, key=lambda s: scores[s] / budget.saving(s, 0))
    prefix, total = [], 0.0
    for s in order:
        if total + budget.saving(s, 0) > sparsity + 1e-12:
            break
        prefix.append(s)
        total += budget.saving(s, 0)
    assert subs[:len(prefix)] == prefix
    assert all(budget.saving(s, 0) <= sparsity - sum(budget.saving(t, 0) for t in subs[:i]) + 1e-12
               for i, s in enumerate(subs[:-1]))  # only the last pick may cross the budget
    assert [r.score for r in plan.replacements] == [scores[s] for s in subs]
    assert not clean_bench.replaced  # nothing committed without rescore


def test_greedy_rescoring_commits_each_pick_once(clean_bench):
    fitter, budget = LinearFitter(), Budget(0.4, "layers", clean_bench.adapter)
    plan = GreedySelector(GreedyParams(rescore=True, rounds=3, shortlist=2.0)).select(
        clean_bench, OutputScorer(), fitter, budget)
    subs, _, achieved = check_plan(plan, clean_bench, fitter, budget)
    assert achieved >= 0.4 - 1e-9
    assert set(clean_bench.replaced) == set(subs)  # every pick was committed to the workbench
    for s in subs:
        assert clean_bench.adapter.module(s) is clean_bench.replaced[s]


def test_anchored_greedy_judges_the_shortlist_with_anchored_fits(clean_bench, monkeypatch):
    # Between rounds the chosen bypasses are refitted on the compressed model's inputs and every
    # shortlisted candidate is re-scored with its own anchored fit; the last pick is committed with it.
    fitter, budget = LinearFitter(), Budget(0.4, "layers", clean_bench.adapter)
    calls, real = [], type(clean_bench).reanchor
    monkeypatch.setattr(type(clean_bench), "reanchor",
                        lambda self, f, chosen, shortlist: (calls.append((list(chosen), list(shortlist))),
                                                            real(self, f, chosen, shortlist))[1])
    plan = GreedySelector(GreedyParams(rescore=True, rounds=3, shortlist=2.0, anchored=True)).select(
        clean_bench, OutputScorer(), fitter, budget)
    subs, _, achieved = check_plan(plan, clean_bench, fitter, budget)
    assert achieved >= 0.4 - 1e-9 and set(clean_bench.replaced) == set(subs)
    assert len(calls) == 2 and all(chosen == subs[:len(chosen)] and not set(chosen) & set(shortlist)
                                   for chosen, shortlist in calls)
    anchored_probes = set(calls[-1][1])
    last = [s for s in subs[len(calls[-1][0]):] if s in anchored_probes]
    assert last
    for s in last:  # committed with the anchored fit the last re-scoring judged it with
        assert clean_bench.replaced[s] is clean_bench.fit(fitter, s)


@pytest.mark.parametrize("rescore", [False, True])
def test_greedy_ffn_only(clean_bench, rescore):
    fitter, budget = IdentityFitter(), Budget(0.3, "layers", clean_bench.adapter)
    plan = GreedySelector(GreedyParams(kinds="ffn", rescore=rescore)).select(
        clean_bench, OutputScorer(), fitter, budget)
    subs, _, achieved = check_plan(plan, clean_bench, fitter, budget, kinds=("ffn",))
    assert subs and achieved >= 0.3 - 1e-9


def test_greedy_unreachable_budget_takes_every_candidate_once_and_warns(clean_bench):
    fitter, budget = IdentityFitter(), Budget(0.9, "layers", clean_bench.adapter)  # FFNs are < 0.9 of the decoder
    plan = GreedySelector(GreedyParams(kinds="ffn", rounds=2)).select(clean_bench, OutputScorer(), fitter, budget)
    subs, _, achieved = check_plan(plan, clean_bench, fitter, budget, kinds=("ffn",))
    assert sorted(subs) == [s for s in clean_bench.subs if s.kind == "ffn"]
    assert achieved < 0.9 and "not reachable" in plan.notes["warning"]


def test_greedy_skips_candidates_whose_bypass_costs_more_than_they_save(clean_bench):
    """With hidden 32 a full-rank linear bypass (32*32+32 = 1056 params) is cheap next to an FFN (6144),
    but a fitter charging more than a submodule's own size must never select it."""

    class Costly(IdentityFitter):
        def estimate_params(self, sub, dim):
            return 10**6 if sub.kind == "attn" else 0

    fitter, budget = Costly(), Budget(0.3, "layers", clean_bench.adapter)
    plan = GreedySelector(GreedyParams(rescore=False)).select(clean_bench, RotationMagnitudeScorer(), fitter, budget)
    assert plan.subs and all(s.kind == "ffn" for s in plan.subs)


def test_greedy_params_are_validated():
    with pytest.raises(ValueError, match="kinds"):
        GreedyParams(kinds="ffn,mlp")
    with pytest.raises(ValueError, match="rounds"):
        GreedyParams(rounds=0)
    with pytest.raises(ValueError, match="anchored: true acts between rounds"):
        GreedyParams(anchored=True, rounds=1)
