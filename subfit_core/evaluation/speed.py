"""Deployment measurements: time to first token, decode speed, working memory and KV-cache bytes.

Dense and compressed models are measured in one process, setting by setting in turn (so drift of
the machine hits both alike), and compared as ratios compressed / dense.

* Time: CUDA events on a CUDA device, ``time.perf_counter`` on the CPU; the median of
  ``repeats`` timed calls after one warm-up call per setting.
* Time to first token (TTFT): ``generate`` with one new token (prefill plus the first token).
  Decode speed: ``generate`` with ``new_tokens`` (forced: ``min_new_tokens``); decode tokens/s =
  batch × (new_tokens − 1) / (time(new_tokens) − TTFT).
* Working memory: bytes allocated above the level before the call, at the peak of the timed
  ``generate`` with ``new_tokens``. CUDA: ``torch.cuda.max_memory_allocated``. CPU: glibc's
  ``mallinfo2`` in-use bytes (``uordblks + hblkhd``, which torch's CPU tensors come from),
  sampled every millisecond by a thread, so a peak shorter than that can be missed; where glibc
  is missing, the resident set size sampled the same way (it does not shrink when memory is
  freed, so it under-reports after the warm-up).
* KV cache: bytes of the key/value tensors held by the cache object ``generate`` returns,
  summed over its layers (a removed attention keeps no cache), after generating ``new_tokens``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from subfit_core.progress import progress

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class SpeedSettings:
    prompt_lengths: list[int]
    batch_sizes: list[int]
    new_tokens: int = 32
    repeats: int = 3

    @classmethod
    def from_config(cls, section: dict) -> SpeedSettings:
        return cls(list(section["prompt_lengths"]), list(section["batch_sizes"]), section["new_tokens"], section["repeats"])


# ----------------------------------------------------------------------------- KV cache


def kv_cache_bytes(cache) -> int:
    """Bytes of every key and value tensor a transformers cache object holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- time and memory


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes: CUDA events on a CUDA device, wall clock on the CPU."""
    if device.type == "cuda":
        # events recorded on the device's own stream (a bare record() uses the current device's, cuda:0's)
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record(stream)
        fn()
        end.record(stream)
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _cpu_memory_reader() -> tuple[Callable[[], int], str]:
    """(reader, description): current in-use heap bytes via glibc, else resident set size."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2

        def heap() -> int:
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        heap()
        return heap, "glibc mallinfo2 in-use bytes (uordblks + hblkhd), sampled every 1 ms"
    except (OSError, AttributeError):
        page = os.sysconf("SC_PAGE_SIZE")

        def rss() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return rss, "resident set size from /proc/self/statm, sampled every 1 ms (does not shrink: under-reports)"


