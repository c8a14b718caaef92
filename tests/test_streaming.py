"""Layer-streamed execution (offload=gpus|cpu|disk): a model built without its weights computes exactly
what the in-memory model computes, holds no weights between modules, and a run in every mode
selects, fits and saves the same compressed model."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import build_tiny_model, write_local_model_and_text  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from subfit_core import load_compressed  # noqa: E402
from subfit_core.apps.cli import run_main  # noqa: E402
from subfit_core.artifact.folder import write_weights  # noqa: E402
from subfit_core.engine import streaming  # noqa: E402
from subfit_core.engine.streaming import build_streamed, checkpoint_sizes, place, resolve_offload  # noqa: E402
from subfit_core.errors import SubFitError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    model = build_tiny_model("llama", seed=4, num_hidden_layers=4, tie_word_embeddings=True).eval()
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards and an index
    assert (folder / "model.safetensors.index.json").is_file()
    return model, folder


@pytest.mark.parametrize("mode", ["disk", "cpu"])
def test_a_streamed_model_computes_what_the_loaded_one_does_and_keeps_nothing(sharded, mode):
    model, folder = sharded
    streamed, stream = build_streamed(folder, torch.float32, torch.device("cpu"), mode)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, model(ids).logits)
    assert stream.resident_bytes() == 0  # every module dropped its weights after it ran
    assert all(p.is_meta for p in streamed.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert stream.bytes_read >= total - model.lm_head.weight.numel() * 4  # each module read once per forward
    with stream.keep():  # inside a pass, what ran stays until the pass ends
        with torch.no_grad():
            streamed(ids)
        assert stream.resident_bytes() > 0
    assert stream.resident_bytes() == 0


def test_auto_keeps_a_model_that_fits_and_streams_one_that_does_not():
    cpu = torch.device("cpu")
    assert resolve_offload("auto", 1_000, cpu) == "none"
    assert resolve_offload("auto", 10**15, cpu) == "disk"
    assert resolve_offload("cpu", 1_000, cpu) == "cpu"


def test_auto_sizes_a_checkpoint_in_the_runs_dtype(tmp_path, monkeypatch):
    """A bf16 checkpoint run in float32 takes twice its file size: auto must measure that, not the file."""
    from subfit_core.engine.models import offload_mode
    from subfit_core.plugins import get_plugins

    model = build_tiny_model("llama", seed=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    half = sum(checkpoint_sizes(tmp_path, torch.bfloat16).values())
    room = int(half * streaming.HEADROOM * 1.5)  # the file fits with its headroom, the float32 weights do not
    monkeypatch.setattr(streaming, "available_memory", lambda device: room)
    cpu = torch.device("cpu")
    assert offload_mode(get_plugins(), str(tmp_path), "auto", cpu, torch.bfloat16) == "none"
    assert offload_mode(get_plugins(), str(tmp_path), "auto", cpu, torch.float32) == "disk"


def test_gpus_fills_the_storing_devices_first_in_checkpoint_order_and_refuses_what_does_not_fit():
    a, b, c = (torch.device("cuda", i) for i in (1, 2, 0))
    sizes = {"l0.q": 40, "l0.k": 40, "l1.q": 40, "l1.k": 40, "head": 30}
    placement = place(sizes, {a: 100, b: 60, c: 70})
    assert placement == {"l0.q": a, "l0.k": a, "l1.q": b, "l1.k": c, "head": c}
    assert place(sizes, {a: 100, b: 60, c: 69}) is None  # 229 bytes of room for 190, but no tensor is split
    assert place({}, {}) == {}
    # a decoder layer's tensors stay on one device (a mixture of experts stacks them when a module loads)
    layers = {"model.embed_tokens.weight": 30, **{f"model.layers.{i}.mlp.experts.{e}.w1.weight": 20
                                                   for i in range(2) for e in range(3)}, "lm_head.weight": 30}
    placement = place(layers, {a: 100, b: 60, c: 100})
    assert {placement[f"model.layers.0.mlp.experts.{e}.w1.weight"] for e in range(3)} == {a}
    assert {placement[f"model.layers.1.mlp.experts.{e}.w1.weight"] for e in range(3)} == {b}  # not 10 bytes left on a
    assert placement["lm_head.weight"] == c and place(layers, {a: 100, b: 59, c: 29}) is None


def test_auto_spreads_over_the_gpus_a_model_that_fits_across_them_but_not_on_one(monkeypatch):
    cuda = torch.device("cuda", 0)
    free = {0: 80, 1: 100, 2: 100}  # bytes free per GPU; the compute device keeps 1 - 1 / 2.5 of its own
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(streaming, "available_memory", lambda d: free[d.index] if d.type == "cuda" else 10**4)
    budgets = streaming.gpu_budgets(cuda)
    assert list(budgets) == [torch.device("cuda", 1), torch.device("cuda", 2), cuda]  # the compute device last
    assert list(budgets.values()) == [90, 90, 32]
    assert resolve_offload("auto", 30, cuda) == "none"  # fits on the compute device with room
    assert resolve_offload("auto", 200, cuda, {"a": 90, "b": 90, "c": 20}) == "gpus"
    assert resolve_offload("auto", 200, cuda, {"a": 100, "b": 100}) == "cpu"  # no GPU holds 100: host memory
    assert resolve_offload("auto", 10**6, cuda) == "disk"


def test_gpus_is_refused_without_several_gpus():
    with pytest.raises(SubFitError, match="offload: gpus spreads the weights over several GPUs; here device=cpu"):
        resolve_offload("gpus", 1_000, torch.device("cpu"))


def test_weights_spread_over_devices_compute_what_the_loaded_model_does(sharded):
    """``gpus`` on this CPU: the store's devices are all the CPU, but the placement, the store and the
    per-module copies are those a run over several GPUs makes."""
    model, folder = sharded
    sizes = checkpoint_sizes(folder, torch.float32)
    assert sum(sizes.values()) == sum(t.numel() * 4 for t in model.state_dict().values()) - model.lm_head.weight.numel() * 4
    cpu, store = torch.device("cpu"), torch.device("cpu", 0)  # two keys, as two GPUs would be
    budgets = {store: sum(sizes.values()) // 2, cpu: sum(sizes.values())}
    assert set(place(sizes, budgets).values()) == {store, cpu}  # the weights split over both
    streamed, stream = build_streamed(folder, torch.float32, cpu, "gpus", budgets=budgets)
    assert stream.state is not None and set(stream.state) == set(sizes)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, model(ids).logits)
    assert stream.resident_bytes() == 0 and all(p.is_meta for p in streamed.parameters())
    with pytest.raises(SubFitError, match=r"offload: gpus: the weights \(.* GB as float32\) do not fit .* use offload=cpu"):
        build_streamed(folder, torch.float32, cpu, "gpus", budgets={cpu: sum(sizes.values()) - 1})
    half = build_streamed(folder, torch.bfloat16, cpu, "gpus", budgets={cpu: sum(sizes.values()) // 2})[1]
    assert all(t.dtype == torch.bfloat16 for t in half.state.values())  # cast once, where they are stored


def test_weights_are_written_shard_by_shard_and_read_back(sharded, tmp_path):
    model, folder = sharded
    streamed, stream = build_streamed(folder, torch.float32, torch.device("cpu"), "disk")
    files = write_weights(streamed, tmp_path, stream, shard_bytes=30_000)
    assert files[-1] == "model.safetensors.index.json" and len(files) > 2
    index = json.loads((tmp_path / files[-1]).read_text())["weight_map"]
    written = {}
    for name in files[:-1]:
        part = load_file(str(tmp_path / name))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 30_000 or len(part) == 1
        written.update(part)
    assert set(index) == set(written)
    reference = model.state_dict()
    assert "lm_head.weight" not in written  # tied: stored once
    assert all(torch.equal(written[n], reference[n]) for n in written)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])  # mixtral: experts stored apart, stacked per module
def test_a_run_gives_the_same_model_in_every_offload_mode(tmp_path, arch, monkeypatch):
    # gpus on this CPU: the store's one device is the CPU (the run's path is that of several GPUs)
    monkeypatch.setattr(streaming, "gpu_budgets", lambda device: {device: 10**9})
    folder = write_local_model_and_text(tmp_path, seed=2, lines=600, layers=4, arch=arch)
    # half the windows sampled from the model: sampling with streamed weights gives the same text
    common = [f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=6", "calib.seq_len=16",
              "calib.generated=0.5", "scoring.samples=3", "eval.windows=3", "eval.seq_len=16", "eval.domains=[]",
              "cache_stats=false", "sparsity=0.25", "strategy=subfit"]
    results, logits = {}, {}
    ids = torch.arange(2, 26).reshape(2, 12)
    for mode in ("none", "disk", "cpu", "gpus"):
        assert run_main([*common, f"offload={mode}", f"output_dir={tmp_path / mode}"]) == 0
        results[mode] = json.loads((tmp_path / mode / "results.json").read_text())
        loaded, _ = load_compressed(tmp_path / mode)
        with torch.no_grad():
            logits[mode] = loaded(ids).logits
    for mode in ("disk", "cpu", "gpus"):
        assert results[mode]["replaced"] == results["none"]["replaced"]
        for key in ("dense", "compressed"):
            assert results[mode]["perplexity"][key] == pytest.approx(results["none"]["perplexity"][key], rel=1e-6)
        assert torch.allclose(logits[mode], logits["none"], atol=1e-6)
    assert results["none"]["replaced"]  # something was removed


@pytest.mark.parametrize("strategy", [
    ["strategy=aa-svd", "factorizer.refine_steps=2", "factorizer.ranks=adaptive"],  # anchored, refined, spectra read
    ["strategy=subfit-svd", "factorizer.kept_ratio=0.7"],  # bypasses first, then the rest factored
])
def test_a_streamed_factorization_makes_the_same_model_and_keeps_no_factors_in_memory(tmp_path, strategy):
    """The factorization stage streams like the rest: every offload mode gives the same factors,
    the finished factors are read per module like the checkpoint's weights (memory holds none
    between uses), and the saved model loads back with the same logits."""
    from subfit_core.apps.cli import resolve_recipe
    from subfit_core.engine.lowrank import FactoredLinear
    from subfit_core.engine.pipeline import compress, open_session, save_compressed
    from subfit_core.engine.surgery import records

    folder = write_local_model_and_text(tmp_path, seed=3, lines=600, layers=4)
    common = [f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=6", "calib.seq_len=16",
              "calib.generated=0", "scoring.samples=3", "eval.windows=3", "eval.seq_len=16", "eval.domains=[]",
              "cache_stats=false", *strategy]
    ids = torch.arange(2, 26).reshape(2, 12)
    results, logits = {}, {}
    for mode in ("none", "disk", "cpu"):
        cfg = resolve_recipe([*common, f"offload={mode}", f"output_dir={tmp_path / mode}"])
        session = open_session(cfg)
        with torch.no_grad():
            dense = session.model(ids).logits
        outcome = compress(session, cfg)
        factored = [m for m in session.model.modules() if isinstance(m, FactoredLinear)]
        assert factored and outcome.results["factorization"]["linears"] == len(factored)
        if mode != "none":
            stream = session.bench.stream
            assert all(p.is_meta for m in factored for p in m.parameters())
            kept = {id(p): p for b in outcome.bypasses.values() for p in b.parameters()}  # bypasses stay in memory
            assert stream.resident_bytes() == sum(p.numel() * p.element_size() for p in kept.values())
        with torch.no_grad():
            logits[mode] = session.model(ids).logits
        save_compressed(session.model, session.tokenizer, records(outcome.bypasses), tmp_path / mode, cfg,
                        outcome.results, outcome.factored_records(), layout=session.adapter.layout,
                        stream=session.bench.stream)
        results[mode] = outcome.results
        loaded, _ = load_compressed(tmp_path / mode)
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, logits[mode], atol=1e-5)
        if mode == "disk":  # restored: the spilled factors are deleted and the model is dense again
            spilled = [p for m in factored for p in [session.bench.stream.files.get(session.bench.stream.keys[id(m.down)])]]
            assert all(p is not None and p.is_file() for p in spilled)
            session.bench.restore()
            assert not any(p.exists() for p in spilled)
            assert not [m for m in session.model.modules() if isinstance(m, FactoredLinear)]
            with torch.no_grad():
                assert torch.equal(session.model(ids).logits, dense)
    for mode in ("disk", "cpu"):
        assert results[mode]["replaced"] == results["none"]["replaced"]
        assert results[mode]["perplexity"]["compressed"] == pytest.approx(results["none"]["perplexity"]["compressed"], rel=1e-5)
        assert torch.allclose(logits[mode], logits["none"], atol=1e-5)


def test_a_streamed_run_resumes_from_its_published_statistics(tmp_path, monkeypatch, capsys):
    """A streamed run keeps its spilled statistics as a cache entry (a folder, one checksummed file
    per submodule, published whole) and journals its evaluations: the next run reads both and
    makes the same model. A damaged file is an error naming it, never a fit; an entry without
    its index (a run killed while writing) is recomputed."""
    monkeypatch.setenv("SUBFIT_CACHE", str(tmp_path / "cache"))
    folder = write_local_model_and_text(tmp_path, seed=2, lines=600, layers=4)
    args = [f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=6", "calib.seq_len=16",
            "calib.generated=0", "scoring.samples=3", "eval.windows=3", "eval.seq_len=16", "eval.domains=[]",
            "cache_stats=true", "sparsity=0.25", "strategy=subfit", "offload=disk"]

    def run(name: str) -> dict:
        assert run_main([*args, f"output_dir={tmp_path / name}"]) == 0
        return json.loads((tmp_path / name / "results.json").read_text())

    first = run("first")
    (entry,) = [p for p in (tmp_path / "cache" / "stats").iterdir() if not p.name.startswith(".")]
    assert entry.is_dir() and (entry / "index.json").is_file() and len(list(entry.glob("*.safetensors"))) == 8
    again = run("again")
    assert not first["timings"]["statistics_from_cache"] and again["timings"]["statistics_from_cache"]
    assert first["timings"]["scoring_evaluations"] > 0 and again["timings"]["scoring_evaluations"] == 0  # all replayed
    assert again["replaced"] == first["replaced"]
    assert again["perplexity"]["compressed"] == pytest.approx(first["perplexity"]["compressed"], rel=1e-9)

    victim = sorted(entry.glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-8:] = bytes(8)  # the last float64 of the file, zeroed
    victim.write_bytes(bytes(data))
    for journal in (tmp_path / "cache" / "evaluations").iterdir():
        journal.unlink()  # so the selection fits (and reads statistics) again
    capsys.readouterr()
    assert run_main([*args, f"output_dir={tmp_path / 'damaged'}"]) == 2
    err = capsys.readouterr().err
    assert f"{victim} do not match their checksum" in err and "Traceback" not in err
    (entry / "index.json").unlink()
    assert not run("recomputed")["timings"]["statistics_from_cache"]
    assert (entry / "index.json").is_file()  # and published again


def test_a_killed_statistics_pass_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The dense pass of a streamed run checkpoints the stream at layer boundaries: a run that dies
    in layer 2 is continued from layer 2 by the next one, which makes the model an uninterrupted
    run makes; the finished pass is published and the checkpoint is gone."""
    from subfit_core.engine import stats as stats_module

    folder = write_local_model_and_text(tmp_path, seed=2, lines=600, layers=4)
    args = [f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=6", "calib.seq_len=16",
            "calib.generated=0", "scoring.samples=3", "eval.windows=3", "eval.seq_len=16", "eval.domains=[]",
            "cache_stats=true", "sparsity=0.25", "strategy=subfit", "offload=disk", "calib.batch_size=2"]
    monkeypatch.setenv("SUBFIT_CHECKPOINT_SECONDS", "0")

    def run(name: str, cache: str) -> dict:
        monkeypatch.setenv("SUBFIT_CACHE", str(tmp_path / cache))
        assert run_main([*args, f"output_dir={tmp_path / name}"]) == 0
        return json.loads((tmp_path / name / "results.json").read_text())

    whole = run("whole", "cache-whole")
    check, calls = stats_module.SubStats.check, []

    def dies_in_layer_2(self):
        calls.append(self.name)
        if self.name == "L2.ffn":
            raise KeyboardInterrupt  # as a kill would stop it, mid-layer
        return check(self)

    monkeypatch.setattr(stats_module.SubStats, "check", dies_in_layer_2)
    monkeypatch.setenv("SUBFIT_CACHE", str(tmp_path / "cache"))
    assert run_main([*args, f"output_dir={tmp_path / 'killed'}"]) != 0  # "interrupted; nothing was written"
    (partial,) = (tmp_path / "cache" / "stats").glob(".*.partial")
    assert json.loads((partial / "progress.json").read_text())["done"] == ["L0.attn", "L0.ffn", "L1.attn", "L1.ffn"]
    monkeypatch.setattr(stats_module.SubStats, "check", check)
    capsys.readouterr()
    calls.clear()
    resumed = run("resumed", "cache")
    assert "resuming the dense pass at L2.attn (4 of 8 submodules done" in capsys.readouterr().err
    assert not resumed["timings"]["statistics_from_cache"]
    assert resumed["replaced"] == whole["replaced"]
    assert resumed["perplexity"]["compressed"] == pytest.approx(whole["perplexity"]["compressed"], rel=1e-6)
    (entry,) = [p for p in (tmp_path / "cache" / "stats").iterdir() if not p.name.startswith(".")]
    assert {p.name for p in entry.iterdir()} == {"index.json", *(f"L{l}.{k}.safetensors" for l in range(4)
                                                                   for k in ("attn", "ffn"))}
    assert not partial.exists()


