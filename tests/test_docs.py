"""The plugin tutorial's code is real. Every file docs/writing-plugins.md prints (the paragraph
before a block names it: `my_plugin/gpt2.py`, `pyproject.toml`, ...) is written out exactly as
printed, and each is run for real on tiny random models:

* the example plugin's scorer drives its recipe's selection; its pyproject declares the entry point;
* ``my_plugin``: the statistic is accumulated in the dense pass and read by its scorer; the metric
  agrees with a direct computation and is checked by name; the fitters recover planted maps; the
  bypass kind saves and loads; the selector meets its budget; the text source gives a CorpusText;
  the GPT-2 adapter compresses, generates with the cache, saves and loads in transformers alone;
* every recipe block validates and builds with the plugins; the tutorial's own test file passes.

A python block that no test runs, or that imports from inside the engine or from a built-in
plugin, fails here."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_export import IDS, run_isolated  # noqa: E402
from test_surgery import tiny_tokenizer  # noqa: E402

import subfit_core  # noqa: E402
from subfit_core import (  # noqa: E402
    Budget,
    ConfigError,
    CorpusText,
    LinearBypass,
    LowRankBypass,
    SubFitError,
    Submodule,
    SubStats,
    Workbench,
    ZeroBypass,
    hookimpl,
    hookspecs,
    load_compressed,
)
from subfit_core.artifact import folder  # noqa: E402
from subfit_core.config import validate  # noqa: E402
from subfit_core.engine.bypass import bypass_classes  # noqa: E402
from subfit_core.engine.pipeline import build_components, load_text  # noqa: E402
from subfit_core.engine.surgery import apply_bypasses, records  # noqa: E402
from subfit_core.plugins import Plugins, build_component, make_plugin_manager  # noqa: E402
from subfit_core.recipes import available, read_recipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"
CPU = torch.device("cpu")

# Every python block of the tutorial, by the file it says it is, and the test below that runs it.
COVERED = {
    "subfit_example_plugin/__init__.py": "test_example_plugin_scorer_removes_the_deepest_first",
    "my_plugin/__init__.py": "test_plugin_module_registers_every_component_and_recipe",
    "my_plugin/statistics.py": "test_energy_statistic_is_accumulated_and_read_by_its_scorer",
    "my_plugin/metrics.py": "test_tv_metric_agrees_with_a_direct_computation",
    "my_plugin/fitters.py": "test_svd_fitter_recovers_a_planted_low_rank_map",
    "my_plugin/bypasses.py": "test_diagonal_fitter_recovers_a_planted_scale_and_its_kind_loads_back",
    "my_plugin/selectors.py": "test_fixed_split_selector_meets_the_budget_lowest_score_first",
    "my_plugin/gpt2_layout.py": "test_tutorial_gpt2_adapter_compresses_saves_and_loads_everywhere",
    "my_plugin/gpt2.py": "test_tutorial_gpt2_adapter_compresses_saves_and_loads_everywhere",
    "my_plugin/notes.py": "test_text_source_returns_corpus_text",
    "my_plugin/gemma_like.py": "test_tutorial_decoder_adapter_runs_gemma_piecewise",
    "tests/test_my_plugin.py": "test_tutorial_test_file_passes",
}
# What the tutorial's python blocks may import besides ``subfit_core``'s exported names.
ALLOWED_ROOTS = set(sys.stdlib_module_names) | {"torch", "transformers", "yaml", "pytest",
                                                "my_plugin", "subfit_example_plugin"}
# the built-in plugin's adapter base for transformers decoders: a documented extension point
EXTENSION_MODULES = {"subfit_plugins.adapters.decoder", "subfit_plugins.adapters.decoder_layout"}
SCAFFOLDING_FILE = "tests/test_my_plugin.py"  # the tutorial's own test file
LANGUAGES = {"python", "toml", "yaml", "bash", ""}  # "": file trees and output listings
FILE_LANGUAGES = {"python", "toml", "yaml"}  # these are files: each must be named


# ----------------------------------------------------------------------------- reading the tutorial


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    path: str | None  # the file the paragraph before it names
    line: int


FENCE = re.compile(r"^```(\w*)\s*$")
LABEL = re.compile(r"^`([\w./-]+\.(?:py|toml|yaml|yml))`(?=[:,\s])")


def tutorial_blocks() -> list[Block]:
    """Every fenced block, with the file named by a line starting with `path` since the last block."""
    blocks: list[Block] = []
    label, lang, start, body = None, None, 0, []
    for number, line in enumerate(TUTORIAL.read_text(encoding="utf-8").splitlines(), 1):
        if lang is None:
            fence = FENCE.match(line)
            if fence:
                lang, start, body = fence.group(1), number, []
            elif LABEL.match(line):
                label = LABEL.match(line).group(1)
        elif line.rstrip() == "```":
            blocks.append(Block(lang, "\n".join(body) + "\n", label if lang in FILE_LANGUAGES else None, start))
            lang, label = None, None
        else:
            body.append(line)
    assert lang is None, f"docs/writing-plugins.md: the block opened at line {start} is never closed"
    return blocks


BLOCKS = tutorial_blocks()


def block(path: str) -> Block:
    (found,) = [b for b in BLOCKS if b.path == path]
    return found


def imports(code: str):
    """(module, name) of every import in ``code``: name None for ``import x``; relative ones skipped."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield from ((node.module, alias.name) for alias in node.names)


