"""Recipe schema: validated nested settings, ``key=value`` overrides, errors that name the key.

A recipe is YAML read with ``yaml.safe_load``. Engine-level keys are declared in ``SCHEMA``; the
``scorer``, ``selector``, ``fitter`` and ``factorizer`` sections hold ``name`` plus the parameters of that
component, validated against the component's own ``Params`` dataclass.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from subfit_core.errors import ConfigError, did_you_mean
from subfit_core.kinds import SECTIONS


@dataclass(frozen=True)
class Field:
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    nullable: bool = False
    items: builtins.type | None = None  # for list fields: the type every element must have
    auto: bool = False  # the string "auto" is allowed too (resolved when the run starts)


COMPONENT_SECTIONS = SECTIONS  # scorer, selector, fitter, factorizer, runner
RENAMED = {"bench": "speed", "factorize": "factorizer"}  # recipe keys of earlier versions -> their name now

SCHEMA: dict[str, Any] = {
    "name": Field(str, "custom", "recipe name"),
    "description": Field(str, "", "one line saying what the recipe does"),
    "model": Field(str, None, "registered short name, local directory, or hub id (default: the plugins')"),
    "trust_remote_code": Field(bool, False, "allow a hub model's own code to run (off: safer)"),
    "device": Field(str, "auto", "auto, cpu, cuda or cuda:N"),
    "dtype": Field(str, "float32", "model weights dtype", choices=("float32", "bfloat16", "float16")),
    "offload": Field(str, "auto", "where weights wait while another layer runs: none (all in memory), gpus (spread over "
                                  "the GPUs' memory, copied to the compute device per module), cpu (host memory, "
                                  "streamed to the device per module), disk (read from the safetensors shards per module), "
                                  "auto (none when the model fits with room, else gpus, cpu or disk)",
                     choices=("auto", "none", "gpus", "cpu", "disk")),
    "fit_device": Field(str, "auto", "where fits run their float64 algebra: compute (the compute device), cpu, or "
                                     "auto (compute on a GPU with fast float64, e.g. A100, H100, when a fit's matrices "
                                     "fit in its free memory; else cpu)", choices=("auto", "cpu", "compute")),
    "seed": Field(int, 0, "seed for window sampling"),
    "output_dir": Field(str, "runs/subfit", "where the compressed model is written (atomically)"),
    "overwrite": Field(bool, False, "replace an existing output_dir"),
    "save": Field(bool, True, "write the compressed model (false: only report)"),
    "sparsity": Field(float, 0.25, "share of the decoder to remove", min=0.0, max=0.95),
    "sparsity_unit": Field(str, "layers", "layers: layer-equivalents; params: decoder parameters",
                           choices=("layers", "params")),
    "cache_stats": Field(bool, True, "keep dense statistics and scoring evaluations under $SUBFIT_CACHE: "
                                     "a killed run resumes where it was"),
    "anchored": Field(bool, False, "refit bypasses on the compressed model's inputs (dense targets)"),
    "drift_correction": Field(float, 0.0, "anchored refit only (ignored without it): share of the compressed "
                                          "stream's drift from the dense one each bypass is also fitted to undo "
                                          "(0: the dense contribution only; 1: the whole dense stream)",
                              min=0.0, max=1.0),
    "calib": {
        "dataset": Field(str, None, "registered text source or a local .txt/.json/.jsonl file (default: the plugins')"),
        "samples": Field(int, 64, "calibration windows (statistics and fits)", min=1),
        "seq_len": Field(int, 256, "tokens per window", min=8),
        "batch_size": Field(int, 8, "windows per forward batch (auto: from the memory free once the model is loaded)",
                            min=1, auto=True),
        "generated": Field(float, 0.0, "share of the calibration and scoring windows sampled from the dense model "
                                       "itself (its own distribution: fits and choices that hold beyond calib.dataset)",
                           min=0.0, max=1.0),
    },
    "scoring": {
        "samples": Field(int, 4, "windows, disjoint from calibration, that selection is judged on", min=1),
        "stride": Field(int, 2, "judge the next-token distribution at every stride-th position", min=1),
    },
    "eval": {
        "dataset": Field(str, None, "text source for held-out perplexity (default: calib.dataset)", nullable=True),
        "windows": Field(int, 30, "held-out windows for perplexity (per domain)", min=1),
        "domains": Field(list, None, "text sources whose held-out perplexity is also reported: the calibration "
                                     "domain and others (null: every domain the plugins name; []: none)",
                         nullable=True, items=str),
        "seq_len": Field(int, 256, "tokens per held-out window", min=8),
        "batch_size": Field(int, 8, "windows per forward batch, also lm-eval's (auto: from the memory free once the "
                                    "model is loaded)", min=1, auto=True),
        "tasks": Field(list, [], "lm-eval tasks, zero-shot, dense and compressed (the plugins' bundled task "
                                 "folders, listed by subfit-plugins; online: arc_easy, hellaswag, ...)",
                       items=str),
        "limit": Field(int, None, "at most this many items per lm-eval task (null: all)", min=1, nullable=True),
        "speed": Field(bool, False, "measure deployment speed, memory and KV cache, dense and compressed (see speed.*)"),
    },
    "speed": {  # what eval.speed and subfit-speed measure
        "prompt_lengths": Field(list, [64, 256], "prompt lengths (tokens) for time to first token", items=int),
        "batch_sizes": Field(list, [1, 4], "batch sizes for time to first token and decoding", items=int),
        "new_tokens": Field(int, 32, "tokens generated to time decoding", min=2),
        "repeats": Field(int, 3, "timed repeats per setting (median reported), after one warm-up", min=1),
    },
    "sweep": {  # read by subfit-sweep only; subfit-run ignores this section
        "trials": Field(int, 20, "finished trials (complete or pruned) the study ends with, over all workers", min=1),
        "storage": Field(str, None, "Optuna storage URL or file (.db: SQLite, .log: journal); default <output_dir>.db",
                         nullable=True),
        "study_name": Field(str, "subfit-sweep", "workers running the same command join this study"),
        "output_dir": Field(str, "runs/sweep", "trials table, Pareto front, best recipe (written atomically)"),
        "objectives": Field(list, ["ppl"], "[ppl], [ppl, sparsity] or [ppl, latency]; ppl on the validation split"),
        "sampler": Field(str, "auto", "auto: tpe for one objective, nsga2 for several",
                         choices=("auto", "tpe", "nsga2", "random")),
        "pruner": Field(str, "median", "stop clearly worse trials from intermediate values", choices=("median", "none")),
        "prune_steps": Field(int, 4, "validation perplexity is reported after each of this many window chunks", min=1),
        "seed": Field(int, None, "sampler seed (a later worker adds the study's trial count)", nullable=True),
        "validation_windows": Field(int, 16, "windows of the calibration text, disjoint from calib/scoring", min=1),
        "heartbeat_s": Field(int, 30, "RDB storages: a worker silent for 2x this long is dead; its trial is retried",
                             min=1),
        "enqueue_base": Field(bool, True, "first trial of a new study: the recipe's own values (a baseline)"),
        "space": Field(dict, {}, "dotted recipe key -> {int|float: [lo, hi], log, step} or {categorical: [...]}"),
    },
    "scorer": {"name": Field(str, None, "registered scorer (default: the plugins')")},
    "selector": {"name": Field(str, None, "registered selector (default: the plugins')")},
    "fitter": {"name": Field(str, None, "registered fitter (default: the plugins')")},
    "factorizer": {"name": Field(str, "none", "registered factorizer of the remaining linears, or none")},
    "runner": {"name": Field(str, "none", "registered runner delivering the run another way, or none: one compressed "
                                          "model")},
}


def defaults() -> dict:
    """Every engine key's default; the plugins' defaults (``subfit_defaults``) fill the rest."""
    from subfit_core.plugins import get_plugins

    def walk(node):
        return {k: walk(v) if isinstance(v, dict) else v.default for k, v in node.items()}

    out = walk(SCHEMA)
    for key, (value, origin) in get_plugins().defaults.items():
        if key == "strategy":
            continue
        node: Any = SCHEMA  # a section (dict), then a Field, or None for a key the schema lacks
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, Field):
            raise ConfigError(f"{key}: {origin} gives a default for a key the recipe schema does not have")
        set_dotted(out, key, coerce(f"{key} (default from {origin})", value, node))
    return out


def _check_set(cfg: dict, node: dict, prefix: str = "") -> None:
    """A key without a value anywhere (no default, none from a plugin) is named before any work."""
    for key, spec in node.items():
        if isinstance(spec, dict):
            _check_set(cfg.get(key, {}), spec, f"{prefix}{key}.")
        elif cfg.get(key) is None and not spec.nullable:
            raise ConfigError(f"{prefix}{key}: not set, and no installed plugin gives it a default; "
                              f"set {prefix}{key}=... ({spec.help})")


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", parsed value). Values are YAML scalars or flow lists/maps."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected key=value, e.g. sparsity=0.25")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{part}' holds a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Apply ``key=value`` overrides to a recipe in order. Naming a different component
    (``scorer.name=rotation``) starts that section afresh: the recipe's parameters were for the old one."""
    for key, value in overrides:
        section = key.split(".")[0]
        if key == f"{section}.name" and section in COMPONENT_SECTIONS:
            current = data.get(section)
            if not isinstance(current, dict) or current.get("name") != value:
                data[section] = {}
        set_dotted(data, key, value)
    return data


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ----------------------------------------------------------------------------- validation


