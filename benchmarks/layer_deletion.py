"""Which whole layers a model can lose: each layer's Block Influence (ShortGPT's score,
1 - mean cos(layer input, layer output)), the held-out perplexity ratio after deleting that layer
alone, and after deleting the k lowest-influence layers together (ShortGPT's plan for k layers).
Plain transformers (the layers are dropped from the model's ModuleList), independent of the
engine's Workbench, so a collapse seen in a compare can be checked against it.

    python benchmarks/layer_deletion.py --model gemma3-270m --dataset kjv --ks 4 5 6 7

Calibration windows come from the corpus's train text, the perplexity windows from its held-out
text; each begins with the tokenizer's prefix token, as in every run. Prints a table and writes
benchmarks/results/layer-deletion-MODEL.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from subfit_core.engine.corpus import cut, heldout_windows, prefix_token, tokenize  # noqa: E402
from subfit_core.engine.models import load_model  # noqa: E402
from subfit_core.plugins import get_plugins  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def block_influence(model, layers, windows: torch.Tensor, batch: int) -> list[float]:
    """1 - mean over tokens of cos(input, output) of each decoder layer."""
    sums, count = [0.0] * len(layers), 0
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(i):
        def hook(module, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen[i] = (x, out[0] if isinstance(out, tuple) else out)
        return hook

    hooks = [layer.register_forward_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for b in windows.split(batch):
            model(b, use_cache=False)
            for i, (x, y) in seen.items():
                sums[i] += float(F.cosine_similarity(x.float(), y.float(), dim=-1).sum())
            count += b.numel()
    finally:
        for h in hooks:
            h.remove()
    return [1.0 - s / count for s in sums]


@torch.inference_mode()
def perplexity(model, layers, keep: list[int], windows: torch.Tensor, batch: int) -> float:
    """Held-out perplexity with only the layers in ``keep`` (the prefix token is never predicted)."""
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    try:
        nll, n = 0.0, 0
        for b in windows.split(batch):
            logits = model(b, use_cache=False).logits[:, :-1].float()
            nll += float(F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
            n += b[:, 1:].numel()
    finally:
        model.model.layers = layers
    return math.exp(nll / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="kjv")
    parser.add_argument("--windows", type=int, default=16, help="calibration windows for Block Influence")
    parser.add_argument("--heldout", type=int, default=8, help="held-out windows for perplexity")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6], help="ShortGPT plans: delete the k lowest")
    args = parser.parse_args()
    model, source, calib, held = plain_setup(args)
    layers = model.model.layers
    everything = list(range(len(layers)))
    dense = perplexity(model, layers, everything, held, args.batch)
    influence = block_influence(model, layers, calib, args.batch)
    order = sorted(everything, key=lambda i: influence[i])
    single = [perplexity(model, layers, [j for j in everything if j != i], held, args.batch) / dense for i in everything]
    plans = [{"k": k, "deleted": sorted(order[:k]),
              "ratio": perplexity(model, layers, [j for j in everything if j not in order[:k]], held, args.batch) / dense}
             for k in args.ks]
    lines = [f"{args.model}: dense held-out perplexity {dense:.2f} on {args.heldout} x {args.seq_len} tokens of "
             f"{args.dataset}; Block Influence on {args.windows} windows; torch {torch.__version__}, {platform.machine()}.",
             "", "| layer | Block Influence | rank (lowest first) | perplexity ratio, this layer deleted |", "|---|---|---|---|"]
    lines += [f"| {i} | {influence[i]:.3f} | {order.index(i) + 1} | {single[i]:.2f}x |" for i in everything]
    lines += ["", "| ShortGPT plan | layers deleted | perplexity ratio |", "|---|---|---|"]
    lines += [f"| {p['k']} lowest | {p['deleted']} | {p['ratio']:.2f}x |" for p in plans]
    publish(f"layer-deletion-{args.model}", lines, {
        "model": args.model, "source": source, "dataset": args.dataset, "dense_ppl": dense, "block_influence": influence,
        "single_deletion_ratio": single, "plans": plans, "args": vars(args)})


def plain_setup(args) -> tuple:
    """(model, source, calibration windows, held-out windows) for ``args.model`` / ``args.dataset``: the
    model in float32 on the CPU, each window beginning with the tokenizer's prefix token."""
    plugins = get_plugins()
    model, tokenizer, source = load_model(plugins, args.model, torch.device("cpu"), torch.float32, False)
    model.eval()
    corpus = plugins.dataset.get(args.dataset)()
    prefix = prefix_token(tokenizer)
    calib = cut(tokenize(tokenizer, corpus.train, args.windows * args.seq_len), args.seq_len, prefix)[: args.windows]
    return model, source, calib, heldout_windows(corpus, tokenizer, args.heldout, args.seq_len)


def publish(stem: str, lines: list[str], data: dict) -> None:
    """Print the table and write benchmarks/results/STEM.{md,json}."""
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / stem
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
