"""The model card (README.md) written into every saved model: what it is, how to load it, what
was replaced where, and what was measured."""

from __future__ import annotations

from subfit_core import __version__
from subfit_core.artifact.export import ARCHITECTURE


def replacement_map(info: dict, layers: int) -> list[str]:
    """One table row per decoder layer: what stands at its attention and at its FFN."""
    cell = {(r["layer"], r["kind"]): _bypass_text(r["bypass"]) for r in info["replacements"]}
    factored: dict = {}
    for r in info.get("factored", []):
        factored.setdefault((r["layer"], r["kind"]), []).append(f"{r['linear']} r{r['rank']}")
    rows = ["| layer | attention | FFN |", "|---|---|---|"]
    for layer in range(layers):
        parts = []
        for kind in ("attn", "ffn"):
            text = cell.get((layer, kind), "kept")
            if (layer, kind) in factored:
                text += " (factored: " + ", ".join(factored[(layer, kind)]) + ")"
            parts.append(text)
        rows.append(f"| {layer} | {parts[0]} | {parts[1]} |")
    return rows


def _bypass_text(spec: dict) -> str:
    if spec["kind"] == "zero":
        return "**removed**"
    extra = f" rank {spec['rank']}" if "rank" in spec else ""
    return f"**{spec['kind']} bypass**{extra}"


def measured(results: dict) -> list[str]:
    """The numbers of the run, as bullet lines (only those the run measured)."""
    lines = []
    p = results.get("perplexity") or {}
    if p:
        lines.append(f"- held-out perplexity: {p['dense']:.2f} dense -> {p['compressed']:.2f} compressed ({p['ratio']:.2f}x)")
        for name, d in (p.get("domains") or {}).items():
            mark = " (calibration domain)" if d.get("calibrated") else ""
            lines.append(f"  - {name}{mark}: {d['dense']:.2f} -> {d['compressed']:.2f} ({d['ratio']:.2f}x)")
        if p.get("out_of_domain_ratio") is not None:
            lines.append(f"  - domains not calibrated on (geometric mean): {p['out_of_domain_ratio']:.2f}x")
    s = results.get("sparsity") or {}
    if s:
        lines.append(f"- sparsity: {s['achieved_params']:.4f} of decoder parameters removed ({s['requested']} requested)")
    kv = results.get("kv_cache_bytes_per_token") or {}
    if kv:
        lines.append(f"- KV cache: {kv['before']:,} -> {kv['after']:,} bytes per token ({kv['after'] / kv['before']:.3f}x)")
    ds = results.get("downstream") or {}
    if ds.get("retained_accuracy") is not None:
        tasks = ", ".join(ds["tasks"])
        lines.append(f"- accuracy kept: {ds['retained_accuracy']:.3f} (mean over {tasks}; {ds.get('limit')} items each)")
    dep = results.get("deployment") or {}
    if dep.get("ratios"):
        r = dep["ratios"]
        lines.append(f"- speed on {dep.get('device')}: time to first token {r['ttft_speedup']:.2f}x faster, "
                     f"decoding {r['decode_tokens_per_s']:.2f}x the tokens/s")
    return lines


def model_card(config: dict, results: dict, recipe: dict) -> str:
    info, base = config["subfit"], config["subfit"]["base"]
    model = (results.get("model") or {}).get("name") or recipe.get("model", "?")
    source = (results.get("model") or {}).get("source", model)
    removed = sum(1 for r in info["replacements"] if r["bypass"]["kind"] == "zero")
    bypassed = len(info["replacements"]) - removed
    layers = config.get("num_hidden_layers", 1 + max((r["layer"] for r in info["replacements"]), default=0))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [subfit, compressed, pruned]",
        "---",
        f"# {model}, compressed by SubFit ({results.get('strategy', recipe.get('name', '?'))})",
        "",
        f"Base model: {source} ({base['architecture']}). {bypassed} submodules replaced by bypasses fitted in "
        f"closed form, {removed} removed outright"
        + (f", {len(info['factored'])} linears factored into two low-rank matrices" if info.get("factored") else "")
        + f". Written by SubFit {__version__}.",
        "",
        "## Load",
        "",
        "The folder is a custom-code model (architecture `" + ARCHITECTURE + "`, code in `modeling_subfit.py`, "
        "which needs only torch and transformers). Without `trust_remote_code=True` transformers refuses it "
        "rather than loading the base architecture with random weights in the replaced places.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\", trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\", trust_remote_code=True)  # it reads config.json too",
        "generate = pipeline(\"text-generation\", model=\"THIS_FOLDER\", trust_remote_code=True)",
        "```",
        "",
        "```",
        "lm_eval --model hf --model_args pretrained=THIS_FOLDER,trust_remote_code=True --tasks arc_easy",
        "```",
        "",
        "## What was replaced",
        "",
        *replacement_map(info, layers),
        "",
        "## Measured",
        "",
        *(measured(results) or ["(nothing measured)"]),
        "",
        "## Reproduce",
        "",
        "`recipe.yaml` is the resolved recipe of this run and `results.json` its full results: "
        "`subfit-run strategy=THIS_FOLDER/recipe.yaml output_dir=NEW_FOLDER` repeats it.",
        "",
    ]
    return "\n".join(lines)
