"""Baselines as registered combinations, checked against planted answers and brute force."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from subfit_core.engine.budget import Budget
from subfit_core.engine.bypass import ZeroBypass
from subfit_core.engine.interfaces import Submodule
from subfit_core.engine.surgery import apply_bypasses
from subfit_core.engine.workbench import Workbench
from subfit_plugins.adapters.llama import LlamaFamilyAdapter
from subfit_plugins.fitters.identity import IdentityFitter
from subfit_plugins.scorers.angular import AngularDistanceScorer
from subfit_plugins.scorers.block_influence import BlockInfluenceScorer
from subfit_plugins.scorers.output import OutputParams, OutputScorer
from subfit_plugins.selectors.contiguous import ContiguousSelector
from subfit_plugins.selectors.iterative import IterativeParams, IterativeSelector
from subfit_plugins.selectors.whole_layer import WholeLayerSelector

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = 6


def make_identity(model, layer: int, scale: float = 0.0) -> None:
    """Make a layer (almost) an identity map: its attention and FFN add (almost) nothing."""
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.mul_(scale)
        model.model.layers[layer].mlp.down_proj.weight.mul_(scale)


def bench_for(model, windows) -> Workbench:
    bench = Workbench(model, LlamaFamilyAdapter(model), windows, batch_size=8, device=torch.device("cpu"))
    bench.collect()
    return bench


@pytest.fixture
def setup(tiny_model, random_windows):
    model = tiny_model("llama", seed=3, num_hidden_layers=LAYERS)
    return model, random_windows(calib=6, scoring=3, seq_len=16, seed=5)


def full_metric(model, windows, removed: list[Submodule], metric: str) -> float:
    """Brute force: remove ``removed`` from a copy of the model and run ordinary full forwards."""
    m = copy.deepcopy(model)
    apply_bypasses(LlamaFamilyAdapter(m), {s: ZeroBypass() for s in removed})
    ids = windows.scoring
    with torch.no_grad():
        logq = F.log_softmax(m(input_ids=ids).logits[:, :-1].float(), -1)
        logp = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    if metric == "loss":
        return float(F.nll_loss(logq.flatten(0, 1), ids[:, 1:].flatten()))
    p, q = logp.exp(), logq.exp()
    m_ = (p + q) / 2
    js = 0.5 * (p * (logp - m_.log())).sum(-1) + 0.5 * (q * (logq - m_.log())).sum(-1)
    return float(js.mean())


def test_shortgpt_removes_an_identity_layer_first(setup):
    model, windows = setup
    make_identity(model, 2)
    bench = bench_for(model, windows)
    budget = Budget(1 / LAYERS, "layers", bench.adapter)
    plan = WholeLayerSelector().select(bench, BlockInfluenceScorer(), IdentityFitter(), budget)
    assert plan.notes["layers_removed"] == [2]
    assert bench.statistic("layer-cosine", Submodule(2, "ffn")) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("metric", ["loss", "js"])
def test_workbench_metric_matches_full_forward(setup, metric):
    model, windows = setup
    bench = bench_for(model, windows)
    removed = [Submodule(1, "attn"), Submodule(1, "ffn")]
    got = bench.metric_with_many({s: ZeroBypass() for s in removed}, metric)
    assert got == pytest.approx(full_metric(model, windows, removed, metric), rel=1e-4, abs=1e-6)


def test_sleb_removes_the_layer_whose_deletion_raises_loss_least(setup):
    model, windows = setup
    make_identity(model, 4, scale=0.3)  # a plausible but not forced answer
    brute = {l: full_metric(model, windows, [Submodule(l, "attn"), Submodule(l, "ffn")], "loss") for l in range(LAYERS)}
    bench = bench_for(model, windows)
    budget = Budget(1 / LAYERS, "layers", bench.adapter)
    plan = IterativeSelector(IterativeParams(unit="layer")).select(bench, OutputScorer(OutputParams("loss")), IdentityFitter(), budget)
    assert {r.sub.layer for r in plan.replacements} == {min(brute, key=brute.get)}


def test_finercut_removes_the_sublayer_with_the_smallest_js(setup):
    model, windows = setup
    brute = {s: full_metric(model, windows, [s], "js") for s in LlamaFamilyAdapter(model).submodules()}
    bench = bench_for(model, windows)
    budget = Budget(0.3, "layers", bench.adapter)  # every candidate fits under the first step's need
    plan = IterativeSelector().select(bench, OutputScorer(OutputParams("js")), IdentityFitter(), budget)
    first = plan.replacements[0].sub
    assert first == min(brute, key=brute.get)


def test_blockpruner_removes_the_block_whose_deletion_raises_loss_least(setup):
    """BlockPruner: attention and FFN blocks, one at a time, by the LM loss of the pruned model."""
    model, windows = setup
    make_identity(model, 3, scale=0.5)
    brute = {s: full_metric(model, windows, [s], "loss") for s in LlamaFamilyAdapter(model).submodules()}
    bench = bench_for(model, windows)
    budget = Budget(0.3, "layers", bench.adapter)
    plan = IterativeSelector().select(bench, OutputScorer(OutputParams("loss")), IdentityFitter(), budget)
    assert plan.replacements[0].sub == min(brute, key=brute.get)


def test_iterative_selection_rescored_on_the_current_model(setup):
    model, windows = setup
    bench = bench_for(model, windows)
    budget = Budget(0.3, "layers", bench.adapter)
    plan = IterativeSelector().select(bench, OutputScorer(OutputParams("loss")), IdentityFitter(), budget)
    assert len(set(plan.subs)) == len(plan.subs)
    assert set(bench.replaced) == set(plan.subs)  # each pick committed, so later picks saw it
    assert sum(budget.saving(s, 0) for s in plan.subs) >= 0.3 - 1e-9


def test_uidl_picks_the_contiguous_window_of_near_identity_layers(setup):
    model, windows = setup
    make_identity(model, 3, scale=1e-3)
    make_identity(model, 4, scale=1e-3)
    bench = bench_for(model, windows)
    budget = Budget(2 / LAYERS, "layers", bench.adapter)
    plan = ContiguousSelector().select(bench, AngularDistanceScorer(), IdentityFitter(), budget)
    assert plan.notes["window"] == [3, 4]
    assert sorted(plan.subs) == [Submodule(3, "attn"), Submodule(3, "ffn"), Submodule(4, "attn"), Submodule(4, "ffn")]


def test_iterative_replays_scores_from_an_earlier_run_with_the_same_answer(setup):
    model, windows = setup
    selector, scorer = IterativeSelector(IterativeParams(unit="layer")), OutputScorer(OutputParams(metric="loss"))
    shared = bench_for(model, windows)
    low = selector.select(shared, scorer, IdentityFitter(), Budget(1 / LAYERS, "layers", shared.adapter))
    shared.restore()
    high = selector.select(shared, scorer, IdentityFitter(), Budget(3 / LAYERS, "layers", shared.adapter))
    shared.restore()
    fresh = bench_for(model, windows)
    alone = selector.select(fresh, scorer, IdentityFitter(), Budget(3 / LAYERS, "layers", fresh.adapter))
    assert high.subs == alone.subs and high.subs[:2] == low.subs
    assert high.notes["scores_reused"]["steps"] == 1 and "scores_reused" not in alone.notes
    assert shared.evaluations == fresh.evaluations  # both runs together cost what the high one costs alone
