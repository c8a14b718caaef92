"""``subfit-speed output_dir=RUN``: deployment speed, memory and KV cache of a saved SubFit model
against its dense original, measured in one process (see ``subfit_core.evaluation.speed``).

The compressed model is loaded with ``load_compressed``; the dense original is ``model=`` if given,
else the ``model`` named in the run's ``recipe.yaml``, loaded with the run's ``dtype``. Whether
the dense model's own code may run (``trust_remote_code=true``) is read from the command line
only, never from a file inside the run folder: a folder from someone else cannot make it run code. Writes ``deployment.json`` and
``deployment.md`` into the run directory (each file written whole, then renamed into place).
"""

from __future__ import annotations

import json
from pathlib import Path

from subfit_core.apps.cli import command
from subfit_core.config import SCHEMA, ConfigError, coerce, defaults, parse_bool, parse_override, validate_section
from subfit_core.errors import SubFitError, did_you_mean

USAGE = """usage: subfit-speed output_dir=RUN_DIR [device=auto|cpu|cuda[:N]] [model=DENSE] [trust_remote_code=true] [speed.KEY=VALUE ...]

Time to first token, decode tokens/s, working memory and KV-cache bytes of the compressed model in
RUN_DIR (a subfit-run output) and of its dense original, in one process, quoted as ratios.
  speed.prompt_lengths=[64,256]  speed.batch_sizes=[1,4]  speed.new_tokens=32  speed.repeats=3
Writes RUN_DIR/deployment.json and RUN_DIR/deployment.md and prints the table.
"""


def parse_args(argv: list[str]) -> tuple[Path, str, dict, dict]:
    """(run folder, device, speed section, {model, trust_remote_code} given on the command line)."""
    dense: dict[str, str | bool | None]  # the dense model's name (None: the run's) and trust_remote_code
    run_dir, device, section, dense = None, "auto", {}, {"model": None, "trust_remote_code": False}
    for key, value in map(parse_override, argv):
        if key == "output_dir":
            run_dir = Path(str(value))
        elif key == "device":
            device = str(value)
        elif key == "model":
            dense["model"] = str(value)
        elif key == "trust_remote_code":
            dense["trust_remote_code"] = parse_bool(key, value)
        elif key.startswith("speed."):
            section[key.removeprefix("speed.")] = value
        else:
            allowed = ["output_dir", "device", "model", "trust_remote_code"] + [f"speed.{k}" for k in SCHEMA["speed"]]
            raise ConfigError(f"{key}: unknown key; {did_you_mean(key, allowed)}")
    if run_dir is None:
        raise ConfigError("output_dir: give the run directory to measure, e.g. output_dir=runs/subfit")
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "model.safetensors").is_file():
        raise SubFitError(f"output_dir: '{run_dir}' is not a saved subfit-run directory (no recipe.yaml / model.safetensors)")
    return run_dir, device, {**defaults()["speed"], **validate_section("speed.", section, SCHEMA["speed"])}, dense


def read_run_recipe(run_dir: Path) -> dict:
    """The run's recipe.yaml as data: the dense model's name and the dtype, each checked."""
    from subfit_core.recipes import load_yaml

    recipe = load_yaml(run_dir / "recipe.yaml", "output_dir")
    for key in ("model", "dtype"):
        if key in recipe:
            coerce(f"{run_dir / 'recipe.yaml'}: {key}", recipe[key], SCHEMA[key])
    return recipe


def measure(argv: list[str]) -> tuple[dict, str, Path]:
    import torch

    from subfit_core.artifact.folder import load_compressed
    from subfit_core.artifact.outputs import claim, write_atomic
    from subfit_core.engine.models import load_model, resolve_device
    from subfit_core.evaluation.speed import SpeedSettings, markdown, measure_speed, ratios
    from subfit_core.plugins import get_plugins

    run_dir, device_name, section, given = parse_args(argv)
    folder = run_dir.stat().st_ino  # the folder measured: results go to it only if it is still there
    recipe = read_run_recipe(run_dir)
    device = resolve_device(device_name)
    dtype = getattr(torch, recipe.get("dtype", "float32"))  # one of SCHEMA's choices (checked above)
    compressed, _ = load_compressed(run_dir, device=device, dtype=dtype)
    model = given["model"] or recipe.get("model")
    if not model:
        raise ConfigError(f"model: {run_dir / 'recipe.yaml'} names no dense model; give model=NAME")
    dense, _, source = load_model(get_plugins(), model, device, dtype, given["trust_remote_code"])
    dense.eval()
    result = measure_speed({"dense": dense, "compressed": compressed}, SpeedSettings.from_config(section), device)
    result["ratios"] = ratios(result)
    result["run"], result["model"] = str(run_dir), source
    table = markdown(result, result["ratios"])
    with claim(run_dir, wait=60):  # a rerun replacing the folder meanwhile waits, or this waits for it
        if run_dir.stat().st_ino != folder:
            raise SubFitError(f"output_dir: '{run_dir}' was replaced while it was measured; nothing written")
        write_atomic(run_dir / "deployment.json", json.dumps(result, indent=2))
        write_atomic(run_dir / "deployment.md", f"# Deployment: {run_dir} vs {source}\n\n{table}")
    return result, table, run_dir


@command("subfit-speed")
def speed_main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(USAGE)
        return 0
    _, table, run_dir = measure(argv)
    print(table)
    print(f"written to {run_dir / 'deployment.json'} and deployment.md")
    return 0