def test_offload_errors_name_the_key(tmp_path):
    folder = write_local_model_and_text(tmp_path, seed=2, lines=200, layers=2)
    base = [f"calib.dataset={folder / 'text.txt'}", "calib.samples=2", "calib.seq_len=16", "eval.domains=[]",
            "cache_stats=false", "save=false"]
    assert run_main([*base, "model=smollm2-135m", "offload=disk"]) == 2  # a plugin's in-memory model
    assert run_main([*base, f"model={folder / 'model'}", "offload=floppy"]) == 2
    assert run_main([*base, f"model={folder / 'model'}", "offload=gpus", "device=cpu"]) == 2  # no GPUs here
    assert run_main([*base, f"model={folder / 'model'}", "offload=disk", "strategy=svd-llm"]) == 2
    with pytest.raises(SubFitError, match="offload: .* has no model.safetensors"):
        build_streamed(tmp_path, torch.float32, torch.device("cpu"), "disk")


def test_what_cannot_run_on_streamed_weights_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from subfit_core.engine import pipeline

    monkeypatch.setattr(pipeline, "load_streamed", lambda *a, **k: pytest.fail("loaded before refusing"))
    folder = write_local_model_and_text(tmp_path, seed=2, lines=200, layers=2)
    base = [f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=2", "calib.seq_len=16",
            "eval.domains=[]", "cache_stats=false", "save=false", "offload=disk"]
    assert run_main([*base, "strategy=subfit-dynamic"]) == 2
    assert "offload: disk; the dynamic runner keeps every candidate's original" in capsys.readouterr().err
    assert run_main([*base, "eval.speed=true"]) == 2
    assert "eval.speed: it times the model as deployed, held in memory" in capsys.readouterr().err


