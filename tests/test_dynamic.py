"""Dynamic per-prompt skipping: sparse recovery finds a planted harm vector from m << n probes, a
skipped attention holds no KV cache, and re-estimation is exact (unchanged set: nothing changes;
changed set: the same tokens as full forwards under the same schedule)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import build_tiny_model  # noqa: E402
from test_export import NO_SUBFIT  # noqa: E402
from test_surgery import cache_bytes  # noqa: E402

from subfit_core.engine.bypass import LowRankBypass  # noqa: E402
from subfit_core.engine.interfaces import Submodule  # noqa: E402
from subfit_core.engine.models import find_adapter  # noqa: E402
from subfit_core.errors import SubFitError  # noqa: E402
from subfit_core.plugins import get_plugins  # noqa: E402
from subfit_plugins.dynamic.sensing import lasso, omp, probe_design, recover  # noqa: E402
from subfit_plugins.dynamic.skip import DynamicParams, DynamicSkip  # noqa: E402

N, K = 40, 3


def planted(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prior = torch.rand(N, generator=g, dtype=torch.float64) * 0.1
    dev = torch.zeros(N, dtype=torch.float64)
    dev[torch.randperm(N, generator=g)[:K]] = 1.0 + torch.rand(K, generator=g, dtype=torch.float64)
    return prior, prior + dev


@pytest.mark.parametrize("solver,probes", [("lasso", 20), ("omp", 30)])
def test_recovery_finds_planted_deviations_from_few_probes(solver, probes):
    """Three candidates this prompt needs far more than usual, found exactly from fewer probes than
    the 40 candidates (each candidate in a quarter of them). OMP, greedy, needs more: 0/1 columns
    are correlated."""
    for seed in range(10):
        prior, truth = planted(seed)
        a = probe_design(probes, N, 0.25, torch.Generator().manual_seed(100 + seed))
        h = recover(a, a @ truth, prior, solver, lam=0.01, k=K)
        assert torch.allclose(h, truth, atol=1e-9)


def test_too_few_probes_do_not_recover():
    """The other side of the curve: 4 probes cannot pin 3 deviations among 40."""
    misses = 0
    for seed in range(10):
        prior, truth = planted(seed)
        a = probe_design(4, N, 0.25, torch.Generator().manual_seed(100 + seed))
        misses += not torch.allclose(recover(a, a @ truth, prior, "lasso", 0.01, K), truth, atol=1e-3)
    assert misses >= 8


def test_recovery_without_probes_information_is_the_prior():
    prior, _ = planted(0)
    a = probe_design(10, N, 0.2, torch.Generator().manual_seed(1))
    assert torch.allclose(recover(a, a @ prior, prior, "lasso", 0.05, K), prior)
    assert torch.allclose(recover(a, a @ prior, prior, "omp", 0.05, K), prior)


def test_solvers_on_a_known_system():
    a = torch.eye(4, dtype=torch.float64)
    y = torch.tensor([3.0, 0.0, -2.0, 0.5], dtype=torch.float64)
    assert torch.allclose(lasso(a, y, 1.0), torch.tensor([2.0, 0.0, -1.0, 0.0], dtype=torch.float64))  # soft threshold
    assert torch.allclose(omp(a, y, 2), torch.tensor([3.0, 0.0, -2.0, 0.0], dtype=torch.float64))
    design = probe_design(50, 7, 0.01, torch.Generator().manual_seed(0))
    assert (design.sum(0) == 1).all()  # every candidate measured, even at a tiny share
    assert (probe_design(20, 9, 0.25, torch.Generator().manual_seed(0)).sum(0) == 5).all()


def test_params_are_checked():
    with pytest.raises(ValueError, match="budget"):
        DynamicParams(budget=1.5)
    with pytest.raises(ValueError, match="solver"):
        DynamicParams(solver="magic")


def skipper(arch: str = "llama", **params) -> DynamicSkip:
    model = build_tiny_model(arch)
    adapter = find_adapter(get_plugins(), model)
    d = adapter.hidden_size
    g = torch.Generator().manual_seed(3)
    bypasses = {s: LowRankBypass(torch.randn(4, d, generator=g) * 0.1, torch.randn(d, 4, generator=g) * 0.1,
                                 torch.zeros(d)) for s in adapter.submodules()}
    savings = {s: 1.0 / len(bypasses) for s in bypasses}
    return DynamicSkip(adapter, bypasses, savings, DynamicParams(**params))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_skipped_attention_holds_no_kv_cache(arch):
    dyn = skipper(arch)
    prompt = torch.randint(0, 100, (1, 9))
    dense = dyn.model(input_ids=prompt, use_cache=True).cache
    per_layer = [cache_bytes(type("C", (), {"layers": [layer]})) for layer in dense.layers]
    skip = frozenset([Submodule(1, "attn"), Submodule(2, "attn"), Submodule(0, "ffn")])
    dyn.generate(prompt, 5, estimate=lambda ids: skip)
    kept = [layer for layer in range(len(per_layer)) if Submodule(layer, "attn") not in skip]
    per_token = sum(per_layer[layer] for layer in kept) // prompt.shape[1]
    assert cache_bytes(dyn.cache) == per_token * (prompt.shape[1] + 4)  # the last token is not yet cached


def greedy_by_full_forwards(dyn: DynamicSkip, prompt: torch.Tensor, new_tokens: int, schedule) -> torch.Tensor:
    ids = prompt
    for step in range(new_tokens):
        dyn.use(schedule(step))
        with torch.inference_mode():
            nxt = dyn.model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, nxt], dim=-1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_reestimation_is_exact(arch):
    """The set changes every 3 tokens (a skipped attention comes back): the cached decode gives the
    tokens full forwards give under the same schedule; an unchanged set never prefills again."""
    a = frozenset([Submodule(1, "attn"), Submodule(2, "ffn")])
    b = frozenset([Submodule(2, "attn"), Submodule(0, "ffn")])
    dyn = skipper(arch, every=3)
    prompt = torch.randint(0, 100, (1, 7))
    calls = []

    def alternate(ids):
        calls.append(ids.shape[-1])
        return a if len(calls) % 2 else b

    out = dyn.generate(prompt, 10, estimate=alternate)
    schedule = lambda step: a if (step // 3) % 2 == 0 else b  # noqa: E731
    assert torch.equal(out, greedy_by_full_forwards(dyn, prompt, 10, schedule))
    assert dyn.counts["reprefill"] > 0

    same = skipper(arch, every=3)
    once = skipper(arch, every=0)
    out_same = same.generate(prompt, 10, estimate=lambda ids: a)
    assert torch.equal(out_same, once.generate(prompt, 10, estimate=lambda ids: a))
    assert same.counts["reprefill"] == 0 and same.counts["decode"] == once.counts["decode"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_reestimation_compares_with_the_set_in_use_not_what_probing_left(arch):
    """Estimating runs probes on the whole model and leaves it dense (as ``choose`` does): a set that
    stays keeps its cache, and a change to the empty set rebuilds the cache instead of reading slots
    laid out for the old set."""
    a = frozenset([Submodule(1, "attn"), Submodule(2, "ffn")])
    dyn = skipper(arch, every=3)
    prompt = torch.randint(0, 100, (1, 7))

    def probing(chosen):
        def estimate(ids):
            dyn.use(frozenset())  # what probing and choosing leave installed
            return chosen(ids)
        return estimate

    out = dyn.generate(prompt, 10, estimate=probing(lambda ids: a))
    assert dyn.counts["reprefill"] == 0
    assert torch.equal(out, greedy_by_full_forwards(dyn, prompt, 10, lambda step: a))
    dyn = skipper(arch, every=3)
    out = dyn.generate(prompt, 10, estimate=probing(lambda ids: a if ids.shape[-1] < 10 else frozenset()))
    assert torch.equal(out, greedy_by_full_forwards(dyn, prompt, 10, lambda step: a if step < 3 else frozenset()))
    assert dyn.counts["reprefill"] > 0


def test_the_default_estimate_keeps_a_stable_choice_without_prefilling_again():
    dyn = skipper("llama", every=3, probes=0, budget=0.2)
    dyn.prior = torch.linspace(0.0, 1.0, len(dyn.candidates), dtype=torch.float64)
    prompt = torch.randint(0, 100, (1, 7))
    out = dyn.generate(prompt, 10)
    assert dyn.last_choice and dyn.counts["reprefill"] == 0
    assert torch.equal(out, greedy_by_full_forwards(dyn, prompt, 10, lambda step: dyn.last_choice))


def test_choice_meets_the_budget_by_least_harm_per_saving():
    dyn = skipper(budget=0.25)  # 4 layers x 2 = 8 candidates of 1/8 each: two are skipped
    harm = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 6.0, 7.0, 8.0], dtype=torch.float64)
    assert dyn.choose(harm) == frozenset([dyn.candidates[1], dyn.candidates[3]])
    assert dyn.skipped == frozenset()  # choosing leaves the model whole


def test_probes_measure_the_subsets_they_name():
    """With an additive harm (each probe's measurement the sum over the candidates it bypasses), the
    probes and recovery return every candidate's own harm, in candidate order."""
    dyn = skipper(probes=16, share=0.25, lam=1e-9)
    truth = torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    dyn.measure = lambda run, subset: float(sum(truth[dyn.candidates.index(s)] for s in subset))
    assert torch.allclose(dyn.probed(torch.randint(0, 100, (1, 6))), truth, atol=1e-9)
    dyn.prior = truth
    assert torch.equal(dyn.probed(torch.randint(0, 100, (1, 6)), probes=0), truth)  # no probes: the prior


def test_a_probe_that_bypasses_nothing_measures_the_dense_model():
    """A random design can leave a probe with no candidate (few candidates, a small share): it
    measures 0, and the estimate is still one harm per candidate."""
    dyn = skipper(probes=12, share=0.01)  # each of 8 candidates in one of 12 probes: at least 4 are empty
    ids = torch.randint(0, 100, (1, 6))
    assert dyn.measure(dyn.dense_run(ids), frozenset()) == 0.0
    harm = dyn.probed(ids)
    assert harm.shape == (len(dyn.candidates),) and bool((harm >= 0).all())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "olmo2"])
