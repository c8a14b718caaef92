"""Low-rank factorization: the closed forms against brute force, SVD-LLM's truncation loss, anchoring
with identical streams, non-positive-definite Gram matrices, the streamed stage on tiny models
(ranks, refinement, restore), the hybrid budget split, save/load and parameter accounting."""

from __future__ import annotations

import json

import pytest
import torch

from subfit_core.artifact.folder import load_compressed, save_compressed
from subfit_core.config import validate
from subfit_core.engine.factorize import factorize, parameter_counts
from subfit_core.engine.lowrank import (
    FactoredLinear,
    allocate_ranks,
    regularised_cholesky,
    uniform_rank,
)
from subfit_core.engine.models import find_adapter
from subfit_core.engine.pipeline import Session, build_components, compress
from subfit_core.engine.surgery import records
from subfit_core.engine.workbench import Workbench
from subfit_core.errors import ConfigError, SubFitError
from subfit_core.plugins import build_component, get_plugins
from subfit_plugins.factorizers.closed_forms import (
    factor_anchored,
    factor_plain,
    factor_whitened,
    spectrum_whitened,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def anchored_objective(W, X, X_hat, W_prime):
    return float((X @ W.T - X_hat @ W_prime.T).square().sum())


def random_streams(n=6, m=5, tokens=40, drift=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    X_hat = X + drift * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return W, X, X_hat


def brute_force(W, X, X_hat, rank, starts=4):
    """min over W' = B A (m x k, k x n) by L-BFGS from random starts: no closed form involved."""
    best = float("inf")
    g = torch.Generator().manual_seed(1)
    for _ in range(starts):
        B = torch.randn(W.shape[0], rank, generator=g, dtype=torch.float64).requires_grad_()
        A = torch.randn(rank, W.shape[1], generator=g, dtype=torch.float64).requires_grad_()
        opt = torch.optim.LBFGS([A, B], max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (X @ W.T - X_hat @ (B @ A).T).square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        best = min(best, anchored_objective(W, X, X_hat, (B @ A).detach()))
    return best


@pytest.mark.parametrize("rank", [1, 3])
def test_anchored_closed_form_is_the_brute_force_optimum(rank):
    W, X, X_hat = random_streams()
    f = factor_anchored(W, X_hat.T @ X_hat, X.T @ X_hat, rank)
    closed = anchored_objective(W, X, X_hat, f.weight())
    searched = brute_force(W, X, X_hat, rank)
    assert f.rank == rank and torch.linalg.matrix_rank(f.weight()) == rank
    assert closed <= searched * (1 + 1e-9)  # nothing found beats it
    assert searched == pytest.approx(closed, rel=1e-6)  # and the search reaches it
    # the excess over the unconstrained least-squares optimum is the sum of the dropped sigma^2
    full = torch.linalg.lstsq(X_hat, X @ W.T).solution.T
    excess = closed - anchored_objective(W, X, X_hat, full)
    assert excess == pytest.approx(f.truncation_loss**2, rel=1e-8)


def test_ridge_is_the_optimum_of_the_penalised_objective():
    # ||X W^T - X_hat W'^T||^2 + mu ||W'||^2 is the plain objective on streams augmented by
    # sqrt(mu) I (inputs) and 0 (targets), so the brute force over factors runs on those
    W, X, X_hat = random_streams(seed=5)
    C, M = X_hat.T @ X_hat, X.T @ X_hat
    ridge = 0.05
    mu = ridge * float(C.diagonal().mean())
    f = factor_anchored(W, C, M, 2, ridge=ridge)
    eye = torch.eye(X.shape[1], dtype=X.dtype)
    X_aug, X_hat_aug = torch.cat([X, 0 * eye]), torch.cat([X_hat, mu**0.5 * eye])
    penalised = anchored_objective(W, X, X_hat, f.weight()) + mu * float(f.weight().square().sum())
    assert penalised == pytest.approx(anchored_objective(W, X_aug, X_hat_aug, f.weight()), rel=1e-12)
    assert penalised == pytest.approx(brute_force(W, X_aug, X_hat_aug, 2), rel=1e-6)
    # and the penalty shrinks the factors: the unpenalised fit has the larger norm
    assert float(f.weight().norm()) < float(factor_anchored(W, C, M, 2).weight().norm())


def test_blending_interpolates_to_the_shifted_only_objective():
    W, X, X_hat = random_streams(seed=2)
    C, M = X_hat.T @ X_hat, X.T @ X_hat
    shifted_only = factor_anchored(W, C, M, 2, alpha=0.0)  # target W X_hat: SVD-LLM on the shifted inputs
    torch.testing.assert_close(shifted_only.weight(), factor_whitened(W, C, 2).weight())
    half = factor_anchored(W, C, M, 2, alpha=0.5).weight()
    target = 0.5 * X @ W.T + 0.5 * X_hat @ W.T  # alpha M + (1 - alpha) C is the cross-Gram of this target
    assert float((target - X_hat @ half.T).square().sum()) <= float((target - X_hat @ shifted_only.weight().T).square().sum())


def test_whitened_truncation_loss_is_the_root_of_the_dropped_squared_singular_values():
    W, X, _ = random_streams(n=8, m=7, tokens=50, seed=3)
    for rank in (1, 4, 6):
        f = factor_whitened(W, X.T @ X, rank)
        direct = float((X @ W.T - X @ f.weight().T).norm())
        assert direct == pytest.approx(float(f.sigma[rank:].square().sum().sqrt()), rel=1e-9)
        assert direct == pytest.approx(f.truncation_loss, rel=1e-9)
    # whitening is what makes it truncation-aware: plain SVD of W is worse on these inputs
    assert float((X @ W.T - X @ factor_plain(W, 4).weight().T).norm()) > factor_whitened(W, X.T @ X, 4).truncation_loss


def test_whitening_ridge_adds_the_weight_error_to_the_loss_and_tends_to_plain_svd():
    # G + mu I is the Gram of the inputs augmented by sqrt(mu) I: the truncation loss read off the
    # spectrum is then ||X (W - W')^T||^2 + mu ||W - W'||^2, and as mu grows the whitening fades
    W, X, _ = random_streams(n=8, m=7, tokens=50, seed=6)
    G = X.T @ X
    ridge = 0.3
    mu = ridge * float(G.diagonal().mean())
    f = factor_whitened(W, G, 3, ridge=ridge)
    error = W - f.weight()
    loss = float((X @ error.T).square().sum()) + mu * float(error.square().sum())
    assert loss**0.5 == pytest.approx(f.truncation_loss, rel=1e-9)
    # on the calibration inputs alone the paper's whitening (ridge 0) is the better fit ...
    assert float((X @ error.T).norm()) > factor_whitened(W, G, 3).truncation_loss
    # ... and a huge ridge gives plain SVD's truncation
    torch.testing.assert_close(factor_whitened(W, G, 3, ridge=1e9).weight(), factor_plain(W, 3).weight(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(spectrum_whitened(W, G, ridge=ridge), f.sigma)


def test_anchoring_with_identical_streams_is_svd_llm():
    W, X, _ = random_streams(seed=4)
    G = X.T @ X
    for rank in (2, 5):
        a, b = factor_anchored(W, G, G, rank), factor_whitened(W, G, rank)
        torch.testing.assert_close(a.weight(), b.weight(), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(a.sigma, b.sigma)


def test_non_positive_definite_gram_is_regularised_and_reported():
    W, X, _ = random_streams(seed=5)
    X[:, 2] = 0.0  # a dead input feature: the Gram matrix is singular
    G = X.T @ X
    assert torch.linalg.cholesky_ex(G).info > 0
    L, shift = regularised_cholesky(G, "L0.attn.q_proj")
    assert shift > 0 and torch.isfinite(L).all()
    f = factor_anchored(W, G, G, 3, name="L0.attn.q_proj")
    assert f.shift == shift and torch.isfinite(f.weight()).all()
    # the fit on the live features is still truncation-aware (no worse than plain SVD)
    assert float((X @ W.T - X @ f.weight().T).norm()) <= float((X @ W.T - X @ factor_plain(W, 3).weight().T).norm())


def test_uniform_rank_formula_and_adaptive_allocation_within_budget():
    assert uniform_rank(0.8, 576, 576) == int(0.8 * 576 * 576 / 1152)
    assert uniform_rank(0.6, 1536, 576) == int(0.6 * 1536 * 576 / 2112)
    g = torch.Generator().manual_seed(0)
    shapes = {"flat": (40, 30), "steep": (40, 30), "wide": (60, 30)}
    spectra = {"flat": torch.ones(30), "steep": 0.5 ** torch.arange(30.0), "wide": torch.rand(30, generator=g).sort(descending=True).values}
    ranks = allocate_ranks(spectra, shapes, 0.5)
    assert sum(ranks[k] * sum(shapes[k]) for k in ranks) <= 0.5 * sum(m * n for m, n in shapes.values())
    assert ranks["flat"] > ranks["steep"]  # a flat spectrum needs more rank to keep the same share


# ----------------------------------------------------------------------------- the stage on tiny models


def bench_for(tiny_model, random_windows, calib=8, seq_len=16):
    model = tiny_model()
    bench = Workbench(model, find_adapter(get_plugins(), model), random_windows(calib=calib, seq_len=seq_len), 4,
                      torch.device("cpu"))
    bench.collect()
    return bench


def factorizer(name, **params):
    return build_component(get_plugins(), "factorizer", {"name": name, **params}, "factorizer")


def test_first_anchored_linears_equal_svd_llm_and_later_ones_see_the_drift(tiny_model, random_windows):
    bench = bench_for(tiny_model, random_windows)
    model = bench.model
    factored = {}
    for name, params in (("svd-llm", {}), ("aa-svd", {"ridge": 0.0})):  # the paper's objective: no penalty
        res = factorize(bench, factorizer(name, **params), 0.5, set())
        factored[name] = {s.name: f.up.detach() @ f.down.detach() for s, f in res.factored.items()}
        bench.restore()
    a, b = factored["aa-svd"], factored["svd-llm"]
    for proj in ("q_proj", "k_proj", "v_proj"):  # nothing is compressed in front of layer 0's attention
        torch.testing.assert_close(a[f"L0.attn.{proj}"], b[f"L0.attn.{proj}"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a["L2.ffn.down_proj"], b["L2.ffn.down_proj"], atol=1e-4)
    assert all(isinstance(m, torch.nn.Linear) for m in model.model.layers[0].self_attn.children())  # restored


def test_stage_reports_a_regularised_gram_and_refinement_lowers_the_layer_loss(tiny_model, random_windows):
    # 1 window of 8 tokens: fewer tokens than the 32 input features, so no Gram matrix is positive definite
    bench = bench_for(tiny_model, random_windows, calib=1, seq_len=8)
    res = factorize(bench, factorizer("aa-svd", ridge=0.0), 0.5, set())  # no ridge: the shift must do it
    assert res.regularised and all(r["shift"] > 0 for r in res.regularised)
    assert all(torch.isfinite(p).all() for f in res.factored.values() for p in f.parameters())
    bench.restore()

    bench = bench_for(tiny_model, random_windows)
    res = factorize(bench, factorizer("aa-svd", refine_steps=30, refine_lr=1e-3), 0.5, set())
    assert len(res.refinement) == 4
    assert all(r["mse_after"] <= r["mse_before"] for r in res.refinement)
    assert any(r["kept"] and r["mse_after"] < 0.99 * r["mse_before"] for r in res.refinement)
    assert not any(p.requires_grad for p in bench.model.parameters() if p.grad is not None)
    assert res.seconds["refine_s"] > 0


def make_session(tiny_model, random_windows, **cfg_overrides):
    model = tiny_model()
    adapter = find_adapter(get_plugins(), model)
    windows = random_windows(calib=8, seq_len=16)
    bench = Workbench(model, adapter, windows, 4, torch.device("cpu"))
    bench.collect()
    cfg = validate({"eval": {"batch_size": 2}, **cfg_overrides})
    return cfg, Session(cfg, model, None, "tiny", adapter, windows, torch.device("cpu"), torch.float32,
                        dense_ppl=100.0, dense_forward_s=1.0, bench=bench)


def decoder_param_count(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


@pytest.mark.parametrize("name,extra", [("svd", {}), ("svd-llm", {"ranks": "adaptive"}), ("aa-svd", {})])
def test_standalone_budget_and_parameter_accounting(tiny_model, random_windows, name, extra):
    cfg, session = make_session(tiny_model, random_windows, factorizer={"name": name, "kept_ratio": 0.6, **extra})
    before = decoder_param_count(session.model)
    linear, decoder = parameter_counts(session.bench)
    total = 0.4 * linear / decoder
    outcome = compress(session, cfg)
    res = outcome.results
    after = decoder_param_count(session.model)
    assert res["replaced"] == [] and res["decoder_params"]["before"] == before
    assert res["decoder_params"]["after"] == after  # the factors are counted, shared nothing
    fz = res["factorization"]
    assert fz["linears"] == 4 * 7 and fz["linear_params_after"] <= 0.6 * fz["linear_params_before"]
    assert res["sparsity"]["achieved_params"] == pytest.approx(1 - after / before)
    assert res["sparsity"]["achieved_params"] >= res["sparsity"]["requested"] - 1e-12  # ranks are rounded down
    assert res["sparsity"]["requested"] == pytest.approx(total)
    session.bench.restore()
    assert decoder_param_count(session.model) == before


def test_hybrid_splits_one_total_budget(tiny_model, random_windows):
    cfg, session = make_session(tiny_model, random_windows, sparsity_unit="params",
                                fitter={"name": "per-type", "attn": {"name": "low-rank", "rank": 4},
                                        "ffn": {"name": "shared-basis", "rank": 8}},
                                selector={"name": "greedy", "rounds": 1},
                                factorizer={"name": "aa-svd", "kept_ratio": 0.6, "removal_share": 0.5})
    before = decoder_param_count(session.model)
    res = compress(session, cfg).results
    assert res["replaced"], "removal took part of the budget"
    replaced = {(r["layer"], r["type"]) for r in res["replaced"]}
    factored_subs = {tuple(k.split(".")[:2]) for k in res["factorization"]["ranks"]}
    assert not factored_subs & {(f"L{l}", t) for l, t in replaced}  # a replaced submodule is not factored
    total = res["sparsity"]["requested"]
    # ranks are rounded down, which on 32-wide matrices overshoots by a few percent
    assert total - 1e-9 <= res["sparsity"]["achieved_params"] <= total + 0.03
    assert res["decoder_params"]["after"] == decoder_param_count(session.model)
    assert decoder_param_count(session.model) < before
    session.bench.restore()


def test_factored_model_saves_and_loads_with_identical_logits(tiny_model, random_windows, tmp_path):
    from test_surgery import tiny_tokenizer

    cfg, session = make_session(tiny_model, random_windows, sparsity_unit="params",
                                fitter={"name": "per-type", "attn": {"name": "low-rank", "rank": 4},
                                        "ffn": {"name": "linear"}},
                                selector={"name": "greedy", "rounds": 1},
                                factorizer={"name": "aa-svd", "kept_ratio": 0.7, "removal_share": 0.3})
    outcome = compress(session, cfg)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = session.model(input_ids=ids).logits
    out = tmp_path / "model"
    save_compressed(session.model, tiny_tokenizer(), records(outcome.bypasses), out, cfg, outcome.results,
                    outcome.factored_records())
    saved = json.loads((out / "config.json").read_text())["subfit"]["factored"]
    assert len(saved) == outcome.results["factorization"]["linears"]
    assert {"layer", "kind", "linear", "in", "out", "rank", "bias"} <= set(saved[0])
    loaded, _ = load_compressed(out)
    assert sum(isinstance(m, FactoredLinear) for m in loaded.modules()) == len(saved)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)
    assert decoder_param_count(loaded) == outcome.results["decoder_params"]["after"]
    session.bench.restore()


def test_factorize_section_is_validated():
    plugins = get_plugins()
    with pytest.raises(ConfigError, match=r"factorizer.kept_ratio: .*set factorizer.name first"):
        build_components(plugins, validate({"factorizer": {"kept_ratio": 0.5}}))
    with pytest.raises(ConfigError, match=r"factorizer: kept_ratio: 1.5 must be in \(0, 1\)"):
        build_components(plugins, validate({"factorizer": {"name": "svd", "kept_ratio": 1.5}}))
    with pytest.raises(ConfigError, match=r"factorizer.alpha: unknown key.*svd-llm|factorizer.alpha: unknown key"):
        build_components(plugins, validate({"factorizer": {"name": "svd-llm", "alpha": 0.5}}))
    with pytest.raises(ConfigError, match=r"factorizer: ridge: -0.1 must be >= 0"):
        build_components(plugins, validate({"factorizer": {"name": "svd-llm", "ridge": -0.1}}))
    with pytest.raises(ConfigError, match=r"factorizer.ranks: 'greedy' is not allowed; allowed: adaptive, uniform"):
        build_components(plugins, validate({"factorizer": {"name": "aa-svd", "ranks": "greedy"}}))
    with pytest.raises(SubFitError, match="factorizer.name: unknown factorizer 'aasvd'.*did you mean 'aa-svd'"):
        build_components(plugins, validate({"factorizer": {"name": "aasvd"}}))
    assert build_components(plugins, validate({})).factorizer is None


def test_the_stage_hands_the_factorizer_weights_and_statistics_on_fit_device(tiny_model, random_windows, monkeypatch):
    """Every weight and Gram a factorizer reads comes on ``bench.fit_device`` (meta stands in for a GPU:
    data-less, so an input left anywhere else shows), and its factors go to the model's device."""
    from subfit_plugins.factorizers.closed_forms import factor_plain

    bench = bench_for(tiny_model, random_windows)
    bench.fit_device = torch.device("meta")
    fz, seen = factorizer("svd-llm", ranks="adaptive"), []  # adaptive: the spectra are read too

    def spectrum(name, weight, gram):
        seen.append((weight.device.type, gram.device.type))
        return torch.linspace(1.0, 0.1, min(weight.shape), dtype=torch.float64)

    def factor(name, weight, stats, rank):
        seen.append((weight.device.type, stats.gram.device.type))
        return factor_plain(torch.randn(weight.shape, dtype=torch.float64), rank)

    monkeypatch.setattr(fz, "spectrum", spectrum)
    monkeypatch.setattr(fz, "factor", factor)
    res = factorize(bench, fz, 0.5, set())
    assert len(seen) == 2 * len(res.factored) > 0 and set(seen) == {("meta", "meta")}
    assert all(p.device.type == "cpu" for f in res.factored.values() for p in f.parameters())
    bench.restore()


def test_closed_forms_make_every_tensor_on_their_inputs_device():
    """With the default device set to meta, a tensor made without a device lands there and the
    factorization fails or changes: every closed form follows its inputs (the GPU case, on a CPU)."""
    W, X, X_hat = random_streams(n=6, m=5, tokens=40)
    gram, gram_hat, cross = X.T @ X, X_hat.T @ X_hat, X.T @ X_hat

    def every():
        return [factor_plain(W, 3).up, factor_whitened(W, gram, 3).down, spectrum_whitened(W, gram),
                factor_anchored(W, gram_hat, cross, 3, 0.5, ridge=1e-3).down]

    expected = every()
    with torch.device("meta"):
        got = every()
    assert all(g.device.type == "cpu" and torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_refinement_of_half_precision_factors_lowers_the_loss_at_the_recipes_rate(tiny_model, random_windows, dtype):
    """The optimizer steps float32 copies: stepping bf16 factors directly at lr 1e-4 rounds every
    step away (nothing kept), and fp16's AdamW eps rounds to 0 (NaN)."""
    model = tiny_model().to(dtype)
    bench = Workbench(model, find_adapter(get_plugins(), model), random_windows(calib=8, seq_len=16), 4, torch.device("cpu"))
    bench.collect()
    res = factorize(bench, factorizer("aa-svd", refine_steps=30, refine_lr=1e-4), 0.5, set())
    assert all(torch.isfinite(p).all() for f in res.factored.values() for p in f.parameters())
    assert all(f.up.dtype == dtype for f in res.factored.values())
    assert any(r["kept"] and r["mse_after"] < 0.999 * r["mse_before"] for r in res.refinement), res.refinement
    bench.restore()