def test_spilled_statistics_round_trip_with_a_bounded_few_in_memory(tmp_path):
    import gc

    from subfit_core.engine.stats import SpilledStats, SubStats

    store = SpilledStats(tmp_path / "spill", keep=2)
    made = {}
    for i in range(5):
        st = SubStats(6, f"L{i}.attn")
        st.add(torch.randn(20, 6), torch.randn(20, 6), {"s": torch.tensor([float(i)], dtype=torch.float64)})
        store[i] = made[i] = st
    assert len(store._recent) == 0 and len(store) == 5 and sorted(store) == list(range(5))  # written, not kept
    for i in (0, 3, 1):
        back = store[i]
        assert torch.equal(back.gram, made[i].gram) and back.tokens == 20 and back.extra["s"].item() == i
        assert len(store._recent) <= 2
    folder = store.folder
    del store
    gc.collect()
    assert not folder.exists()  # a run's spilled statistics go with it


def test_a_scoring_round_reads_each_layer_once_for_all_candidates(sharded, random_windows):
    """Streamed, the candidates of a round run together: the downstream weights are read once per
    round (not once per candidate), and every candidate's metric is what the in-memory model gives."""
    from subfit_core.engine.bypass import ZeroBypass
    from subfit_core.engine.models import find_adapter
    from subfit_core.engine.workbench import Workbench
    from subfit_core.plugins import get_plugins

    model, folder = sharded
    windows = random_windows(calib=4, scoring=4, seq_len=12)
    streamed, stream = build_streamed(folder, torch.float32, torch.device("cpu"), "disk")
    benches = [Workbench(m, find_adapter(get_plugins(), m), windows, 2, torch.device("cpu"), stream=s)
               for m, s in ((model, None), (streamed, stream))]
    for bench in benches:
        bench.collect()
    candidates = [{sub: ZeroBypass()} for sub in benches[0].subs]
    expected = benches[0].metrics_with_each(candidates, "kl")
    before = stream.bytes_read
    got = benches[1].metrics_with_each(candidates, "kl")
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert stream.bytes_read - before <= weights  # one pass, although 8 candidates each re-ran what follows them
    benches[1].in_flight_bytes = 1  # one candidate at a time: the same numbers, more reads
    before = stream.bytes_read
    assert benches[1].metrics_with_each(candidates, "kl") == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert stream.bytes_read - before > 3 * weights


