"""Property: whatever keys, values or YAML documents a user gives the recipe parser, the outcome
is a validated config or a one-line ConfigError, never another exception."""

from __future__ import annotations

import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from subfit_core.apps.cli import resolve_recipe  # noqa: E402
from subfit_core.config import SCHEMA, ConfigError, apply_overrides, flatten, parse_override, validate  # noqa: E402
from subfit_core.engine.pipeline import build_components  # noqa: E402
from subfit_core.errors import SubFitError  # noqa: E402
from subfit_core.plugins import get_plugins  # noqa: E402
from subfit_core.recipes import load_yaml  # noqa: E402

KNOWN = [k for k, _ in flatten({k: v for k, v in SCHEMA.items()})] + [
    "scorer.name", "selector.name", "fitter.name", "fitter.attn.rank", "fitter.ffn.name", "selector.rounds",
    "factorizer.name", "factorizer.kept_ratio", "sweep.space", "eval.tasks", "calib.generated"]
keys = st.one_of(st.sampled_from(KNOWN), st.text(min_size=0, max_size=12),
                 st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(KNOWN), st.text(max_size=6)))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20), st.sampled_from(["kjv", "greedy", "output", "none", "per-type", ".nan", "1e-3",
                                                           "[a,b]", "{x: 1}", "true", "maybe", "0.25"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)


def outcome(make) -> None:
    try:
        cfg = make()
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc), repr(exc)
        return
    except SubFitError as exc:  # component construction reports through the same one-line type
        assert "\n" not in str(exc) and str(exc), repr(exc)
        return
    assert isinstance(cfg, dict)


def validated(data: dict) -> dict:
    cfg = validate(data)
    build_components(get_plugins(), cfg)
    return cfg


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.lists(st.tuples(keys, values), max_size=5))
def test_random_overrides_give_a_config_or_a_config_error(pairs):
    outcome(lambda: validated(apply_overrides(resolve_recipe(["strategy=subfit"]), list(pairs))))


@FAST
@given(st.lists(st.text(max_size=30), max_size=5))
def test_random_command_line_arguments_give_a_config_or_a_config_error(args):
    outcome(lambda: validated(apply_overrides(resolve_recipe(["strategy=subfit"]), [parse_override(a) for a in args])))


@FAST
@given(st.dictionaries(keys, values, max_size=6))
def test_random_recipe_mappings_give_a_config_or_a_config_error(data):
    outcome(lambda: validated(apply_overrides({}, list(data.items()))))


@FAST
@given(st.one_of(st.text(max_size=200), st.builds(lambda d: yaml.safe_dump(d), st.dictionaries(keys, values, max_size=5)),
                 st.binary(max_size=100)))
def test_random_yaml_documents_give_a_config_or_a_config_error(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_bytes(document if isinstance(document, bytes) else document.encode("utf-8", "surrogatepass"))
    outcome(lambda: validated(load_yaml(path, "strategy")))
