"""Command-line entry points: ``subfit-run`` and ``subfit-plugins``."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

from subfit_core.config import ConfigError, apply_overrides, params_help, parse_override, schema_help, validate
from subfit_core.errors import SubFitError
from subfit_core.kinds import KINDS, SECTIONS

USAGE = """usage: subfit-run [strategy=NAME|PATH.yaml] [key=value ...] [--help] [--list]

Compress a causal LM by replacing attention/FFN submodules with fitted bypasses.
  strategy=subfit            a registered recipe (see --list), or your own YAML file
  key=value                  override any recipe key; dotted keys reach sections
                             (calib.samples=32), lists as [a,b], null for none
  --list                     list plugins, what they register, and the recipes
Example:
  subfit-run strategy=subfit model=smollm2-135m sparsity=0.25 calib.samples=64 output_dir=runs/x
"""


def command(prog: str, interrupted: str = "interrupted"):
    """Wrap a console script's ``main(argv)``: a user's mistake (``SubFitError``) is one line on
    stderr and exit 2, Ctrl-C one line (``interrupted``) and exit 130; never a traceback."""

    def wrap(main):
        @functools.wraps(main)
        def entry(argv: list[str] | None = None) -> int:
            try:
                return main(sys.argv[1:] if argv is None else argv)
            except SubFitError as exc:
                print(f"{prog}: error: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"{prog}: {interrupted}", file=sys.stderr)
                return 130

        return entry

    return wrap


def default_strategy() -> str:
    from subfit_core.plugins import get_plugins

    strategy = get_plugins().default("strategy")
    if strategy is None:
        raise ConfigError("strategy: none given, and no installed plugin names a default; give strategy=NAME or a .yaml path")
    return str(strategy)


def resolve_recipe(args: list[str]) -> dict:
    """Recipe named by ``strategy=`` (default: the plugins') with the ``key=value`` overrides applied."""
    from subfit_core.plugins import get_plugins
    from subfit_core.recipes import read_recipe

    overrides = [parse_override(a) for a in args]
    strategy = next((v for k, v in overrides if k == "strategy"), None)
    data, _ = read_recipe(get_plugins(), str(strategy if strategy is not None else default_strategy()))
    return validate(apply_overrides(data, [(k, v) for k, v in overrides if k != "strategy"]))


def print_help(args: list[str]) -> None:
    from subfit_core.plugins import get_plugins

    print(USAGE)
    print("Recipe keys (default):")
    for key, default, text in schema_help():
        print(f"  {key:<22} {json.dumps(default):<16} {text}")
    try:
        cfg = resolve_recipe([a for a in args if not a.startswith("-")])
    except SubFitError:
        return
    plugins = get_plugins()
    print(f"\nComponent keys of recipe '{cfg['name']}':")
    for section in SECTIONS:
        if cfg[section]["name"] == "none":
            print(f"  {section}.name = none")
            continue
        cls = plugins.registries[section].get(cfg[section]["name"])
        given = {k: v for k, v in cfg[section].items() if k != "name"}
        print(f"  {section}.name = {cfg[section]['name']}  ({cls.description})")
        for key, default in params_help(cls.Params):
            print(f"    {section}.{key:<18} {json.dumps(given.get(key, default))}")


def print_plugins() -> None:
    from subfit_core.plugins import get_plugins
    from subfit_core.recipes import available

    plugins = get_plugins()
    headings = {k.name: k.heading for k in KINDS}
    width = max(len(h) for h in headings.values())
    for info in plugins.info.values():
        print(f"{info.name}  ({info.distribution} {info.version})")
        for kind, names in sorted(info.registers.items()):
            print(f"  {headings[kind]:<{width}} {', '.join(names)}")
    print("recipes")
    for name, path in available(plugins).items():
        print(f"  {name:<20} {path}")
    from subfit_core.evaluation.tasks import STANDARD_TASKS, local_tasks

    print("eval tasks (eval.tasks=[...])")
    for name, config in local_tasks(plugins).items():
        print(f"  {name:<28} {config.get('output_type', '')}")
    print(f"  {'(with dataset hub access)':<28} {', '.join(STANDARD_TASKS)}, or any lm-eval task")
    print("eval domains (eval.domains, default)")
    for name, origin in plugins.eval_domains:
        print(f"  {name:<28} {origin}")


@command("subfit-run", "interrupted; nothing was written")
def run_main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("SUBFIT_LOG", "WARNING"))
    if "--help" in argv or "-h" in argv:
        print_help(argv)
        return 0
    if "--list" in argv:
        print_plugins()
        return 0
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:
        raise ConfigError(f"option '{unknown[0]}' is not known; allowed: --help, --list, key=value")
    cfg = resolve_recipe(argv)
    from subfit_core.engine.pipeline import run

    results = run(cfg)
    print(summary(results))
    return 0