def test_a_streamed_model_samples_the_windows_the_loaded_one_does_and_caches_them(sharded, tmp_path):
    """Text sampled from the model (``calib.generated``) is cached under a key of its weights: for a
    streamed model, whose parameters are meta, that is its files' fingerprint (reading a meta
    parameter's values, as the in-memory key does, raises)."""
    from subfit_core.engine.sampling import sample_windows

    model, folder = sharded
    streamed, stream = build_streamed(folder, torch.float32, torch.device("cpu"), "disk")
    args = dict(start=1, count=3, seq_len=6, seed=5, batch_size=2, device=torch.device("cpu"))
    loaded = sample_windows(model, **args)
    first = sample_windows(streamed, **args, cache=tmp_path, weights=stream.fingerprint())
    assert torch.equal(first, loaded) and len(list(tmp_path.glob("*.safetensors"))) == 1
    read = stream.bytes_read
    assert torch.equal(sample_windows(streamed, **args, cache=tmp_path, weights=stream.fingerprint()), loaded)
    assert stream.bytes_read == read  # read from the cache: the model did not run


def test_a_streamed_run_caches_its_sampled_windows_under_its_files_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBFIT_CACHE", str(tmp_path / "cache"))
    folder = write_local_model_and_text(tmp_path, seed=2, lines=600, layers=4)
    args = [f"model={folder / 'model'}", f"calib.dataset={folder / 'text.txt'}", "calib.samples=6", "calib.seq_len=16",
            "calib.generated=0.5", "scoring.samples=2", "eval.windows=2", "eval.seq_len=16", "eval.domains=[]",
            "cache_stats=true", "sparsity=0.25", "strategy=subfit", "offload=disk", "save=false"]
    assert run_main([*args, f"output_dir={tmp_path / 'a'}"]) == 0
    assert len(list((tmp_path / "cache" / "samples").glob("*.safetensors"))) == 1
    from transformers.generation.utils import GenerationMixin

    monkeypatch.setattr(GenerationMixin, "generate", lambda *a, **k: pytest.fail("sampled again despite the cache"))
    assert run_main([*args, f"output_dir={tmp_path / 'b'}"]) == 0  # the second run reads them
    assert len(list((tmp_path / "cache" / "samples").glob("*.safetensors"))) == 1