def coerce(key: str, value: Any, field: Field) -> Any:
    """Check one value against its Field; ints are accepted where floats are expected."""
    if value is None:
        if field.nullable:
            return None
        raise ConfigError(f"{key}: null is not allowed; expected {field.type.__name__}")
    if field.auto and value == "auto":
        return value
    if field.type is float and isinstance(value, str):
        try:  # YAML 1.1 reads exponents without a dot (1e-3) as strings
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, field.type) and not (field.type is int and isinstance(value, bool))
    if field.type is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        allowed = "; allowed: true, false" if field.type is bool else "; allowed: a number or auto" if field.auto else ""
        name = field.type.__name__
        raise ConfigError(f"{key}: {value!r} is not {'an' if name[0] in 'aeiou' else 'a'} {name}{allowed}")
    if field.items is not None:
        bad = [v for v in value if not isinstance(v, field.items) or isinstance(v, bool)]
        if bad:
            raise ConfigError(f"{key}: {bad[0]!r} is not a {field.items.__name__}; give a list of "
                              f"{field.items.__name__}s, e.g. [{'a,b' if field.items is str else '1,2'}]")
        if field.items is int and any(v < 1 for v in value):
            raise ConfigError(f"{key}: {value!r}; every entry must be at least 1")
    if field.choices is not None and value not in field.choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; {did_you_mean(value, field.choices)}")
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if field.min is not None and value < field.min:
        raise ConfigError(f"{key}: {value!r} is below the minimum {field.min}")
    if field.max is not None and value > field.max:
        raise ConfigError(f"{key}: {value!r} is above the maximum {field.max}")
    return value