def test_probe_from_the_first_bypassed_submodule_equals_a_full_forward(arch):
    """A probe re-runs only from its first bypassed candidate on the dense states; its KL is the one
    a full forward of the model with those bypasses swapped in gives."""
    dyn = skipper(arch)
    ids = torch.randint(0, 100, (1, 10))
    subset = frozenset([Submodule(1, "ffn"), Submodule(2, "attn")])
    run = dyn.dense_run(ids)
    with torch.inference_mode():
        dense = dyn.model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        dyn.use(subset)
        probe = dyn.model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
    dyn.use(frozenset())
    assert torch.allclose(run.dense, dense, atol=1e-5)
    kl = float((dense.exp() * (dense - probe)).sum(-1).mean())
    assert dyn.measure(run, subset) == pytest.approx(kl, rel=1e-4, abs=1e-7)


def test_choice_does_not_overshoot_when_a_smaller_candidate_completes_the_budget():
    dyn = skipper(budget=0.25)
    c = dyn.candidates
    dyn.savings = {s: 0.3 for s in c} | {c[0]: 0.2, c[1]: 0.05, c[2]: 0.2}
    harm = torch.full((len(c),), 10.0, dtype=torch.float64)
    harm[2], harm[0], harm[1] = 0.02, 0.04, 0.015  # per saving: c2 0.1, c0 0.2, c1 0.3
    assert dyn.choose(harm) == frozenset([c[2], c[1]])  # 0.25, not c2 + c0 = 0.4