def compression_time(t: dict) -> str:
    """The summary's compression-time cell: seconds, the ratio to a dense pass, and what came from caches."""
    text = f"{t['compression_s']:.1f} s = {t['compression_over_dense_forward']:.2f}x a dense calibration forward"
    if t.get("statistics_from_cache"):
        text += " (statistics read from the cache)"
    if t.get("scoring_evaluations_replayed"):
        paid = (f"; {t['replayed_s']:.1f} s of the time, this run paid {t['compression_s'] - t['replayed_s']:.1f} s"
                if t.get("replayed_s") else "")
        text += f" ({t['scoring_evaluations_replayed']} scoring evaluations replayed from the journal{paid})"
    return text


def summary(results: dict) -> str:
    p, s, kv = results["perplexity"], results["sparsity"], results["kv_cache_bytes_per_token"]
    t = results["timings"]
    rows = [
        ("strategy", results["strategy"]),
        ("perplexity dense -> compressed", f"{p['dense']:.2f} -> {p['compressed']:.2f} ({p['ratio']:.2f}x)"),
        *((f"  on {name}" + (" (calibration domain)" if d["calibrated"] else ""),
           f"{d['dense']:.2f} -> {d['compressed']:.2f} ({d['ratio']:.2f}x)") for name, d in p.get("domains", {}).items()),
        *((("perplexity ratio, domains not calibrated on", f"{p['out_of_domain_ratio']:.2f}x (geometric mean)"),)
          if p.get("out_of_domain_ratio") is not None else ()),
        ("sparsity requested", f"{s['requested']:.4f} ({s['unit']})"),
        ("sparsity achieved", f"{s['achieved_layers']:.4f} layers, {s['achieved_params']:.4f} params"),
        ("decoder params", f"{results['decoder_params']['before']:,} -> {results['decoder_params']['after']:,}"),
        ("KV cache bytes/token", f"{kv['before']:,} -> {kv['after']:,}"),
        ("replaced", ", ".join(f"L{r['layer']}.{r['type']}" for r in results["replaced"]) or "none"),
        ("compression time", compression_time(t)),
        *((str(k), str(v)) for k, v in results.get("summary", [])),  # a runner's own rows
        ("output_dir", results.get("output_dir", "(not saved)")),
    ]
    if "downstream" in results:
        ds = results["downstream"]
        for name, row in ds["tasks"].items():
            m = row["metric"]
            ratio = row.get("retained", row.get("degradation"))
            rows.insert(-1, (f"{name} ({m})", f"{row['dense'][m]:.4g} -> {row['compressed'][m]:.4g}"
                             + (f" ({ratio:.3f}x)" if ratio is not None else "")))
        if ds["retained_accuracy"] is not None:
            rows.insert(-1, ("retained accuracy (mean)", f"{ds['retained_accuracy']:.3f}"))
    if "deployment" in results:
        r = results["deployment"]["ratios"]
        rows.insert(-1, ("deployment (compressed/dense)",
                         f"TTFT speed-up {r['ttft_speedup']:.2f}x, decode tok/s {r['decode_tokens_per_s']:.2f}x, "
                         f"KV cache {r['kv_cache']:.3f}x ({results['deployment']['device']})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)


@command("subfit-plugins")
def plugins_main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print("usage: subfit-plugins\n\nEvery installed plugin, its version and what it registers; the recipes, eval tasks and domains.")
        return 0
    if argv:
        raise ConfigError(f"argument '{argv[0]}' is not known; subfit-plugins takes none (allowed: --help)")
    print_plugins()
    return 0