def registries(*modules) -> Plugins:
    """The installed plugins plus ``modules``, registered the way the tutorial's test file does."""
    pm = make_plugin_manager(extra_plugins=modules)
    if pm.get_plugin("example") is not None:  # the example's installed copy (while tests/test_plugins.py runs)
        pm.unregister(name="example")
    return Plugins(pm)


# ----------------------------------------------------------------------------- the tutorial as files


@pytest.fixture(scope="module")
def tutorial_root(tmp_path_factory):
    """Every named block written out under one folder, which is put on sys.path."""
    root = tmp_path_factory.mktemp("tutorial")
    for b in BLOCKS:
        if b.path is not None:
            (root / b.path).parent.mkdir(parents=True, exist_ok=True)
            (root / b.path).write_text(b.code, encoding="utf-8")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m.split(".")[0] in ("my_plugin", "subfit_example_plugin")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def my_plugin(tutorial_root):
    import my_plugin

    assert Path(my_plugin.__file__).parent == tutorial_root / "my_plugin"
    return my_plugin


@pytest.fixture(scope="module")
def example_plugin(tutorial_root):
    import subfit_example_plugin

    assert Path(subfit_example_plugin.__file__).parent == tutorial_root / "subfit_example_plugin"
    return subfit_example_plugin


@pytest.fixture(scope="module")
def plugins(my_plugin, example_plugin) -> Plugins:
    return registries(my_plugin, example_plugin)


@pytest.fixture(scope="module")
def bench(plugins, tiny_model, random_windows) -> Workbench:
    """A tiny random Llama, measured with the tutorial's plugins registered (so energy-ratio is collected)."""
    model = tiny_model("llama", seed=0)
    b = Workbench(model, plugins.adapter.get("llama-family")(model), random_windows(calib=8, scoring=4), 4, CPU,
                  plugins=plugins)
    b.collect()
    return b


# ----------------------------------------------------------------------------- what the tutorial holds


def test_every_python_block_is_a_file_that_a_test_runs():
    unknown = sorted({b.lang for b in BLOCKS} - LANGUAGES)
    assert not unknown, f"blocks in languages no test knows: {unknown}"
    unnamed = [b.line for b in BLOCKS if b.lang in FILE_LANGUAGES and b.path is None]
    assert not unnamed, (f"docs/writing-plugins.md lines {unnamed}: a {'/'.join(sorted(FILE_LANGUAGES))} block must "
                         "follow a line starting with its file name in backticks (`my_plugin/x.py`: ...)")
    paths = [b.path for b in BLOCKS if b.path is not None]
    assert len(paths) == len(set(paths)), "two blocks name the same file"
    python = sorted(b.path for b in BLOCKS if b.lang == "python")
    assert python == sorted(COVERED), ("every python block must be run by a test: add one for the new block and list "
                                       f"it in COVERED (blocks: {python})")
    for test in set(COVERED.values()):
        assert callable(globals().get(test)), test