def test_candidates_from_a_session_are_the_larger_static_selection_and_the_model_stays_dense(tmp_path):
    from conftest import write_local_model_and_text

    from subfit_core.apps.cli import resolve_recipe
    from subfit_core.engine.pipeline import compress, open_session

    folder = write_local_model_and_text(tmp_path, seed=3, lines=1200)
    cfg = resolve_recipe(["strategy=subfit", f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}",
                          "calib.samples=8", "calib.seq_len=32", "calib.generated=0", "scoring.samples=2",
                          "eval.windows=4", "eval.seq_len=32", "eval.domains=[]", "cache_stats=false", "save=false"])
    session = open_session(cfg)
    ids = session.windows.heldout[:1]
    with torch.inference_mode():
        dense = session.model(input_ids=ids).logits
    dyn = DynamicSkip.from_session(session, cfg, DynamicParams(budget=0.2, probes=4, every=0), pool=1.5)
    with torch.inference_mode():
        assert torch.equal(session.model(input_ids=ids).logits, dense)  # the originals are back in place
    session.bench.restore()
    static = compress(session, {**cfg, "sparsity": 0.3}).bypasses
    session.bench.restore()
    assert sorted(dyn.candidates) == sorted(static)  # the recipe's selection at 1.5 x 0.2
    dyn.calibrate(session.windows.calib[:2])
    chosen = dyn.choose(dyn.probed(ids[:, :16]))
    assert 0.2 - 1e-9 <= sum(dyn.savings[s] for s in chosen) <= 0.2 + max(dyn.savings.values())
    out = dyn.generate(ids[:, :16], 4)
    assert out.shape == (1, 20) and dyn.counts["probe"] > 0  # the prompt was probed
    assert sum(dyn.savings[s] for s in dyn.last_choice) >= 0.2 - 1e-9  # and generated with a set that meets the budget
    assert dyn.skipped == frozenset()  # and left the model whole


