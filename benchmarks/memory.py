"""Peak memory against depth for models that do not fit: Llama-3-8B layer shapes (hidden 4096,
FFN 14336, 32 heads / 8 KV heads), random bf16 weights in sharded safetensors, at several depths,
compressed on this CPU with layer-streamed weights (offload=disk) and, for reference, in memory.

    python benchmarks/memory.py                      # 4, 8, 12, 16 layers, strategy shortgpt
    python benchmarks/memory.py --layers 4 --modes none disk --strategy subfit
    python benchmarks/memory.py --layers 4 --strategy subfit --profile   # where the peak goes

Each run is a fresh process (``--child``) reporting its own peak resident memory (VmHWM), so the
numbers do not mix. Writes benchmarks/results/memory.{json,md}. The checkpoint (one shard per
layer, written once for the deepest model and linked for the shallower ones) lives under
--work (default ~/.cache/subfit/memory-bench), about 0.44 GB per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
GB = 1024**3


def scaled(divisor: int) -> dict:
    """The shapes with every width divided by ``divisor`` (1: Llama-3-8B's; quick checks use 8)."""
    return {k: v // divisor if k != "num_key_value_heads" else max(1, v // divisor) for k, v in SHAPES.items()}


def layer_tensors(i: int, generator, shapes: dict) -> dict:
    import torch

    h, f = shapes["hidden_size"], shapes["intermediate_size"]
    kv = h // shapes["num_attention_heads"] * shapes["num_key_value_heads"]
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
              "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
              "mlp.down_proj.weight": (h, f)}
    out = {f"model.layers.{i}.{name}": (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
           for name, shape in shapes.items()}
    out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def write_shards(store: Path, layers: int, vocab: int, shapes: dict) -> None:
    """One safetensors file per layer plus one for embeddings, final norm and head (written once)."""
    import torch
    from safetensors.torch import save_file

    store.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    edge = store / f"edge-{vocab}.safetensors"
    if not edge.exists():
        h = shapes["hidden_size"]
        save_file({"model.embed_tokens.weight": (torch.randn(vocab, h, generator=g) * 0.02).to(torch.bfloat16),
                   "lm_head.weight": (torch.randn(vocab, h, generator=g) * 0.02).to(torch.bfloat16),
                   "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}, str(edge), metadata={"format": "pt"})
    for i in range(layers):
        path = store / f"layer-{i:03d}.safetensors"
        if not path.exists():
            save_file(layer_tensors(i, torch.Generator().manual_seed(i + 1), shapes), str(path), metadata={"format": "pt"})


def model_folder(store: Path, layers: int, vocab: int, shapes: dict) -> Path:
    """A model folder of ``layers`` layers: config, tokenizer, index, links to the shared shards."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    folder = store / f"llama8b-shapes-{layers}L"
    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**shapes, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False, dtype="bfloat16").save_pretrained(folder)
    weight_map = {}
    files = [f"edge-{vocab}.safetensors", *(f"layer-{i:03d}.safetensors" for i in range(layers))]
    from safetensors import safe_open

    for name in files:
        link = folder / name
        if not link.exists():
            link.symlink_to(store / name)
        with safe_open(str(store / name), "pt") as f:
            weight_map.update({k: name for k in f.keys()})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    return folder


def text_file(store: Path, vocab: int) -> Path:
    path = store / f"text-{vocab}.txt"
    if not path.exists():
        rng = random.Random(0)
        path.write_text("\n".join(" ".join(f"w{rng.randrange(vocab)}" for _ in range(24)) for _ in range(3000)))
    return path


def weights_bytes(folder: Path) -> int:
    return sum((folder / f).resolve().stat().st_size for f in set(
        json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def status_bytes(field: str) -> int:
    """This process's ``field`` of /proc/self/status in bytes (VmRSS: resident now; VmHWM: its peak)."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(f"{field}:"))


def live_tensors(top: int = 12) -> tuple[int, list[str]]:
    """Bytes of every CPU tensor reachable from Python (each storage once) and the ``top`` largest."""
    import gc

    import torch

    storages: dict[int, tuple[int, str]] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = (storage.nbytes(), f"{tuple(obj.shape)} {obj.dtype}")
    largest = sorted(storages.values(), reverse=True)
    return sum(n for n, _ in largest), [f"{n / GB:.3f} GB {what}" for n, what in largest[:top]]


def profile(path: Path, every: float = 0.05, step: int = 20 * 1024**2) -> None:
    """Sample RSS every ``every`` s from a thread; at each new high (by ``step`` bytes) record the main
    thread's stack and the live tensors. Written to ``path`` at exit."""
    import atexit
    import threading
    import traceback

    main, t0, highs = threading.get_ident(), time.perf_counter(), []

    def sample() -> None:
        best = 0
        while True:
            rss = status_bytes("VmRSS")
            if rss > best + step:
                best = rss
                frame = sys._current_frames().get(main)
                frames = traceback.extract_stack(frame)
                # the project's own frames say where (transformers' and torch's say little), then the innermost
                stack = [f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}" for f in frames
                         if f.filename.startswith(str(ROOT))][-6:] + [f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"]
                del frame  # a held frame would keep its locals (tensors) alive
                total, largest = live_tensors()
                highs.append({"t": round(time.perf_counter() - t0, 1), "rss_gb": rss / GB, "live_gb": total / GB,
                              "stack": stack, "largest": largest})
            time.sleep(every)

    threading.Thread(target=sample, daemon=True).start()
    atexit.register(lambda: path.write_text(json.dumps(highs, indent=1)))


def child(argv: list[str]) -> None:
    """Run subfit-run with ``argv`` in this process; print its peak resident memory and time as JSON."""
    from subfit_core.apps.cli import run_main

    if os.environ.get("MEMORY_PROFILE"):
        profile(Path(os.environ["MEMORY_PROFILE"]))
    t0 = time.perf_counter()
    code = run_main(argv)
    wall = time.perf_counter() - t0
    peak = status_bytes("VmHWM")
    import torch

    device_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print("MEMORY-RESULT " + json.dumps({"exit": code, "peak_rss": peak, "peak_device": device_peak, "wall_s": wall}))


def run_one(folder: Path, text: Path, mode: str, strategy: str, out: Path, extra: list[str],
            profile_to: Path | None = None) -> dict:
    argv = [f"model={folder}", f"calib.dataset={text}", f"strategy={strategy}", f"offload={mode}", "dtype=bfloat16",
            "calib.samples=4", "calib.seq_len=128", "calib.batch_size=4", "calib.generated=0", "scoring.samples=2",
            "scoring.stride=4", "eval.windows=2", "eval.seq_len=128", "eval.batch_size=2", "eval.domains=[]",
            "eval.tasks=[]", "cache_stats=false", "sparsity=0.25", f"output_dir={out}", "overwrite=true", *extra]
    env = {**os.environ, "SUBFIT_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **({"MEMORY_PROFILE": str(profile_to)} if profile_to else {})}
    done = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("MEMORY-RESULT ")), None)
    if line is None:
        raise SystemExit(f"run failed ({mode}, {folder.name}):\n{done.stderr[-3000:]}")
    measured = json.loads(line.removeprefix("MEMORY-RESULT "))
    results = json.loads((out / "results.json").read_text())
    return {**measured, "timings": results.get("timings", {}), "replaced": [f"L{r['layer']}.{r['type']}" for r in results["replaced"]]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 16])
    ap.add_argument("--modes", nargs="+", default=["disk"], choices=["none", "gpus", "cpu", "disk"])
    ap.add_argument("--strategy", default="shortgpt")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--width-divisor", type=int, default=1, help="divide every width by this (quick checks)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "subfit" / "memory-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory")
    ap.add_argument("--profile", action="store_true", help="record each run's stack and live tensors at every new high "
                    "of resident memory (<out>-<layers>L-<mode>.json; the sampling slows the run a little)")
    ap.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = ap.parse_args()
    shapes = scaled(args.width_divisor)
    args.work = args.work.resolve()  # the model folders link to its shards: a relative link would point nowhere
    if args.width_divisor != 1:  # shards of another width live apart
        args.work = args.work / f"width-{args.width_divisor}"
    write_shards(args.work, max(args.layers), args.vocab, shapes)
    text = text_file(args.work, args.vocab)
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for layers in args.layers:
        folder = model_folder(args.work, layers, args.vocab, shapes)
        size = weights_bytes(folder)
        for mode in args.modes:
            trace = args.out.parent / f"{args.out.name}-{layers}L-{mode}.json" if args.profile else None
            r = run_one(folder, text, mode, args.strategy, args.work / "runs" / f"{layers}L-{mode}", args.overrides, trace)
            row = {"layers": layers, "offload": mode, "strategy": args.strategy, "weights_gb": size / GB,
                   "peak_rss_gb": r["peak_rss"] / GB, "rss_over_weights": r["peak_rss"] / size, "wall_s": r["wall_s"],
                   "peak_device_gb": r["peak_device"] / GB if r.get("peak_device") is not None else None,
                   "statistics_s": r["timings"].get("stats_s"), "replaced": r["replaced"], "exit": r["exit"]}
            rows.append(row)
            print(f"{layers:>3} layers  {mode:<5} weights {row['weights_gb']:.2f} GB  peak RSS {row['peak_rss_gb']:.2f} GB "
                  f"({row['rss_over_weights']:.2f}x)  {row['wall_s']:.0f} s", flush=True)
            write_table(rows, args, shapes)  # after every row: a long sweep stopped early keeps what it measured
    print((args.out.with_suffix(".md")).read_text())


def write_table(rows: list[dict], args, shapes: dict) -> None:
    streamed = [r for r in rows if r["offload"] == "disk"]
    flat = streamed[-1]["peak_rss_gb"] / streamed[0]["peak_rss_gb"] if len(streamed) > 1 else None
    lines = ["| layers | offload | weights GB | peak RSS GB | RSS / weights | wall s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['layers']} | {r['offload']} | {r['weights_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r['rss_over_weights']:.2f} "
              f"| {r['wall_s']:.0f} |" for r in rows]
    if flat is not None:
        lines.append(f"\nStreamed: peak RSS at {streamed[-1]['layers']} layers = {flat:.2f}x that at {streamed[0]['layers']} "
                     "layers (target <= 1.3x); target RSS / weights < 0.5.")
    table = "\n".join(lines)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "depth_ratio": flat, "shapes": shapes,
                                                         "vocab": args.vocab}, indent=2))
    args.out.with_suffix(".md").write_text(f"# Peak memory against depth ({args.strategy}, Llama-3-8B layer shapes)\n\n"
                                           f"`{' '.join(['python benchmarks/memory.py', *sys.argv[1:]])}`\n\n{table}\n")

if __name__ == "__main__":
    main()
