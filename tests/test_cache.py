"""The statistics cache: keyed by its layout version, bounded in size, least recently used first."""

from __future__ import annotations

import os
import time

import pytest
import torch

from subfit_core.engine import cache
from subfit_core.errors import SubFitError


def write(folder, name: str, nbytes: int, age_s: float):
    path = folder / f"{name}.safetensors"
    path.write_bytes(b"\0" * nbytes)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_evict_removes_least_recently_used_until_under_the_limit(tmp_path):
    old = write(tmp_path, "old", 400, age_s=300)
    mid = write(tmp_path, "mid", 400, age_s=200)
    new = write(tmp_path, "new", 400, age_s=100)
    gone = cache.evict(tmp_path, limit=900, keep=new)
    assert gone == [old]
    assert mid.exists() and new.exists()


def test_evict_never_deletes_the_file_just_written(tmp_path):
    big = write(tmp_path, "big", 5000, age_s=500)  # oldest, and over the limit on its own
    other = write(tmp_path, "other", 10, age_s=10)
    assert cache.evict(tmp_path, limit=100, keep=big) == [other]
    assert big.exists()


def test_save_evicts_and_load_marks_a_file_as_used(tmp_path, tiny_model, random_windows, monkeypatch):
    from subfit_core.engine.workbench import Workbench
    from subfit_plugins.adapters.llama import LlamaFamilyAdapter

    model = tiny_model("llama")
    bench = Workbench(model, LlamaFamilyAdapter(model), random_windows(), 4, torch.device("cpu"))
    bench.collect()
    first = tmp_path / "a.safetensors"
    cache.save_stats(first, bench.stats)
    size = first.stat().st_size
    t = time.time() - 1000
    os.utime(first, (t, t))
    assert cache.load_stats(first, bench.subs, bench.adapter.hidden_size) is not None
    assert first.stat().st_mtime > t + 500  # read: now the most recently used
    monkeypatch.setenv("SUBFIT_CACHE_MAX_GB", str(1.5 * size / 1e9))
    second = tmp_path / "b.safetensors"
    os.utime(first, (t, t))
    cache.save_stats(second, bench.stats)  # two files exceed 1.5 x one: the older goes
    assert second.exists() and not first.exists()


def test_key_depends_on_the_layout_version(tiny_model, monkeypatch):
    model = tiny_model("llama")
    ids = torch.zeros(2, 8, dtype=torch.long)
    before = cache.stats_key("tiny", model, "float32", ids)
    monkeypatch.setattr(cache, "STATS_VERSION", cache.STATS_VERSION + 1)
    assert cache.stats_key("tiny", model, "float32", ids) != before


def test_key_sees_weights_changed_in_place_even_with_the_same_sums(tiny_model):
    """Rows permuted (a checkpoint converted again with another head layout keeps every sum): the key,
    hence the statistics, samples and evaluations, changes; the same weights give the same key."""
    model = tiny_model("llama")
    ids = torch.zeros(2, 8, dtype=torch.long)
    before = cache.stats_key("tiny", model, "float32", ids)
    assert cache.stats_key("tiny", tiny_model("llama"), "float32", ids) == before
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        w.copy_(w.flip(0))
    assert cache.stats_key("tiny", model, "float32", ids) != before


def test_bad_size_limit_names_the_variable(monkeypatch):
    monkeypatch.setenv("SUBFIT_CACHE_MAX_GB", "lots")
    with pytest.raises(SubFitError, match=r"^SUBFIT_CACHE_MAX_GB: 'lots' is not a number; give a size in GB"):
        cache.max_cache_bytes()
