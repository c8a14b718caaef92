"""The plugin system: registries, the pluggy manager, the built-in plugin's entry point, the
``subfit-plugins`` listing, and a real third-party plugin installed with pip."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["SUBFIT_PROGRESS"] = "0"

import importlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import subfit_core  # noqa: E402
from subfit_core.errors import SubFitError  # noqa: E402
from subfit_core.hookspecs import hookimpl  # noqa: E402
from subfit_core.kinds import KINDS as ALL_KINDS  # noqa: E402
from subfit_core.plugins import Plugins, get_plugins, make_plugin_manager  # noqa: E402
from subfit_core.registry import Registry  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "subfit_example_plugin"
BIN = Path(sys.executable).parent
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SUBFIT_PROGRESS": "0"}
KINDS = [k.name for k in ALL_KINDS]


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# ----------------------------------------------------------------------------- Registry


def test_duplicate_name_names_both_origins():
    reg = Registry("fitter", "fitter.name")
    reg.add("linear", object(), "plugin 'builtin' (subfit 0.1.0)")
    with pytest.raises(SubFitError) as exc:
        reg.add("linear", object(), "plugin 'other' (other-dist 2.0)")
    msg = str(exc.value)
    assert "fitter 'linear' is registered twice" in msg
    assert "plugin 'builtin' (subfit 0.1.0)" in msg and "plugin 'other' (other-dist 2.0)" in msg


def test_unknown_name_suggests_nearest():
    reg = Registry("scorer", "scorer.name")
    for name in ("output", "rotation", "fit-residual"):
        reg.add(name, object(), "test")
    with pytest.raises(SubFitError) as exc:
        reg.get("rotaton")
    msg = str(exc.value)
    assert msg.startswith("scorer.name: unknown scorer 'rotaton'")
    assert "allowed: fit-residual, output, rotation" in msg
    assert "did you mean 'rotation'?" in msg
    # nothing close: the allowed names, no guess
    with pytest.raises(SubFitError, match="allowed: fit-residual, output, rotation$"):
        reg.get("zzzzzz")
    assert "output" in reg and "rotaton" not in reg
    assert reg.names() == ["fit-residual", "output", "rotation"]


def test_lazy_reference_is_imported_only_on_get(tmp_path, monkeypatch):
    mod = "subfit_test_lazy_component"
    (tmp_path / f"{mod}.py").write_text("class Thing:\n    class Inner:\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, mod, raising=False)
    reg = Registry("scorer")
    reg.add("thing", f"{mod}:Thing", "test")
    reg.add("inner", f"{mod}:Thing.Inner", "test")
    assert mod not in sys.modules
    assert reg.entry("thing").target == f"{mod}:Thing"  # listing entries does not import either
    assert reg.entries()[0].origin == "test"
    assert mod not in sys.modules
    cls = reg.get("thing")
    assert mod in sys.modules
    assert cls is sys.modules[mod].Thing
    assert reg.get("thing") is cls  # loaded once, then remembered
    assert reg.get("inner") is cls.Inner  # dotted attribute paths
    monkeypatch.delitem(sys.modules, mod)


def test_bad_reference_gives_clear_error():
    reg = Registry("fitter")
    reg.add("gone", "subfit_no_such_module_xyz:Fitter", "plugin 'p' (p 1.0)")  # add does not import
    reg.add("typo", "subfit_plugins.fitters.linear:LinearFiter", "plugin 'p' (p 1.0)")
    with pytest.raises(SubFitError, match=r"cannot import registered component 'subfit_no_such_module_xyz:Fitter'"
                                          r".*No module named 'subfit_no_such_module_xyz'"):
        reg.get("gone")
    with pytest.raises(SubFitError, match=r"cannot import registered component "
                                          r"'subfit_plugins.fitters.linear:LinearFiter'.*LinearFiter"):
        reg.get("typo")


# ----------------------------------------------------------------------------- plugin manager


def plugin_module(name: str, **hooks) -> types.ModuleType:
    """A plugin the way a real one is: a module whose functions are marked with ``hookimpl``."""
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(mod, hook_name, hookimpl(fn))
    return mod


def test_misspelled_hook_fails_at_startup():
    bad = plugin_module("typo_plugin", subfit_scorerz=lambda: {"mine": object})
    with pytest.raises(SubFitError, match="unknown hook 'subfit_scorerz'") as err:
        make_plugin_manager(extra_plugins=(bad,))
    assert "\n" not in str(err.value)


def test_good_extra_plugin_is_registered():
    from subfit_core.engine.interfaces import Fitter

    class MyFitter(Fitter):
        pass

    good = plugin_module("extra_plugin", subfit_fitters=lambda: {"my-fitter": MyFitter})
    plugins = Plugins(make_plugin_manager(extra_plugins=(good,)))
    assert plugins.fitter.get("my-fitter") is MyFitter
    assert plugins.fitter.entry("my-fitter").origin == "plugin 'extra_plugin' ((not installed) -)"
    assert plugins.info["extra_plugin"].registers == {"fitter": ["my-fitter"]}
    assert "linear" in plugins.fitter  # the built-ins are still there


def test_second_plugin_shadowing_builtin_name_names_both():
    shadow = plugin_module("shadow_plugin", subfit_fitters=lambda: {"linear": object})
    pm = make_plugin_manager(extra_plugins=(shadow,))
    with pytest.raises(SubFitError) as exc:
        Plugins(pm)
    msg = str(exc.value)
    assert "fitter 'linear' is registered twice" in msg
    assert f"plugin 'builtin' (subfit {subfit_core.__version__})" in msg
    assert "plugin 'shadow_plugin'" in msg
def test_duplicate_recipe_name_names_both_plugins(tmp_path):
    from subfit_core.recipes import available

    (tmp_path / "subfit.yaml").write_text("name: not-the-builtin\n")
    other = plugin_module("recipe_plugin", subfit_recipe_dirs=lambda: [tmp_path])
    with pytest.raises(SubFitError) as exc:
        available(Plugins(make_plugin_manager(extra_plugins=(other,))))
    assert "subfit" in str(exc.value) and "builtin" in str(exc.value) and "recipe_plugin" in str(exc.value)
def test_broken_installed_plugin_gives_one_line_error(tmp_path):
    # a fake installed distribution whose entry point names a module that does not exist (venv untouched)
    dist = tmp_path / "subfit_broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: subfit-broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[subfit]\nbroken = subfit_broken_module_xyz\n")
    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([str(BIN / "subfit-plugins")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("subfit-plugins: error:") and "broken" in proc.stderr


# ----------------------------------------------------------------------------- built-in plugin


def test_builtins_come_through_the_entry_point():
    plugins = get_plugins()
    info = plugins.info["builtin"]
    assert info.distribution == "subfit"
    assert info.version == subfit_core.__version__
    assert set(KINDS) <= set(info.registers)
    for kind in KINDS:
        assert info.registers[kind], kind
        for name in info.registers[kind]:
            entry = plugins.registries[kind].entry(name)
            assert entry.origin == f"plugin 'builtin' (subfit {subfit_core.__version__})"
            assert isinstance(entry.target, str)  # lazy: listing imports nothing heavy
    assert {"output", "rotation", "fit-residual"} <= set(info.registers["scorer"])
    assert {"identity", "linear", "low-rank", "shared-basis", "per-type"} <= set(info.registers["fitter"])
    assert {"greedy", "whole-layer"} <= set(info.registers["selector"])
    assert set(info.registers["adapter"]) == {"llama-family", "phi3", "gemma", "olmo2", "moe"}
    assert {"kjv", "shakespeare", "local-file"} <= set(info.registers["dataset"])
    assert {"smollm2-135m", "gemma3-270m"} <= set(info.registers["model"])
    assert any((d / "subfit.yaml").is_file() and "builtin" in origin for d, origin in plugins.recipe_dirs)
    # every built-in reference resolves to a real object
    for kind in KINDS:
        for name in info.registers[kind]:
            assert plugins.registries[kind].get(name) is not None


def test_subfit_plugins_lists_builtin():
    out = run([str(BIN / "subfit-plugins")])
    lines = out.splitlines()
    assert f"builtin  (subfit {subfit_core.__version__})" in lines
    for kind in KINDS:
        assert re.search(rf"^  {kind}s\s+\S", out, re.M), f"no '{kind}s' row in:\n{out}"
    assert re.search(r"^  scorers\s+.*\boutput\b", out, re.M)
    assert "recipes" in lines
    assert re.search(r"^  subfit\s+\S+subfit\.yaml$", out, re.M)


# ----------------------------------------------------------------------------- third-party plugin


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory):
    """pip-install the example plugin (non-editable) into this venv; uninstall it afterwards."""
    # build from a copy so the source tree gets no build/ or egg-info droppings
    src = tmp_path_factory.mktemp("example-plugin") / "subfit_example_plugin"
    shutil.copytree(FIXTURE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src)])
    try:
        yield
    finally:
        subprocess.run([*pip, "uninstall", "-y", "-q", "subfit-example-plugin"], capture_output=True,
                       env=SUBPROCESS_ENV, timeout=120)
        # a later test that imports the docs' copy of the package must not get the uninstalled one
        for name in [m for m in sys.modules if m.split(".")[0] == "subfit_example_plugin"]:
            del sys.modules[name]
        importlib.invalidate_caches()


def test_installed_plugin_is_listed(example_plugin):
    out = run([str(BIN / "subfit-plugins")])
    block = re.search(r"^example\s+\(subfit-example-plugin 0\.3\.0\)\n((?:  .*\n)*)", out, re.M)
    assert block, out
    assert re.search(r"^  scorers\s+layer-depth$", block.group(1), re.M), block.group(1)
    assert "builtin  (subfit" in out  # the built-ins are still listed beside it
    recipe = re.search(r"^  example-deep\s+(\S+)$", out, re.M)
    assert recipe, out
    path = Path(recipe.group(1))
    assert path.name == "example-deep.yaml" and path.is_file()
    assert "site-packages" in path.parts  # the installed copy, not the fixture source
    assert FIXTURE.resolve() not in path.resolve().parents


SELECT_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from subfit_core.engine.budget import Budget
    from subfit_core.config import set_dotted, validate
    from subfit_core.engine.corpus import Windows
    from subfit_core.engine.pipeline import build_components
    from subfit_core.plugins import get_plugins
    from subfit_core.recipes import read_recipe
    from subfit_core.engine.workbench import Workbench
    from subfit_plugins.adapters.llama import LlamaFamilyAdapter

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, intermediate_size=64)).eval()
    plugins = get_plugins()
    out = {"scorer_origin": plugins.scorer.entry("layer-depth").origin}
    for prefer in ("deep", "shallow"):
        data, path = read_recipe(plugins, "example-deep")
        if prefer == "shallow":
            set_dotted(data, "scorer.prefer", prefer)
        cfg = validate(data)
        comps = build_components(plugins, cfg)
        adapter = LlamaFamilyAdapter(model)
        ids = lambda n: torch.randint(0, 128, (n, 16))
        windows = Windows(calib=ids(8), scoring=ids(4), heldout=ids(4), source="random ids")
        bench = Workbench(model, adapter, windows, 4, torch.device("cpu"))
        bench.collect()
        budget = Budget(cfg["sparsity"], cfg["sparsity_unit"], adapter)
        plan = comps.selector.select(bench, comps.scorer, comps.fitter, budget)
        out[prefer] = {
            "recipe": cfg["name"], "scorer": type(comps.scorer).__module__ + ":" + type(comps.scorer).__name__,
            "selected": [s.name for s in plan.subs], "scores": [r.score for r in plan.replacements],
            "estimated_sparsity": plan.notes["estimated_sparsity"],
        }
    print(json.dumps(out))
""")