# ----------------------------------------------------------------------------- the recipe and its folder

def dynamic_args(folder, *extra) -> list[str]:
    return ["strategy=subfit-dynamic", f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}",
            "calib.samples=8", "calib.seq_len=32", "calib.generated=0", "scoring.samples=2", "eval.windows=3",
            "eval.seq_len=32", f"eval.domains=[{folder / 'text.txt'}]", "cache_stats=false", "runner.probes=6",
            "runner.calibration=2", "runner.every=3", *extra]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_subfit_run_dynamic_saves_a_folder_that_generates_per_prompt_and_loads_dense_elsewhere(arch, tmp_path, capsys):
    from conftest import write_local_model_and_text
    from transformers import AutoModelForCausalLM

    from subfit_core.apps.cli import run_main
    from subfit_plugins.dynamic.runner import load_dynamic

    folder = write_local_model_and_text(tmp_path, seed=3, lines=600, layers=4, arch=arch)
    out = tmp_path / "out"
    assert run_main(dynamic_args(folder, "sparsity=0.25", f"output_dir={out}")) == 0
    printed = capsys.readouterr().out
    assert "candidates" in printed and "probes per choice" in printed
    assert [line.split("|")[2].strip() for line in printed.splitlines() if line.startswith("| replaced ")] == ["none"]
    results = json.loads((out / "results.json").read_text())
    assert results["runner"] == "dynamic" and len(results["dynamic"]["candidates"]) >= 2
    assert results["sparsity"]["achieved_layers"] >= 0.25 - 1e-9  # every prompt's choice meets the budget
    assert results["perplexity"]["ratio"] > 0 and results["dynamic"]["probe_tokens"] > 0
    assert results["kv_cache_bytes_per_token"]["after"] <= results["kv_cache_bytes_per_token"]["before"]

    dyn = load_dynamic(out)
    assert [s.name for s in dyn.candidates] == results["dynamic"]["candidates"]
    assert [float(h) for h in dyn.prior] == results["dynamic"]["prior"]
    dense = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # standard loading: the dense model, whole
    ids = torch.randint(0, 100, (1, 12))
    with torch.inference_mode():
        assert torch.equal(plain(input_ids=ids).logits, dense(input_ids=ids).logits)
        # the saved bypasses are the ones the run fitted: a chosen set gives the same logits as in memory
        chosen = frozenset(dyn.candidates[:1])
        dyn.use(chosen)
        skipped = dyn.model(input_ids=ids).logits
        dyn.use(frozenset())
        assert not torch.equal(skipped, dense(input_ids=ids).logits)
    again = load_dynamic(out)
    assert torch.equal(again.generate(ids, 7), load_dynamic(out).generate(ids, 7))  # seeded probes: reproducible
    assert again.counts["probe"] > 0 and again.last_choice  # it probed, chose and generated with a set skipped

    import shutil

    from subfit_core.errors import SubFitError

    spec = json.loads((out / "dynamic.json").read_text())
    for change, message in [(lambda d: d["candidates"][0].update(layer=99), "candidate L99"),
                            (lambda d: d["candidates"][0]["bypass"].update(dim=-3), "not a positive integer"),
                            (lambda d: d.update(format=7), "format 7"),
                            (lambda d: d["candidates"][0].update(bypass=5), "bypass 5 is not an object"),
                            (lambda d: d["candidates"][0].update(saving="x"), "saving 'x' is not a finite number"),
                            (lambda d: d["params"].update(probes=2.5), "params.probes 2.5 is not an integer")]:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(out, bad)
        tampered = json.loads(json.dumps(spec))
        change(tampered)
        (bad / "dynamic.json").write_text(json.dumps(tampered))
        with pytest.raises(SubFitError, match=rf"load_dynamic: .*{message}"):
            load_dynamic(bad)