def test_tutorial_imports_only_the_public_api():
    bad = []
    for b in (b for b in BLOCKS if b.lang == "python"):
        for module, name in imports(b.code):
            root = module.split(".")[0]
            if module == "subfit_core":
                ok = name is None or name in subfit_core.__all__
            elif module in EXTENSION_MODULES:
                ok = True
            else:
                ok = root in ALLOWED_ROOTS
            if not ok:
                bad.append(f"{b.path}: from {module} import {name}" if name else f"{b.path}: import {module}")
    assert not bad, "the tutorial may import only subfit_core's exported names (plus stdlib, torch, transformers, " \
                    f"yaml, pytest and its own packages): {bad}"


def test_pyproject_block_declares_the_subfit_entry_point():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    data = tomllib.loads(block("pyproject.toml").code)
    assert hookspecs.PROJECT == "subfit"
    assert data["project"]["entry-points"][hookspecs.PROJECT] == {"example": "subfit_example_plugin"}
    assert data["tool"]["setuptools"]["packages"] == ["subfit_example_plugin"]
    (pattern,) = data["tool"]["setuptools"]["package-data"]["subfit_example_plugin"]
    recipe = Path(block("subfit_example_plugin/recipes/example-deep.yaml").path)
    assert recipe.relative_to("subfit_example_plugin").match(pattern)  # the recipe is installed with the package


def test_recipe_blocks_validate_and_build_with_the_plugins(plugins, tutorial_root):
    used = set()
    recipes = [b for b in BLOCKS if b.lang == "yaml"]
    assert len(recipes) >= 5
    for b in recipes:
        data = yaml.safe_load(b.code)
        cfg = validate(data)
        build_components(plugins, cfg)  # every component and parameter, and that they go together
        found, path = read_recipe(plugins, Path(b.path).stem)  # found by name through subfit_recipe_dirs
        assert (found, path) == (data, tutorial_root / b.path)
        used |= {cfg["scorer"]["name"], cfg["scorer"].get("metric"), cfg["fitter"]["name"]}
    # a new scorer, metric, fitter (with its bypass kind) is one plugin file and one recipe
    assert {"layer-depth", "energy", "tv", "svd", "diagonal"} <= used


# ----------------------------------------------------------------------------- each file, run


def test_example_plugin_scorer_removes_the_deepest_first(plugins, bench):
    cfg = validate(read_recipe(plugins, "example-deep")[0])
    for prefer, layer in (("deep", 3), ("shallow", 0)):
        comps = build_components(plugins, {**cfg, "scorer": {**cfg["scorer"], "prefer": prefer}})
        bench.restore()
        plan = comps.selector.select(bench, comps.scorer, comps.fitter, Budget(cfg["sparsity"], "layers", bench.adapter))
        assert [s.layer for s in plan.subs] == [layer, layer], prefer  # attention, then its FFN to meet 0.1
        assert all(r.score == (-1.0 if prefer == "deep" else 1.0) * r.sub.layer for r in plan.replacements)
        assert plan.notes["estimated_sparsity"] >= cfg["sparsity"]


def test_plugin_module_registers_every_component_and_recipe(plugins, tutorial_root):
    expected = {"statistic": ["energy-ratio"], "scorer": ["energy"], "metric": ["tv"], "fitter": ["diagonal", "svd"],
                "bypass kind": ["diagonal"], "selector": ["fixed-split"], "adapter": ["gpt2"], "dataset": ["my-notes"]}
    assert {k: sorted(v) for k, v in plugins.info["my_plugin"].registers.items()} == expected
    for kind, names in expected.items():
        for name in names:
            plugins.registries[kind].get(name)  # every lazy reference imports, and is what its kind requires
    assert bypass_classes(["diagonal"], plugins)["diagonal"].kind == "diagonal"
    ours = {name for name, path in available(plugins).items() if (tutorial_root / "my_plugin") in path.parents}
    assert ours == {"my-energy", "my-tv", "my-svd", "my-diagonal"}


