"""Cross-domain evaluation and calibration text sampled from the dense model itself."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from subfit_core.apps.cli import resolve_recipe
from subfit_core.engine.pipeline import compress, mix_generated, open_session
from subfit_core.engine.sampling import sample_windows, start_token
from subfit_core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
BOS = SimpleNamespace(bos_token_id=5, eos_token_id=7)
START = 5


def test_samples_start_with_bos_and_are_seeded(tiny_model):
    model = tiny_model()
    ids = sample_windows(model, START, count=3, seq_len=12, seed=0, batch_size=2, device=CPU)
    assert ids.shape == (3, 12) and ids.dtype == torch.long
    assert (ids[:, 0] == 5).all() and ids.max() < 128
    assert torch.equal(ids, sample_windows(model, START, 3, 12, 0, 2, CPU))
    assert not torch.equal(ids, sample_windows(model, START, 3, 12, 1, 2, CPU))
    assert len({tuple(row.tolist()) for row in ids}) == 3  # pure sampling: no two windows alike


def test_samples_follow_the_model(tiny_model):
    # a head whose only non-zero rows are +v and -v (tokens 9 and 10): whatever the hidden state h,
    # one of the two gets a logit of 50 |v.h| and every other token 0, so the samples are (almost) only 9 and 10
    model = tiny_model()
    v = torch.sign(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[9], model.lm_head.weight[10] = 50.0 * v, -50.0 * v
    ids = sample_windows(model, START, 2, 16, 0, 2, CPU)
    assert torch.isin(ids[:, 1:], torch.tensor([9, 10])).float().mean() > 0.9


def test_samples_ignore_the_models_own_generation_settings(tiny_model):
    """Pure samples: a repetition penalty or suppressed tokens in the model's generation_config (which
    generate would apply, and the cache key does not cover) do not shape them."""
    model = tiny_model()
    plain = sample_windows(model, START, 2, 12, 0, 2, CPU)
    model.generation_config.suppress_tokens = list(range(64))
    model.generation_config.repetition_penalty = 50.0
    assert torch.equal(sample_windows(model, START, 2, 12, 0, 2, CPU), plain)
    assert model.generation_config.repetition_penalty == 50.0  # the model's own settings are put back


def test_samples_are_read_back_from_the_cache(tiny_model, tmp_path, monkeypatch):
    model = tiny_model()
    first = sample_windows(model, START, 2, 10, 0, 2, CPU, cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("sampled again despite the cache"))
    assert torch.equal(first, sample_windows(model, START, 2, 10, 0, 2, CPU, cache=tmp_path))
    monkeypatch.undo()  # another batch size draws other text: it is sampled, not read as the first
    other = sample_windows(model, START, 2, 10, 0, 1, CPU, cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert torch.equal(other, sample_windows(model, START, 2, 10, 0, 1, CPU)) and not torch.equal(other, first)


def test_samples_start_from_bos_else_eos_else_a_calibration_token():
    assert start_token(BOS, fallback=3) == 5
    assert start_token(SimpleNamespace(bos_token_id=None, eos_token_id=7), fallback=3) == 7
    assert start_token(SimpleNamespace(bos_token_id=None, eos_token_id=None), fallback=torch.tensor(3)) == 3


@pytest.mark.parametrize("share, calib_kept, scoring_kept", [(0.5, 4, 2), (0.0, 8, 4), (1.0, 0, 0), (0.25, 6, 3)])
def test_generated_share_replaces_the_last_windows(tiny_model, random_windows, share, calib_kept, scoring_kept):
    windows = random_windows(calib=8, scoring=4, heldout=2, seq_len=16)
    calib, scoring = windows.calib.clone(), windows.scoring.clone()
    cfg = resolve_recipe([f"calib.generated={share}", "calib.seq_len=16", "cache_stats=false"])
    mix_generated(windows, cfg, tiny_model(), BOS, CPU)
    assert windows.calib.shape == calib.shape and windows.scoring.shape == scoring.shape
    assert torch.equal(windows.calib[:calib_kept], calib[:calib_kept])
    assert torch.equal(windows.scoring[:scoring_kept], scoring[:scoring_kept])
    assert (windows.calib[calib_kept:, 0] == 5).all() and (windows.scoring[scoring_kept:, 0] == 5).all()
    assert ("sampled from the dense model" in windows.source) == (share > 0)


@pytest.mark.parametrize("value", ["1.5", "-0.1", ".nan"])
def test_generated_share_is_validated(value):
    with pytest.raises(ConfigError, match="calib.generated"):
        resolve_recipe([f"calib.generated={value}"])


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    from conftest import write_local_model_and_text

    folder = write_local_model_and_text(tmp_path_factory.mktemp("domains"), seed=1, lines=1200)
    # a second domain: the same vocabulary, another structure (each word predicts word + 7)
    other = [" ".join(f"t{(w + 7 * k) % 120}" for k in range(8)) for w in range(0, 1200)]
    (folder / "other.txt").write_text("\n".join(other))
    return folder


def domain_args(folder, *extra):
    return ["strategy=subfit", f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "sparsity=0.25",
            "calib.samples=8", "calib.seq_len=32", "scoring.samples=2", "eval.windows=4", "eval.seq_len=32",
            "cache_stats=false", "save=false", "calib.generated=0.5",
            f"eval.domains=[{folder / 'text.txt'},{folder / 'other.txt'}]", *extra]


def test_every_run_reports_each_domain_and_the_out_of_domain_mean(two_domains):
    cfg = resolve_recipe(domain_args(two_domains))
    session = open_session(cfg)
    res = compress(session, cfg).results
    domains = res["perplexity"]["domains"]
    calib, other = str(two_domains / "text.txt"), str(two_domains / "other.txt")
    assert list(domains) == [calib, other]
    assert domains[calib]["calibrated"] and not domains[other]["calibrated"]
    assert domains[calib]["compressed"] == res["perplexity"]["compressed"]  # the headline domain, measured once
    for d in domains.values():
        assert math.isclose(d["ratio"], d["compressed"] / d["dense"])
        assert d["dense"] > 1 and d["compressed"] > 1
    assert math.isclose(res["perplexity"]["out_of_domain_ratio"], domains[other]["ratio"])
    assert domains[other]["dense"] != domains[calib]["dense"]  # really another text
    assert "sampled from the dense model" in res["data"]["source"]


def test_no_other_domain_means_no_out_of_domain_mean(two_domains):
    cfg = resolve_recipe(domain_args(two_domains, f"eval.domains=[{two_domains / 'text.txt'}]", "calib.generated=0"))
    res = compress(open_session(cfg), cfg).results
    assert res["perplexity"]["out_of_domain_ratio"] is None
    assert list(res["perplexity"]["domains"]) == [str(two_domains / "text.txt")]


def test_an_unknown_domain_fails_before_the_model_loads(two_domains, monkeypatch):
    import subfit_core.engine.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    cfg = resolve_recipe(domain_args(two_domains, "eval.domains=[kjv,jargn]"))
    with pytest.raises(ConfigError, match=r"eval.domains: unknown text source 'jargn'; .*jargon"):
        open_session(cfg)