def test_dynamic_runner_keys_are_checked_and_other_commands_refuse_it(tmp_path):
    from conftest import write_local_model_and_text

    from subfit_core.apps.cli import resolve_recipe
    from subfit_core.engine.pipeline import check_before_work, compress, open_session
    from subfit_core.errors import ConfigError

    folder = write_local_model_and_text(tmp_path, seed=3, lines=300, layers=4)
    with pytest.raises(ConfigError, match=r"runner.probs: unknown key for this component; allowed: .*did you mean 'probes'"):
        check_before_work(resolve_recipe(dynamic_args(folder, "runner.probs=3")))
    with pytest.raises(ConfigError, match=r"runner: probes: -1 must not be negative"):
        check_before_work(resolve_recipe(dynamic_args(folder, "runner.probes=-1")))
    with pytest.raises(ConfigError, match=r"runner.solver: 'lsso' is not allowed; .*lasso"):
        check_before_work(resolve_recipe(dynamic_args(folder, "runner.solver=lsso")))
    with pytest.raises(ConfigError, match=r"runner.pool: set runner.name first"):
        check_before_work(resolve_recipe(["strategy=subfit", "runner.pool=2"]))
    plain = resolve_recipe(dynamic_args(folder, "runner.name=none"))  # another name starts the section afresh
    check_before_work(plain)
    assert plain["runner"] == {"name": "none"}
    cfg = resolve_recipe(dynamic_args(folder))
    with pytest.raises(ConfigError, match=r"runner.name: dynamic delivers its own kind of model.*subfit-run"):
        compress(open_session(cfg), cfg)


def test_compare_refuses_a_per_prompt_recipe_before_any_work(tmp_path):
    from conftest import write_local_model_and_text

    from subfit_core.apps.compare import compare
    from subfit_core.errors import SubFitError

    folder = write_local_model_and_text(tmp_path, seed=3, lines=300, layers=4)
    with pytest.raises(SubFitError, match=r"strategy subfit-dynamic: runner.name: dynamic delivers its own kind of "
                                          r"model; subfit-compare compares compressed models"):
        compare(["strategies=[subfit,subfit-dynamic]", "sparsities=[0.25]", f"output_dir={tmp_path / 'c'}",
                 "model=/nonexistent", f"calib.dataset={folder / 'text.txt'}"])  # refused before a model loads


# ----------------------------------------------------------------------------- prompt tokens dropped


def masked_logits(dyn: DynamicSkip, ids: torch.Tensor, prompt: int, kept: torch.Tensor) -> torch.Tensor:
    """Full forward in which positions after the prompt cannot see the prompt tokens not in ``kept``:
    what decoding with those tokens dropped from the cache must give."""
    t = ids.shape[-1]
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
    gone = torch.ones(prompt, dtype=torch.bool)
    gone[kept] = False
    mask[prompt:, :prompt] &= ~gone
    with torch.inference_mode():
        return dyn.model(input_ids=ids, attention_mask=mask[None, None], use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "olmo2"])