def test_energy_statistic_is_accumulated_and_read_by_its_scorer(plugins, bench):
    bench.restore()
    adapter = bench.adapter
    h = adapter.embed(bench.windows.calib)
    with torch.no_grad():
        for sub in bench.subs:  # rho_s = sum ||y||^2 / sum ||h||^2, computed directly
            y = adapter.contribution(sub, h, adapter.context(h))
            sums = bench.stats[sub].extra["energy-ratio"]
            assert sums.dtype == torch.float64 and sums.shape == (2,)
            assert float(sums[0]) == pytest.approx(bench.stats[sub].y_sq, rel=1e-6)
            expected = float(y.double().square().sum() / h.double().square().sum())
            assert bench.statistic("energy-ratio", sub) == pytest.approx(expected, rel=1e-4), sub
            h = h + y
    scorer = build_component(plugins, "scorer", {"name": "energy"}, "scorer")
    assert scorer.score(bench.subs, bench, None) == {s: bench.statistic("energy-ratio", s) for s in bench.subs}

    class OnlyTheScorer:  # the scorer without the plugin that registers its statistic
        @hookimpl
        def subfit_scorers(self):
            return {"energy": "my_plugin.statistics:EnergyScorer"}

    cfg = validate(yaml.safe_load(block("my_plugin/recipes/my-energy.yaml").code))
    with pytest.raises(ConfigError) as refused:
        build_components(registries(OnlyTheScorer()), cfg)
    assert str(refused.value) == ("scorer.name: energy reads the statistic 'energy-ratio', which no installed plugin "
                                  "registers; registered: layer-cosine, magnitude, rotation")


def test_tv_metric_agrees_with_a_direct_computation(plugins, bench):
    bench.restore()
    model, adapter, ids = bench.model, bench.adapter, bench.windows.scoring
    sub, module = Submodule(1, "ffn"), ZeroBypass()
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
        adapter.replace(sub, module)
        adapter.finalize()
        q = torch.softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
        adapter.replace(sub, bench.originals[sub])
        adapter.finalize()
    expected = float(0.5 * (p - q).abs().sum(-1).mean())  # TV(p, q), averaged over every position
    assert 0.0 < expected < 1.0
    assert bench.metric("tv") == pytest.approx(0.0, abs=1e-6)
    assert bench.metric_with(sub, module, "tv") == pytest.approx(expected, rel=1e-4)

    data = yaml.safe_load(block("my_plugin/recipes/my-tv.yaml").code)
    scorer = build_components(plugins, validate(data)).scorer  # the built-in output scorer, judging by tv
    identity = build_component(plugins, "fitter", {"name": "identity"}, "fitter")
    assert scorer.score([sub], bench, identity)[sub] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ConfigError) as refused:
        build_components(plugins, validate({**data, "scorer": {"name": "output", "metric": "tvv"}}))
    assert str(refused.value) == "scorer.metric: unknown metric 'tvv'; allowed: js, kl, loss, tv; did you mean 'tv'?"


def test_svd_fitter_recovers_a_planted_low_rank_map(plugins, bench):
    g = torch.Generator().manual_seed(0)
    d, n, rank = 32, 512, 3
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, rank, generator=g) @ torch.randn(rank, d, generator=g)  # rank 3
    b = torch.randn(d, generator=g)
    y = x @ w.T + b
    stats = SubStats(d, "planted")
    stats.add(x, y)
    sub = Submodule(0, "attn")
    fitter = build_component(plugins, "fitter", {"name": "svd", "max_rank": 8, "energy": 0.99, "ridge": 1e-9}, "fitter")
    assert fitter.fit(sub, stats).rank == 8  # before prepare: max_rank
    fitter.prepare([sub], {sub: stats})
    bypass = fitter.fit(sub, stats)
    assert isinstance(bypass, LowRankBypass) and bypass.rank == rank  # the energy rule finds the planted rank
    with torch.no_grad():
        assert torch.allclose(bypass(x), y, atol=1e-3, rtol=1e-4)
    assert fitter.estimate_params(sub, d) == 2 * d * 8 + d
    real = bench.fit(fitter, Submodule(2, "ffn"))  # on a model's statistics: a bypass of at most max_rank
    assert isinstance(real, LowRankBypass) and real.rank == 8 and real.down.dtype == bench.dtype
    with pytest.raises(ConfigError, match=r"^fitter: energy: 0\.0 must be in \(0, 1\]$"):
        build_component(plugins, "fitter", {"name": "svd", "energy": 0.0}, "fitter")