class PeakMemory:
    """Context manager: ``.peak`` = most bytes allocated above the level at entry."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        self._read: Callable[[], int] | None  # bytes in use now; None on CUDA, which tracks its own peak
        self._read, self.method = (None, "torch.cuda.max_memory_allocated") if device.type == "cuda" else _cpu_memory_reader()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._max = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _now(self) -> int:
        assert self._read is not None  # only called off CUDA, where __init__ set the CPU reader
        return self._read()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, self._now())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._now()) - self._base
        return False


# ----------------------------------------------------------------------------- generation


def prompt_ids(vocab_size: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random prompt tokens (timing does not depend on the text; decoding length is forced)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


@torch.inference_mode()
def generate(model, ids: torch.Tensor, new_tokens: int):
    pad = model.config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                          pad_token_id=pad if pad is not None else 0)


def measure_setting(model, ids: torch.Tensor, settings: SpeedSettings, device: torch.device) -> dict:
    """TTFT, decode speed, working memory and KV cache of ``model`` for one (batch, prompt length)."""
    ids = ids.to(device)
    batch, length = ids.shape
    generate(model, ids, 2)  # warm-up: first-call allocations and kernel selection
    ttft = statistics.median(timed(lambda: generate(model, ids, 1), device) for _ in range(settings.repeats))
    full_times, peaks = [], []
    box: dict[str, Any] = {}  # the last generate() output, kept from inside the timed lambda
    for _ in range(settings.repeats):
        with PeakMemory(device) as mem:
            full_times.append(timed(lambda: box.update(out=generate(model, ids, settings.new_tokens)), device))
        peaks.append(mem.peak)
    full = statistics.median(full_times)
    cache = box["out"].past_key_values
    cached_tokens = batch * (length + settings.new_tokens - 1)  # the last new token is never fed back
    kv = kv_cache_bytes(cache)
    decode_s = max(full - ttft, 1e-9)
    return {
        "batch": batch, "prompt_len": length, "ttft_s": ttft, "generate_s": full,
        "decode_tokens_per_s": batch * (settings.new_tokens - 1) / decode_s,
        "peak_working_bytes": max(peaks), "kv_cache_bytes": kv, "kv_cache_bytes_per_token": kv / cached_tokens,
    }


def weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"


def measure_speed(models: dict[str, PreTrainedModel], settings: SpeedSettings, device: torch.device) -> dict:
    """Measure every model at every (prompt length, batch size), models interleaved per setting."""
    vocab = min(m.config.vocab_size for m in models.values())
    rows: dict[str, list[dict]] = {name: [] for name in models}
    grid = [(length, batch) for length in settings.prompt_lengths for batch in settings.batch_sizes]
    for length, batch in progress(grid, desc="deployment benchmark"):
        ids = prompt_ids(vocab, batch, length)
        for name, model in models.items():
            rows[name].append(measure_setting(model, ids, settings, device))
    memory_method = PeakMemory(device).method
    return {
        "device": device_name(device), "torch": torch.__version__,
        "settings": {"prompt_lengths": settings.prompt_lengths, "batch_sizes": settings.batch_sizes,
                     "new_tokens": settings.new_tokens, "repeats": settings.repeats},
        "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter (wall clock)",
        "memory": memory_method,
        "models": {name: {"weights_bytes": weights_bytes(m), "rows": rows[name]} for name, m in models.items()},
    }


def ratios(result: dict, base: str = "dense", other: str = "compressed") -> dict:
    """Compressed over dense, per setting and as the geometric mean over settings."""
    a, b = result["models"][base]["rows"], result["models"][other]["rows"]
    keys = ("ttft_s", "decode_tokens_per_s", "peak_working_bytes", "kv_cache_bytes")
    per = [{"batch": x["batch"], "prompt_len": x["prompt_len"],
            **{k: (y[k] / x[k] if x[k] else None) for k in keys}} for x, y in zip(a, b)]

    def gmean(k):
        vals = [r[k] for r in per if r[k]]
        return float(torch.tensor(vals, dtype=torch.float64).log().mean().exp()) if vals else None

    return {
        "per_setting": per,
        "ttft": gmean("ttft_s"), "ttft_speedup": 1 / gmean("ttft_s") if gmean("ttft_s") else None,
        "decode_tokens_per_s": gmean("decode_tokens_per_s"), "peak_working_memory": gmean("peak_working_bytes"),
        "kv_cache": gmean("kv_cache_bytes"),
        "weights": result["models"][other]["weights_bytes"] / result["models"][base]["weights_bytes"],
        "note": f"{other} / {base}; ttft_speedup = {base} TTFT / {other} TTFT; geometric means over settings",
    }


def markdown(result: dict, ratio: dict | None = None) -> str:
    lines = ["| model | prompt | batch | TTFT (ms) | decode tok/s | working memory (MiB) | KV cache (KiB) | KV bytes/token |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        for r in m["rows"]:
            lines.append(f"| {name} | {r['prompt_len']} | {r['batch']} | {r['ttft_s'] * 1e3:.1f} | "
                         f"{r['decode_tokens_per_s']:.1f} | {r['peak_working_bytes'] / 2**20:.1f} | "
                         f"{r['kv_cache_bytes'] / 2**10:.0f} | {r['kv_cache_bytes_per_token']:.0f} |")
    text = "\n".join(lines)
    if ratio:
        text += ("\n\n| compressed / dense | TTFT | TTFT speed-up | decode tok/s | working memory | KV cache | weights |\n"
                 "|---|---|---|---|---|---|---|\n"
                 f"| geometric mean over settings | {ratio['ttft']:.3f} | {ratio['ttft_speedup']:.3f}x | "
                 f"{ratio['decode_tokens_per_s']:.3f} | {_fmt(ratio['peak_working_memory'])} | {_fmt(ratio['kv_cache'])} | "
                 f"{ratio['weights']:.3f} |")
    text += (f"\n\nDevice {result['device']}, torch {result['torch']}; timing: {result['timing']}; "
             f"{result['settings']['new_tokens']} new tokens, median of {result['settings']['repeats']}; "
             f"working memory: {result['memory']}.\n")
    return text


def _fmt(x) -> str:
    return f"{x:.3f}" if x is not None else "n/a"