def test_dropped_prompt_tokens_are_the_least_attended_and_decoding_never_sees_them(arch):
    """A prefill with ``tokens`` = 0.3 drops 30% of the prompt from every kept attention's cache (skipped
    ones hold none): the tokens the last ``window`` queries attend least, never the first or the window.
    The continuation then scores as a full forward in which later positions are masked off exactly
    those tokens, and generation continues with the true positions."""
    from subfit_plugins.dynamic.skip import kept_positions, usage

    dyn = skipper(arch, tokens=0.3, window=3)
    skip = frozenset([Submodule(1, "attn"), Submodule(0, "ffn")])
    window = torch.randint(0, 100, (20,))
    split = 12
    dyn.use(skip)
    with torch.inference_mode():
        dyn.model.set_attn_implementation("eager")
        att = dyn.model(input_ids=window[None, :split], output_attentions=True).attentions
        dyn.model.set_attn_implementation("sdpa")
    use = usage(att, 3)
    kept = kept_positions(use, 4, 3)
    assert kept.numel() == split - 4 and {0, 9, 10, 11} <= set(kept.tolist())
    gone = sorted(set(range(split)) - set(kept.tolist()))
    assert max(use[gone]) <= min(use[[i for i in range(1, 9) if i not in gone]])

    nll = dyn.continuation_nll(window, split)
    assert dyn.dropped == 4 == dyn.drop_count(split)
    logits = masked_logits(dyn, window[None], split, kept)[0, split - 1:-1].float()
    assert nll == pytest.approx(float(torch.nn.functional.cross_entropy(logits, window[split:], reduction="sum")),
                                rel=1e-5)

    ids = dyn.generate(window[None, :split], 5, estimate=lambda ids: skip)
    filled = [layer for layer in dyn.cache.layers if layer.is_initialized]
    assert len(filled) == 3  # 4 layers, one attention skipped: its slot holds nothing
    assert all(layer.keys.shape[-2] == split - 4 + 4 for layer in filled)  # 8 prompt tokens + 4 generated
    dyn.use(skip)
    step = masked_logits(dyn, ids, split, kept)
    dyn.use(frozenset())
    assert torch.equal(ids[0, split:], step[0, split - 1:-1].argmax(-1))


def test_reestimating_with_dropped_tokens_rebuilds_the_cache_the_choice_was_budgeted_for():
    """A choice is budgeted for a prefill of the whole context (its share of tokens dropped); a kept
    cache dropped only the prompt's share, so re-estimation rebuilds it even for the same set."""
    skip = frozenset([Submodule(1, "attn")])
    dyn = skipper("llama", tokens=0.5, window=2, every=4)
    prompt = torch.randint(0, 100, (1, 10))
    dyn.generate(prompt, 6, estimate=lambda ids: skip)
    assert dyn.counts["reprefill"] == 14 and dyn.dropped == dyn.drop_count(14) == 7
    filled = [layer for layer in dyn.cache.layers if layer.is_initialized]
    assert all(layer.keys.shape[-2] == 14 - 7 + 1 for layer in filled)  # one token decoded after the rebuild


def test_dropped_tokens_spend_the_same_budget_as_skipped_submodules():
    """Dropping context tokens saves each kept attention 2 x heads x head_dim multiply-adds per token and
    decoded token: that much of the budget is spent first, and an attention skipped gives up its share."""
    dyn = skipper(budget=0.25, tokens=0.5, window=2)
    cost = dyn.token_cost
    cfg = dyn.model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert cost[0] == pytest.approx(2 * cfg.num_attention_heads * head / dyn.adapter.layer_param_count(0) / 4)
    harm = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 6.0, 7.0, 8.0], dtype=torch.float64)
    dyn.savings = {s: 0.1 for s in dyn.candidates}
    dyn.token_cost = [0.005] * 4  # 5 tokens dropped in 4 attentions: 0.1 of 0.25 spent first
    chosen = dyn.choose(harm, dropped=5)
    assert chosen == frozenset([dyn.candidates[1], dyn.candidates[3]])  # two FFNs complete it
    assert dyn.choose(harm, dropped=0) == chosen | {dyn.candidates[2]}  # without: a third is needed
    dyn.token_cost = [0.02] * 4  # the dropped tokens alone meet the budget
    assert dyn.choose(harm, dropped=5) == frozenset()
    dyn.token_cost = [0.01] * 4
    dyn.savings = {s: 0.04 if s.kind == "attn" else 0.1 for s in dyn.candidates}
    # an attention saves 0.04 - 5 x 0.01 < 0: skipping it costs budget; one FFN completes the 0.05 left
    assert dyn.choose(harm, dropped=5) == frozenset([dyn.candidates[1]])
    assert dyn.drop_count(10) == 5 and dyn.drop_count(4) == 1  # the first token and the window stay


def test_a_sliding_window_cache_refuses_to_drop_tokens():
    dyn = skipper("gemma3", tokens=0.5, window=2)
    with pytest.raises(SubFitError, match="runner.tokens: a sliding-window"):
        dyn.prefill(torch.randint(0, 100, (1, 12)))