def test_diagonal_fitter_recovers_a_planted_scale_and_its_kind_loads_back(plugins, tiny_model, tmp_path):
    g = torch.Generator().manual_seed(1)
    d = 32
    x, scale = torch.randn(512, d, generator=g), torch.randn(d, generator=g)
    stats = SubStats(d, "planted")
    stats.add(x, x * scale)
    fitter = build_component(plugins, "fitter", {"name": "diagonal"}, "fitter")
    bypass = fitter.fit(Submodule(0, "ffn"), stats)
    kind = plugins.registries["bypass kind"].get("diagonal")
    assert isinstance(bypass, kind) and fitter.estimate_params(Submodule(0, "ffn"), d) == d
    assert torch.allclose(bypass.scale, scale, atol=1e-4)  # s_i = H_ii / G_ii recovers the planted scale
    assert kind.empty(bypass.spec(), torch.float32, {}).spec() == bypass.spec()

    model = tiny_model("llama", seed=3)
    adapter = plugins.adapter.get("llama-family")(model)
    bypasses = {Submodule(1, "ffn"): bypass, Submodule(2, "attn"): kind(torch.randn(d, generator=g) * 0.1)}
    apply_bypasses(adapter, bypasses)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    out = tmp_path / "out"
    folder.save_compressed(model, tiny_tokenizer(), records(bypasses), out, {}, {})
    loaded, _ = load_compressed(out, plugins=plugins)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, before)
    with pytest.raises(SubFitError) as refused:  # where the plugin is not installed
        load_compressed(out)
    assert str(refused.value) == (f"load_compressed: '{out}': saved bypass: unknown bypass kind 'diagonal'; "
                                  "allowed: linear, lowrank, mlp, patch, shared_basis, zero")


def test_fixed_split_selector_meets_the_budget_lowest_score_first(plugins, bench):
    bench.restore()
    selector = build_component(plugins, "selector", {"name": "fixed-split", "attn_share": 0.5}, "selector")
    scorer = build_component(plugins, "scorer", {"name": "energy"}, "scorer")
    fitter = build_component(plugins, "fitter", {"name": "svd", "max_rank": 4}, "fitter")
    budget = Budget(0.3, "layers", bench.adapter)
    plan = selector.select(bench, scorer, fitter, budget)
    dim = bench.adapter.hidden_size
    charged = {s: fitter.estimate_params(s, dim) for s in plan.subs}
    saving = {s: budget.saving(s, p) for s, p in charged.items()}
    estimated = plan.notes["estimated_sparsity"]
    assert len(set(plan.subs)) == len(plan.subs)
    assert estimated == pytest.approx(budget.achieved(charged))
    assert 0.3 <= estimated < 0.3 + max(saving.values())  # meets the budget, over it by less than one pick
    assert sum(saving[s] for s in plan.subs if s.kind == "attn") >= 0.5 * 0.3 - 1e-9
    scores = scorer.score(bench.subs, bench, fitter)
    for kind in ("attn", "ffn"):  # within each type, the lowest scores, in order
        picked = [s for s in plan.subs if s.kind == kind]
        ranked = sorted((s for s in bench.subs if s.kind == kind), key=scores.get)
        assert picked == ranked[:len(picked)], kind
    assert not bench.replaced  # one-shot: nothing committed
    with pytest.raises(ConfigError, match=r"^selector: attn_share: 2\.0 must be within \[0, 1\]$"):
        build_component(plugins, "selector", {"name": "fixed-split", "attn_share": 2.0}, "selector")