def parse_bool(key: str, value: Any) -> bool:
    """A command-line flag such as ``overwrite=true``: true or false, nothing else."""
    return coerce(key, value, Field(bool, False, key))


def validate_section(prefix: str, values: dict, schema: dict) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {values!r}")
    out = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in schema:
            if full in RENAMED:
                raise ConfigError(f"{full}: renamed to {RENAMED[full]}; write {RENAMED[full]}: instead")
            raise ConfigError(f"{full}: unknown key; {did_you_mean(key, schema)}")
        spec = schema[key]
        out[key] = validate_section(f"{full}.", value, spec) if isinstance(spec, dict) else coerce(full, value, spec)
    return out


def validate(cfg: dict) -> dict:
    """Validate engine keys; component sections keep their extra keys for ``validate_params``."""
    engine_part = {k: v for k, v in cfg.items() if k not in COMPONENT_SECTIONS}
    given = defaults()
    out = merge(given, validate_section("", engine_part, SCHEMA))
    for section in COMPONENT_SECTIONS:
        values = cfg.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping with 'name', got {values!r}")
        name = values.get("name", given[section]["name"])
        out[section] = {**values, "name": name if name is None else coerce(f"{section}.name", name, SCHEMA[section]["name"])}
    _check_set(out, SCHEMA)
    return out


# ----------------------------------------------------------------------------- component params


def _field_for(annotation: Any, default: Any) -> Field:
    """A Field from a dataclass annotation such as ``int``, ``float | None`` or ``Literal["a","b"]``."""
    nullable = False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        nullable = True
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return Field(type(choices[0]), default, "", choices=choices, nullable=nullable)
    base = typing.get_origin(annotation) or annotation
    return Field(base, default, "", nullable=nullable)


def validate_params(prefix: str, section: dict, params_cls: type) -> Any:
    """Build a component's ``Params`` dataclass from its recipe section (without ``name``)."""
    hints = typing.get_type_hints(params_cls)
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    kwargs = {}
    for key, value in section.items():
        if key == "name":
            continue
        if key not in fields:
            allowed = [k for k in fields] + ["name"]
            raise ConfigError(f"{prefix}.{key}: unknown key for this component; {did_you_mean(key, allowed)}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs[key] = coerce(f"{prefix}.{key}", value, _field_for(hints[key], default))
    try:
        return params_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix}: {exc}") from None


def params_help(params_cls: type) -> list[tuple[str, Any]]:
    out = []
    for f in dataclasses.fields(params_cls):
        if f.default is not dataclasses.MISSING:
            out.append((f.name, f.default))
        elif f.default_factory is not dataclasses.MISSING:
            out.append((f.name, f.default_factory()))
    return out


def flatten(cfg: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            rows.extend(flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def schema_help() -> list[tuple[str, Any, str]]:
    rows = []

    def walk(node, prefix):
        for key, spec in node.items():
            if isinstance(spec, dict):
                walk(spec, f"{prefix}{key}.")
            else:
                allowed = f" ({', '.join(map(str, spec.choices))})" if spec.choices else ""
                rows.append((f"{prefix}{key}", spec.default, spec.help + allowed))

    walk(SCHEMA, "")
    given = dict(flatten(defaults()))
    return [(key, given.get(key, default), text) for key, default, text in rows]