def test_subfit_run_drops_prompt_tokens_within_the_budget_and_the_folder_keeps_doing_so(tmp_path, capsys):
    """``runner.tokens``: every held-out prompt drops its share from the cache, the reported sparsity counts
    what that saves, the KV cache per token is at most the dense one less the dropped share, and the saved folder generates
    the same way. A model with sliding-window attentions is refused in one line, and nothing is written."""
    from conftest import write_local_model_and_text

    from subfit_core.apps.cli import run_main
    from subfit_plugins.dynamic.runner import load_dynamic

    folder = write_local_model_and_text(tmp_path, seed=3, lines=600, layers=4)
    runs = {}
    for tokens in (0.0, 0.25):
        out = tmp_path / f"out{tokens}"
        assert run_main(dynamic_args(folder, "sparsity=0.25", f"runner.tokens={tokens}", "runner.window=4",
                                     f"output_dir={out}")) == 0
        runs[tokens] = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    with_drop, without = runs[0.25], runs[0.0]
    assert with_drop["dynamic"]["prompt_tokens_dropped"] == 4 == round(0.25 * 16)  # half of 32 tokens is the prompt
    assert without["dynamic"]["prompt_tokens_dropped"] == 0
    assert with_drop["sparsity"]["achieved_layers"] >= 0.25 - 1e-9
    per_token = with_drop["kv_cache_bytes_per_token"]
    assert per_token["after"] <= per_token["before"] * (32 - 4) / 32 + 1  # 4 of each window's 32 positions hold nothing
    dyn = load_dynamic(tmp_path / "out0.25")
    assert dyn.p.tokens == 0.25 and dyn.p.window == 4
    ids = dyn.generate(torch.randint(0, 100, (1, 16)), 5)
    assert ids.shape == (1, 21) and dyn.counts["dropped"] >= 4

    gemma = write_local_model_and_text(tmp_path / "g", seed=3, lines=300, layers=4, arch="gemma3")
    assert run_main(dynamic_args(gemma, "runner.tokens=0.25", f"output_dir={tmp_path / 'g' / 'out'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("subfit-run: error: runner.tokens: 0.25; this model has sliding-window attentions")
    assert not (tmp_path / "g" / "out").exists()


def test_a_shared_basis_whose_members_sort_apart_as_names_loads_back_in_every_loader(tmp_path):
    """FFN candidates share one basis; the folder stores it once, under the name every loader rebuilds
    it with (the group's first member in layer order, L2 here), not the alphabetically first ("10_ffn")
    that safetensors would pick: ``load_dynamic``, ``load_compressed`` and transformers' remote code load
    the same weights, with no key missing or unexpected."""
    from conftest import write_local_model_and_text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subfit_core import load_compressed
    from subfit_plugins.dynamic.runner import load_dynamic, save_dynamic
    from subfit_plugins.fitters.shared_basis import SharedBasisBypass

    folder = write_local_model_and_text(tmp_path, seed=3, lines=10, layers=12)
    model = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
    d, r = model.config.hidden_size, 4
    g = torch.Generator().manual_seed(0)
    basis = torch.nn.Parameter(torch.randn(r, d, generator=g), requires_grad=False)  # one Parameter, as fitted
    bypasses = {Submodule(layer, "ffn"): SharedBasisBypass(basis, torch.randn(d, r, generator=g), torch.randn(d, generator=g),
                                                           "shared-ffn") for layer in (10, 7, 2)}
    dyn = DynamicSkip(find_adapter(get_plugins(), model), bypasses, {s: 1 / 24 for s in bypasses},
                      DynamicParams(budget=0.05, probes=2, every=0))
    results = {"model": {"name": "tiny"}, "strategy": "subfit-dynamic", "sparsity": {"requested": 0.05, "unit": "layers"},
               "dynamic": {"candidates": [s.name for s in dyn.candidates], "params": {"probes": 2, "every": 0}},
               "perplexity": {"dense": 1.0, "compressed": 1.0, "ratio": 1.0}}
    save_dynamic(dyn, AutoTokenizer.from_pretrained(folder / "model"), tmp_path / "out",
                 {"sparsity_unit": "layers", "runner": {"name": "dynamic"}}, results)

    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "dynamic.safetensors"), "pt") as f:
        assert sorted(k for k in f.keys() if k.endswith("basis")) == ["2_ffn.basis"]  # once, at the group's first
    expected = {s: (b.basis_matrix(), b.coef) for s, b in bypasses.items()}
    loaded = load_dynamic(tmp_path / "out")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    packed, _ = load_compressed(tmp_path / "out")
    for s, (u, c) in expected.items():
        for got in (loaded.bypasses[s], remote.subfit_bypasses[f"{s.layer}_ffn"], packed.subfit_bypasses[f"{s.layer}_ffn"]):
            assert torch.equal(got.basis_matrix(), u) and torch.equal(got.coef, c)


