"""``subfit-bench output_dir=RUN``: deployment speed, memory and KV cache of a saved SubFit model
against its dense original, measured in one process (see ``subfit_core.deploy``).

The compressed model is loaded with ``load_compressed``; the dense original is the ``model`` named
in the run's ``recipe.yaml``, loaded with the run's ``dtype``. Writes ``deployment.json`` and
``deployment.md`` into the run directory (each file written whole, then renamed into place).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from .cli import command
from .config import SCHEMA, ConfigError, defaults, parse_override, validate_section
from .errors import SubFitError, did_you_mean

USAGE = """usage: subfit-bench output_dir=RUN_DIR [device=auto|cpu|cuda[:N]] [bench.KEY=VALUE ...]

Time to first token, decode tokens/s, working memory and KV-cache bytes of the compressed model in
RUN_DIR (a subfit-run output) and of its dense original, in one process, quoted as ratios.
  bench.prompt_lengths=[64,256]  bench.batch_sizes=[1,4]  bench.new_tokens=32  bench.repeats=3
Writes RUN_DIR/deployment.json and RUN_DIR/deployment.md and prints the table.
"""


def parse_args(argv: list[str]) -> tuple[Path, str, dict]:
    run_dir, device, section = None, "auto", {}
    for key, value in map(parse_override, argv):
        if key == "output_dir":
            run_dir = Path(str(value))
        elif key == "device":
            device = str(value)
        elif key.startswith("bench."):
            section[key.removeprefix("bench.")] = value
        else:
            raise ConfigError(f"{key}: unknown key; {did_you_mean(key, ['output_dir', 'device'] + [f'bench.{k}' for k in SCHEMA['bench']])}")
    if run_dir is None:
        raise ConfigError("output_dir: give the run directory to measure, e.g. output_dir=runs/subfit")
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "model.safetensors").is_file():
        raise SubFitError(f"output_dir: '{run_dir}' is not a saved subfit-run directory (no recipe.yaml / model.safetensors)")
    return run_dir, device, {**defaults()["bench"], **validate_section("bench.", section, SCHEMA["bench"])}


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bench(argv: list[str]) -> tuple[dict, str, Path]:
    import torch

    from .artifact import load_compressed
    from .deploy import BenchSettings, benchmark, markdown, ratios
    from .models import load_model, resolve_device
    from .plugins import get_plugins

    run_dir, device_name, section = parse_args(argv)
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    device = resolve_device(device_name)
    dtype = getattr(torch, recipe.get("dtype", "float32"))
    compressed, _ = load_compressed(run_dir, device=device, dtype=dtype)
    dense, _, source = load_model(get_plugins(), recipe["model"], device, dtype, bool(recipe.get("trust_remote_code")))
    dense.eval()
    result = benchmark({"dense": dense, "compressed": compressed}, BenchSettings.from_config(section), device)
    result["ratios"] = ratios(result)
    result["run"], result["model"] = str(run_dir), source
    table = markdown(result, result["ratios"])
    write_atomic(run_dir / "deployment.json", json.dumps(result, indent=2))
    write_atomic(run_dir / "deployment.md", f"# Deployment: {run_dir} vs {source}\n\n{table}")
    return result, table, run_dir


@command("subfit-bench")
def bench_main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(USAGE)
        return 0
    _, table, run_dir = bench(argv)
    print(table)
    print(f"written to {run_dir / 'deployment.json'} and deployment.md")
    return 0