def test_installed_plugin_scorer_drives_selection(example_plugin):
    out = json.loads(run([sys.executable, "-c", SELECT_SCRIPT]).strip().splitlines()[-1])
    assert out["scorer_origin"] == "plugin 'example' (subfit-example-plugin 0.3.0)"
    deep, shallow = out["deep"], out["shallow"]
    assert deep["recipe"] == "example-deep"
    assert deep["scorer"] == "subfit_example_plugin:LayerDepthScorer"
    # layer-depth scores -layer: the last layer (attn and ffn tie; attn comes first in stream order)
    assert deep["selected"] == ["L3.attn", "L3.ffn"]
    assert deep["scores"] == [-3.0, -3.0]
    assert deep["estimated_sparsity"] >= 0.1
    # the plugin's own Params, set through the recipe: prefer=shallow picks the first layer
    assert shallow["selected"] == ["L0.attn", "L0.ffn"]
    assert shallow["scores"] == [0.0, 0.0]


def test_a_registered_class_must_implement_its_interface():
    from subfit_core.hookspecs import hookimpl

    class NotAScorer:
        pass

    class Plugin:
        @hookimpl
        def subfit_scorers(self):
            return {"fake": NotAScorer}

        @hookimpl
        def subfit_datasets(self):
            return {"not-callable": 42}

    plugins = Plugins(make_plugin_manager(extra_plugins=(Plugin(),)))
    with pytest.raises(SubFitError, match=r"scorer 'fake' registered by plugin .* is .*NotAScorer.*, not a Scorer subclass"):
        plugins.scorer.get("fake")
    with pytest.raises(SubFitError, match=r"dataset 'not-callable' registered by plugin .* is 42, not a callable"):
        plugins.dataset.get("not-callable")


def test_defaults_come_from_plugins_and_a_second_setter_is_refused(monkeypatch):
    from subfit_core import config

    assert get_plugins().default("model") == "smollm2-135m" and get_plugins().default("strategy") == "subfit"

    class Rival:
        @hookimpl
        def subfit_defaults(self):
            return {"model": "my-model"}

    with pytest.raises(SubFitError, match=r"default for 'model' is set twice: by plugin 'builtin' .* and by plugin"):
        Plugins(make_plugin_manager(extra_plugins=(Rival(),)))

    class Nobody:  # a registry without any defaults: what a recipe leaves out is named
        defaults: dict = {}

    monkeypatch.setattr(subfit_core.plugins, "get_plugins", lambda: Nobody())
    with pytest.raises(config.ConfigError, match=r"^model: not set, and no installed plugin gives it a default"):
        config.validate({"calib": {"dataset": "kjv"}})
    assert config.validate({"model": "m", "calib": {"dataset": "d"}, "scorer": {"name": "s"}, "selector": {"name": "g"},
                            "fitter": {"name": "f"}})["model"] == "m"