def test_text_source_returns_corpus_text(plugins, tmp_path, monkeypatch):
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(12):
        (notes / f"{i:02d}.md").write_text(f"# Note {i}\n\n" + f"word{i} " * 20, encoding="utf-8")
    docs = [p.read_text(encoding="utf-8") for p in sorted(notes.glob("*.md"))]
    monkeypatch.setenv("MY_NOTES_DIR", str(notes))
    corpus = load_text(plugins, "my-notes")  # as calib.dataset=my-notes does
    assert isinstance(corpus, CorpusText)
    assert (corpus.name, corpus.source) == ("my-notes", f"Markdown notes in {notes}")
    assert corpus.heldout == docs[9]  # 12 documents: chunks of one, every 10th held out
    assert corpus.train == "\n\n".join(docs[:9] + docs[10:])
    for path in sorted(notes.glob("*.md"))[5:]:
        path.unlink()
    with pytest.raises(SubFitError, match=r"^calib\.dataset: 'my-notes' needs at least 10 \.md files in .*; found 5$"):
        load_text(plugins, "my-notes")


def test_tutorial_test_file_passes(tutorial_root):
    tests = [n.name for n in ast.parse(block(SCAFFOLDING_FILE).code).body
             if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SUBFIT_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(tutorial_root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SCAFFOLDING_FILE],
                          cwd=tutorial_root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"{len(tests)} passed" in done.stdout, done.stdout[-2000:]


def test_tutorial_decoder_adapter_runs_gemma_piecewise(plugins):
    from conftest import build_tiny_model, piecewise_logits
    from my_plugin.gemma_like import GemmaLikeAdapter

    model = build_tiny_model("gemma3", seed=1)
    adapter = GemmaLikeAdapter(model)
    assert GemmaLikeAdapter.matches(model)
    with torch.no_grad():
        assert torch.allclose(piecewise_logits(adapter, IDS), model(input_ids=IDS).logits, atol=1e-5, rtol=0)
    apply_bypasses(adapter, {Submodule(1, "ffn"): ZeroBypass()})
    assert type(model.model.layers[1].post_feedforward_layernorm).__name__ == "Identity"  # went with its module


def test_tutorial_gpt2_adapter_compresses_saves_and_loads_everywhere(plugins, tmp_path):
    from my_plugin.bypasses import DiagonalBypass
    from my_plugin.gpt2 import GPT2Adapter
    from transformers import GPT2Config, GPT2LMHeadModel

    assert plugins.adapter.get("gpt2") is GPT2Adapter
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=128, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    adapter = GPT2Adapter(model)
    with torch.no_grad():
        dense = model(input_ids=IDS).logits
    g = torch.Generator().manual_seed(1)
    bypasses = {Submodule(0, "attn"): LowRankBypass(torch.randn(4, 32, generator=g) * 0.1, torch.randn(32, 4, generator=g) * 0.1),
                Submodule(1, "ffn"): LinearBypass(torch.randn(32, 32, generator=g) * 0.1),
                Submodule(2, "attn"): ZeroBypass(),
                Submodule(3, "ffn"): DiagonalBypass(torch.randn(32, generator=g) * 0.1)}  # the plugin's own kind
    apply_bypasses(adapter, bypasses)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    assert not torch.allclose(before, dense)
    prompt = IDS[:1, :6]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = prompt
    for _ in range(6):  # the cache with layer 0's attention removed gives the uncached tokens
        seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)

    folder.save_compressed(model, tiny_tokenizer(), records(bypasses), tmp_path / "gpt2", {}, {},
                           layout=GPT2Adapter.layout)
    got = run_isolated([tmp_path / "gpt2"], tmp_path)  # transformers alone: layout and bypass sources travel
    assert torch.allclose(got["0"], before, atol=1e-5, rtol=0)

    loaded, _ = load_compressed(tmp_path / "gpt2", plugins=plugins)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, before)
    for sub in bypasses:  # restore puts every original back
        adapter.replace(sub, adapter.originals[sub])
    adapter.finalize()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, dense)
