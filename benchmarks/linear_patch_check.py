"""LinearPatch in plain transformers: delete whole layers, patch the stream entering each cut with
P = H diag(D) H^T (H an orthonormal Hadamard rotation; D_c = mean over sequences of
mean_t |(y H)_c| / mean_t |(x H)_c|, x the stream entering the first deleted layer of the window, y
the stream leaving its last), and measure held-out perplexity. Independent of the engine's
Workbench and fitter, so a collapse seen in a compare can be checked against the method itself.

    python benchmarks/linear_patch_check.py --model gemma3-270m --delete 2 4 8 9 10

Rows: the deletion alone; LinearPatch as published; its means without the first token (the BOS,
whose stream is tens of times the others'); the channel scaling without the rotation (the paper's
ablation); and one uniform scale per cut (``--scales``; 1.0 is the deletion, a check of the hooks).
Calibration windows come from the corpus's train text, the perplexity windows from its held-out
text, each beginning with the tokenizer's prefix token. Prints a table and writes
benchmarks/results/linear-patch-MODEL.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from layer_deletion import perplexity, plain_setup, publish  # noqa: E402  (benchmarks/, the script's folder)

from subfit_plugins.fitters.hadamard import hadamard  # noqa: E402


def windows_of(deleted: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive deleted layers, as (first, last)."""
    runs: list[list[int]] = []
    for i in sorted(deleted):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [(r[0], r[-1]) for r in runs]


def scales(streams, first: int, last: int, rot: torch.Tensor, skip_first: bool) -> torch.Tensor:
    """D for the window first..last from the dense streams (streams[i]: the input of layer i)."""
    tokens = slice(1, None) if skip_first else slice(None)
    x = (streams[first][:, tokens].double() @ rot).abs().mean(1)
    y = (streams[last + 1][:, tokens].double() @ rot).abs().mean(1)
    return (y / x.clamp_min(torch.finfo(torch.float64).tiny)).mean(0)


def patched_perplexity(model, layers, deleted: list[int], patches: dict[int, torch.Tensor], windows: torch.Tensor,
                       batch: int) -> float:
    """Held-out perplexity with ``deleted`` layers gone and the stream entering layer i multiplied by
    ``patches[i]`` (the patch as a forward pre-hook on that kept layer)."""
    def patch(p):
        def hook(module, args, kwargs):
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": kwargs["hidden_states"] @ p}
            return (args[0] @ p, *args[1:]), kwargs
        return hook

    hooks = [layers[i].register_forward_pre_hook(patch(p.float()), with_kwargs=True) for i, p in patches.items()]
    try:
        return perplexity(model, layers, [i for i in range(len(layers)) if i not in deleted], windows, batch)
    finally:
        for h in hooks:
            h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="kjv")
    parser.add_argument("--delete", type=int, nargs="+", required=True, help="layers to delete")
    parser.add_argument("--windows", type=int, default=16, help="calibration windows for the scales")
    parser.add_argument("--heldout", type=int, default=8, help="held-out windows for perplexity")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.9, 1.05, 1.2],
                        help="uniform scales of the stream at every cut")
    args = parser.parse_args()
    model, source, calib, held = plain_setup(args)
    layers = model.model.layers
    d = model.config.hidden_size
    rot = hadamard(d)
    if rot is None:
        raise SystemExit(f"--model {args.model}: no Hadamard construction for hidden size {d}")
    with torch.inference_mode():
        streams = [torch.cat(s) for s in zip(*(model(b, output_hidden_states=True, use_cache=False).hidden_states
                                                for b in calib.split(args.batch)))]
    cuts = windows_of(args.delete)
    if cuts[-1][1] + 1 >= len(layers):
        raise SystemExit(f"--delete: layer {cuts[-1][1]} is the last; a patch needs a kept layer after the cut")

    def patched(rotation: torch.Tensor, skip_first: bool) -> dict[int, torch.Tensor]:
        out = {}
        for first, last in cuts:
            dvec = scales(streams, first, last, rotation, skip_first)
            out[last + 1] = (rotation * dvec) @ rotation.T
        return out

    dense = patched_perplexity(model, layers, [], {}, held, args.batch)
    norms = {i: (float(streams[i][:, 0].norm(dim=-1).mean()), float(streams[i][:, 1:].norm(dim=-1).mean()))
             for i in sorted({f for f, _ in cuts} | {last + 1 for _, last in cuts})}
    eye = torch.eye(d, dtype=torch.float64)
    variants = [("deleted, no patch", {}),
                ("LinearPatch (Hadamard rotation, channel scales)", patched(rot, False)),
                ("LinearPatch, means without the first token", patched(rot, True)),
                ("channel scales without the rotation", patched(eye, False)),
                *((f"uniform scale {s:g} at every cut", {last + 1: eye * s for _, last in cuts}) for s in args.scales)]
    rows = [{"variant": name, "ratio": patched_perplexity(model, layers, args.delete, p, held, args.batch) / dense}
            for name, p in variants]
    lines = [f"{args.model}: layers {sorted(args.delete)} deleted (cuts {cuts}); dense held-out perplexity {dense:.2f} on "
             f"{args.heldout} x {args.seq_len} tokens of {args.dataset}; scales from {args.windows} windows; "
             f"torch {torch.__version__}, {platform.machine()}.", "",
             "| variant | perplexity ratio |", "|---|---|"]
    lines += [f"| {r['variant']} | {r['ratio']:,.2f}x |" for r in rows]
    lines += ["", "| layer input | stream norm, first token | stream norm, others (mean) |", "|---|---|---|"]
    lines += [f"| L{i} | {a:,.0f} | {b:,.0f} |" for i, (a, b) in norms.items()]
    publish(f"linear-patch-{args.model}", lines, {
        "model": args.model, "source": source, "dataset": args.dataset, "dense_ppl": dense, "cuts": cuts,
        "rows": rows, "stream_norms": norms, "args": vars(args)})


if __name__ == "__main__":
    main()