# Runs in a fresh interpreter that cannot import SubFit: transformers loads the folder's own code.
STANDARD = NO_SUBFIT + textwrap.dedent('''
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        dense = bool(torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits))
    out = model.generate(ids, max_new_tokens=7, do_sample=False)
    with torch.no_grad():
        after = bool(torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits))
    try:
        model.generate(ids.repeat(2, 1), max_new_tokens=2)
        batch = "accepted"
    except ValueError as exc:
        batch = str(exc)
    assert not [m for m in sys.modules if m.startswith("subfit")], "SubFit was imported"
    print(json.dumps({"class": type(model).__name__, "plain": type(plain).__name__, "tokens": out.tolist(),
                      "skipped": [list(s) for s in model.subfit_last], "dense": dense, "after": after,
                      "batch": batch}))
''')


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_standard_tools_generate_with_the_same_per_prompt_choice(arch, tmp_path, capsys):
    """``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, in an interpreter without
    SubFit, chooses from the same seeded probes as ``load_dynamic`` (choosing once), skips that set
    inside transformers' own ``generate`` and gives the same tokens; its plain forward is the dense
    model before and after, its weights load without a warning, and a batch is refused in one line.
    Without remote code the folder loads as the plain dense model; ``load_compressed`` gives the same
    model without running the folder's file, and refuses a tampered spec or an unknown runner in one line."""
    from conftest import write_local_model_and_text

    from subfit_core import load_compressed
    from subfit_core.apps.cli import run_main
    from subfit_plugins.dynamic.runner import load_dynamic

    folder = write_local_model_and_text(tmp_path, seed=3, lines=600, layers=4, arch=arch)
    out = tmp_path / "out"
    assert run_main(dynamic_args(folder, "sparsity=0.25", "runner.every=0", f"output_dir={out}")) == 0
    capsys.readouterr()
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(5))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", STANDARD, str(out), json.dumps(ids.tolist())],
                          capture_output=True, text=True, cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert "not initialized" not in done.stderr and "newly initialized" not in done.stderr, done.stderr[-2000:]
    assert got["class"] == "SubFitDynamicForCausalLM" and got["plain"] != got["class"]
    assert got["dense"] and got["after"]  # forward alone is the dense model; generate restores it
    assert got["batch"].startswith("SubFitDynamicForCausalLM.generate: per-prompt skipping chooses for one prompt")

    dyn = load_dynamic(out)
    tokens = dyn.generate(ids, 7)
    assert got["skipped"] and {tuple(s) for s in got["skipped"]} == {(s.layer, s.kind) for s in dyn.last_choice}
    assert got["tokens"] == tokens.tolist()

    # load_compressed hands the folder to its runner: the same model, built from SubFit's own source
    model, tokenizer = load_compressed(out)
    assert type(model).__name__ == "SubFitDynamicForCausalLM" and tokenizer is not None
    assert model.generate(ids, max_new_tokens=7, do_sample=False).tolist() == tokens.tolist()
    assert [list(s) for s in model.subfit_last] == got["skipped"]
    config = json.loads((out / "config.json").read_text())
    config["subfit_dynamic"]["candidates"][0]["layer"] = 99
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SubFitError, match=r"load_compressed: .*config.json': subfit_dynamic: candidate L99\.\w+ is not a "
                                          r"submodule of this model"):
        load_compressed(out)
    config["subfit_runner"] = "dynamc"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SubFitError, match=r"load_compressed: .*config.json': subfit_runner: unknown runner 'dynamc'.*"
                                          r"dynamic"):
        load_compressed(out)
