"""Recipe validation: every error is one line naming the key, the value and what is allowed, and
the CLI prints it without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from subfit_core.config import SCHEMA, defaults, merge, parse_override, schema_help, set_dotted, validate, validate_params
from subfit_core.errors import ConfigError, SubFitError
from subfit_core.plugins import build_component, get_plugins

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SUBFIT_PROGRESS": "0"}


def error_of(fn, *args, exc=ConfigError) -> str:
    with pytest.raises(exc) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- engine keys


def test_defaults_validate():
    cfg = validate({})
    assert cfg["sparsity"] == 0.25 and cfg["calib"]["samples"] == 64 and cfg["fitter"] == {"name": "per-type"}
    assert cfg == validate(cfg)


def test_unknown_key_suggests_nearest():
    msg = error_of(validate, {"sparsty": 0.3})
    assert msg.startswith("sparsty: unknown key")
    assert "did you mean 'sparsity'" in msg
    assert "sparsity_unit" in msg  # the allowed keys are listed


def test_unknown_nested_key_names_the_full_path():
    msg = error_of(validate, {"calib": {"sampels": 3}})
    assert msg.startswith("calib.sampels:") and "did you mean 'samples'" in msg


@pytest.mark.parametrize("value", ["abc", True, [0.1]])
def test_bad_type(value):
    msg = error_of(validate, {"sparsity": value})
    assert msg.startswith("sparsity:") and repr(value) in msg and "float" in msg


def test_int_accepted_for_float_but_not_float_for_int():
    assert validate({"sparsity": 0})["sparsity"] == 0.0 and isinstance(validate({"sparsity": 0})["sparsity"], float)
    msg = error_of(validate, {"calib": {"samples": 3.5}})
    assert "calib.samples" in msg and "3.5" in msg and "int" in msg
    msg = error_of(validate, {"seed": False})
    assert "seed" in msg and "False" in msg and "int" in msg


@pytest.mark.parametrize("key,value,bound", [("sparsity", 1.5, "maximum 0.95"), ("sparsity", -0.1, "minimum 0.0"),
                                             ("calib.seq_len", 4, "minimum 8")])
def test_out_of_range(key, value, bound):
    cfg: dict = {}
    set_dotted(cfg, key, value)
    msg = error_of(validate, cfg)
    assert msg.startswith(f"{key}:") and str(value) in msg and bound in msg


def test_bad_choice_lists_allowed():
    msg = error_of(validate, {"dtype": "float8"})
    assert msg.startswith("dtype:") and "'float8'" in msg
    for allowed in ("float32", "bfloat16", "float16"):
        assert allowed in msg
    msg = error_of(validate, {"sparsity_unit": "layer"})
    assert "did you mean 'layers'" in msg


def test_null_only_where_allowed():
    assert validate({"eval": {"dataset": None}})["eval"]["dataset"] is None
    msg = error_of(validate, {"model": None})
    assert msg.startswith("model:") and "null" in msg and "str" in msg


def test_component_section_given_a_value():
    msg = error_of(validate, {"scorer": "output"})
    assert msg.startswith("scorer:") and "'output'" in msg and "mapping" in msg


def test_engine_section_given_a_value():
    msg = error_of(validate, {"calib": 5})
    assert msg.startswith("calib:") and "5" in msg and "mapping" in msg


# ----------------------------------------------------------------------------- components


def test_unknown_component_param_suggests_nearest():
    msg = error_of(build_component, get_plugins(), "scorer", {"name": "output", "metrc": "kl"}, "scorer")
    assert msg.startswith("scorer.metrc:") and "did you mean 'metric'" in msg


def test_bad_component_param_value():
    msg = error_of(build_component, get_plugins(), "scorer", {"name": "output", "metric": "kll"}, "scorer")
    assert msg.startswith("scorer.metric:") and "'kll'" in msg and "kl" in msg and "loss" in msg
    msg = error_of(build_component, get_plugins(), "fitter", {"name": "low-rank", "rank": "64"}, "fitter")
    assert msg.startswith("fitter.rank:") and "'64'" in msg and "int" in msg
    # a Params.__post_init__ check is reported with the section
    msg = error_of(build_component, get_plugins(), "fitter", {"name": "low-rank", "rank": 0}, "fitter")
    assert msg.startswith("fitter:") and "rank" in msg
    msg = error_of(build_component, get_plugins(), "selector", {"name": "greedy", "kinds": "attn,mlp"}, "selector")
    assert msg.startswith("selector:") and "kinds" in msg


def test_nested_component_params_are_validated():
    msg = error_of(build_component, get_plugins(), "fitter",
                   {"name": "per-type", "ffn": {"name": "shared-basis", "rnak": 8}}, "fitter")
    assert msg.startswith("fitter.ffn.rnak:") and "did you mean 'rank'" in msg


def test_unknown_component_name_suggests_nearest():
    cfg = validate({"scorer": {"name": "outptu"}})  # names are checked against the registry when built
    msg = error_of(build_component, get_plugins(), "scorer", cfg["scorer"], "scorer", exc=SubFitError)
    assert msg.startswith("scorer.name:") and "'outptu'" in msg and "did you mean 'output'" in msg


def test_valid_component_params_reach_the_component():
    fitter = build_component(get_plugins(), "fitter", {"name": "low-rank", "rank": 8, "ridge": 0}, "fitter")
    assert fitter.params.rank == 8 and fitter.params.ridge == 0.0 and isinstance(fitter.params.ridge, float)


def test_unknown_recipe_suggests_nearest():
    from subfit_core.recipes import read_recipe

    msg = error_of(read_recipe, get_plugins(), "subfitt")
    assert msg.startswith("strategy:") and "'subfitt'" in msg and "did you mean 'subfit'" in msg


def test_missing_recipe_file():
    from subfit_core.recipes import read_recipe

    msg = error_of(read_recipe, get_plugins(), "/nonexistent/recipe.yaml")
    assert msg.startswith("strategy:") and "/nonexistent/recipe.yaml" in msg


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("text,expected", [
    ("a.b=[1,2]", ("a.b", [1, 2])),
    ("sparsity=0.3", ("sparsity", 0.3)),
    ("calib.samples=32", ("calib.samples", 32)),
    ("eval.dataset=null", ("eval.dataset", None)),
    ("fitter.attn={name: low-rank, rank: 8}", ("fitter.attn", {"name": "low-rank", "rank": 8})),
    ("model=a=b", ("model", "a=b")),
    ("description=", ("description", "")),
    ("save=false", ("save", False)),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["sparsity", "=0.3"])
def test_parse_override_needs_key_and_value(text):
    msg = error_of(parse_override, text)
    assert text in msg and "key=value" in msg


def test_set_dotted_builds_nested_sections():
    cfg = {"calib": {"samples": 64}}
    set_dotted(cfg, "calib.seq_len", 128)
    set_dotted(cfg, "a.b.c", [1, 2])
    assert cfg == {"calib": {"samples": 64, "seq_len": 128}, "a": {"b": {"c": [1, 2]}}}
    msg = error_of(set_dotted, {"sparsity": 0.3}, "sparsity.x", 1)
    assert "sparsity" in msg


def test_merge_is_deep_and_does_not_alias():
    base = {"calib": {"samples": 64, "seq_len": 256}, "scorer": {"name": "output"}}
    out = merge(base, {"calib": {"samples": 8}})
    assert out == {"calib": {"samples": 8, "seq_len": 256}, "scorer": {"name": "output"}}
    out["calib"]["seq_len"] = 1
    assert base["calib"]["seq_len"] == 256


def test_every_schema_key_has_help():
    keys = {k for k, _, _ in schema_help()}
    assert {"sparsity", "calib.samples", "eval.dataset", "scoring.stride", "scorer.name"} <= keys
    assert all(text for _, _, text in schema_help())
    assert set(defaults()) == set(SCHEMA)


def test_validate_params_rejects_unknown_and_keeps_defaults():
    from subfit_plugins.fitters.shared_basis import SharedBasisParams

    params = validate_params("fitter", {"name": "shared-basis", "rank": 16}, SharedBasisParams)
    assert params == SharedBasisParams(rank=16)


# ----------------------------------------------------------------------------- the CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "subfit-run"), *args], capture_output=True, text=True, env=ENV, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["sparsty=0.3"], "did you mean 'sparsity'"),
    (["strategy=subfitt"], "did you mean 'subfit'"),
    (["--verbose"], "--verbose"),
    (["strategy=uidl", "scorer.name=rotation"],  # caught before the model loads
     "scorer.name: rotation scores single submodules only, but selector contiguous asks for whole layers or "
     "windows; use one of: angular-distance, output"),
])
def test_cli_errors_are_one_line_without_traceback(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("subfit-run: error:") and needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_help_lists_keys():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "calib.samples" in proc.stdout and "sparsity" in proc.stdout
    assert "scorer.metric" in proc.stdout  # the default recipe's component keys
    assert "Traceback" not in proc.stderr


def test_exponent_floats_are_floats_although_yaml_1_1_reads_them_as_strings():
    from subfit_core.apps.cli import resolve_recipe

    cfg = resolve_recipe(["strategy=subfit", "sparsity=2.5e-1"])
    assert cfg["sparsity"] == 0.25
    with pytest.raises(ConfigError, match="sparsity: 'abc' is not a float"):
        resolve_recipe(["strategy=subfit", "sparsity=abc"])


def test_choosing_another_component_drops_the_recipes_parameters_for_the_old_one():
    from subfit_core.apps.cli import resolve_recipe

    cfg = resolve_recipe(["strategy=subfit", "scorer.name=rotation", "scorer.combine=rot"])
    assert cfg["scorer"] == {"name": "rotation", "combine": "rot"}  # subfit.yaml's scorer.metric is gone
    same = resolve_recipe(["strategy=subfit", "scorer.name=output"])
    assert same["scorer"]["metric"] == "kl"  # same component: the recipe's parameters stay


def test_a_renamed_section_names_its_new_name():
    msg = error_of(validate, {"bench": {"repeats": 2}})
    assert msg == "bench: renamed to speed; write speed: instead"


def test_the_old_factorize_section_is_told_its_new_name():
    assert error_of(validate, {"factorize": {"name": "svd"}}) == "factorize: renamed to factorizer; write factorizer: instead"
