"""Layer-streamed weights, for models that do not fit: the model is built without its weights
(parameters on the meta device, buffers real), and each module's tensors are read onto the compute
device when it runs and dropped afterwards, so memory holds one submodule's weights at a time.

``offload``:
  none  the whole model in memory on the compute device (today's path)
  gpus  every tensor in the memory of the visible GPUs (the others filled first, the compute device
        last with room kept for the run), copied to the compute device per module: a model that
        fits across several GPUs but not on one
  cpu   every tensor in host memory, copied to the compute device per module (for a GPU smaller
        than the model; on a CPU it is the same as none)
  disk  tensors read from the checkpoint's safetensors shards per module (memory-mapped, never
        unpickled); host memory holds no weights beyond the module in use
  auto  none when the weights fit in available memory with room for the run, else disk (on a GPU:
        gpus when they fit across the GPUs, else cpu when they fit in host memory)

The engine computes on one device (every candidate's scoring states and each batch's statistics
products live there), so with ``gpus`` the other GPUs serve as fast memory rather than running layers
where they lie: a device-to-device copy of a module's weights costs far less than the pass that runs it.

Two ways in: every module owning parameters gets a forward pre-hook that loads its tensors and a
forward hook that drops them again, so any code path (perplexity, generation, lm-eval) is correct;
the engine's own loops, which run one submodule over many batches, ``keep`` what they load for the
loop so its weights are read once per pass, not once per batch. The tensors are the checkpoint's own, cast
like the in-memory path casts them, so every mode computes the same numbers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from subfit_core.errors import SubFitError

MODES = ("auto", "none", "gpus", "cpu", "disk")
TRIM_BYTES = 256 * 1024**2  # hand freed memory back to the system after this much was read since the last time


def _glibc(name: str) -> Callable[..., int] | None:
    """glibc's function ``name`` (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


# glibc keeps freed heap memory resident: the weights, activations and float32 products a streamed
# pass frees left the peak growing by ~20 MB per layer (8B shapes), while live tensors stayed flat;
# trimming after each streamed module keeps it flat.
MALLOC_TRIM = _glibc("malloc_trim")
MALLOPT = _glibc("mallopt")
MMAP_THRESHOLD = 4 * 1024**2  # a streamed run's allocations from this size are mapped, and unmapped when freed


def map_large_allocations() -> None:
    """Have glibc map every allocation of ``MMAP_THRESHOLD`` bytes or more (and return it when freed).
    By default glibc raises its threshold to the largest block freed so far (up to 32 MB), after
    which the activations and products a streamed run frees land in the heap, fragment it and stay
    resident: at 8B shapes the peak crept up by ~0.15 GB over a run while live tensors stayed flat.
    A fixed threshold stops the creep; the cost is a page fault per fresh page of such blocks."""
    if MALLOPT is None:
        return
    MALLOPT(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixed: no longer raised by frees)
    MALLOPT(-1, 2 * MMAP_THRESHOLD)  # M_TRIM_THRESHOLD: hand the heap's free top back sooner
HEADROOM = 2.5  # auto keeps a model in memory when available memory exceeds its weights by this factor
STORE_FILL = 0.9  # with gpus, a GPU that only stores weights may fill this share of its free memory


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded checkpoints through their index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise SubFitError(f"offload: '{folder}' has no model.safetensors or model.safetensors.index.json "
                          "(streaming reads safetensors only)")
    return {name: single for name in ShardReader(single).header if name != "__metadata__"}


def file_stamps(files: list[Path]) -> list:
    """What identifies files without reading them: each one's name, size and modification time."""
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in set(checkpoint_files(folder).values()))


def checkpoint_sizes(folder: Path, dtype: torch.dtype) -> dict[str, int]:
    """Tensor name -> bytes once loaded (floating tensors cast to ``dtype``), from the shards' headers
    alone, in the checkpoint's order."""
    sizes: dict[str, int] = {}
    readers: dict[Path, ShardReader] = {}
    for name, path in checkpoint_files(folder).items():
        reader = readers.setdefault(path, ShardReader(path))
        stored = reader.dtype(name)
        sizes[name] = math.prod(reader.header[name]["shape"]) * (dtype if stored.is_floating_point else stored).itemsize
    return sizes


def available_memory(device: torch.device) -> int:
    """Bytes the run may use for weights: free device memory on a GPU, available host memory on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def gpu_budgets(device: torch.device) -> dict[torch.device, int]:
    """Bytes of weights each visible GPU may hold with ``gpus``, in the order they are filled: the
    other GPUs first, nearly full (they only store); the compute device last, keeping the share of
    its memory that ``none`` keeps for the run. Empty unless there are at least two GPUs."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {}
    compute = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    budgets = {torch.device("cuda", i): int(available_memory(torch.device("cuda", i)) * STORE_FILL)
               for i in range(torch.cuda.device_count()) if i != compute.index}
    budgets[compute] = int(available_memory(compute) / HEADROOM)
    return budgets


# a decoder layer's tensors by their checkpoint names ("model.layers.7.mlp.experts.3.w1.weight", "transformer.h.7.",
# "blocks.7."): the usual namings, not every one; a layer it misses is placed tensor by tensor, which costs balance only
LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks)\.\d+)\.")


def place(sizes: dict[str, int], budgets: dict[torch.device, int]) -> dict[str, torch.device] | None:
    """Each tensor's device: ``budgets`` filled in order with the tensors in checkpoint order, a
    decoder layer's tensors on one device (so a module loads from one GPU: a mixture of experts joins
    its experts' tensors then); None when they do not all fit."""
    groups: dict[str, list[str]] = {}
    for name in sizes:
        layer = LAYER.match(name)
        groups.setdefault(layer.group(1) if layer else name, []).append(name)
    placement: dict[str, torch.device] = {}
    devices = iter(budgets.items())
    device, room = next(devices, (None, 0))
    for names in groups.values():
        size = sum(sizes[name] for name in names)
        while device is not None and size > room:
            device, room = next(devices, (None, 0))
        if device is None:
            return None
        placement.update(dict.fromkeys(names, device))
        room -= size
    return placement


def resolve_offload(mode: str, weights_bytes: int, device: torch.device, sizes: dict[str, int] | None = None) -> str:
    """The mode ``auto`` stands for here; other modes as given (``gpus`` only where there are GPUs).
    ``sizes``: each tensor's bytes once loaded (``checkpoint_sizes``), to place them exactly."""
    if mode == "gpus" and not gpu_budgets(device):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise SubFitError(f"offload: gpus spreads the weights over several GPUs; here device={device} and {found} GPU(s) "
                          "are visible; use offload=cpu or offload=disk")
    if mode != "auto":
        return mode
    if weights_bytes * HEADROOM <= available_memory(device):
        return "none"
    budgets = gpu_budgets(device)  # only now: asking a GPU for its free memory starts a context on it
    if budgets and place(sizes or {"weights": weights_bytes}, budgets) is not None:
        return "gpus"
    if device.type == "cuda" and weights_bytes * HEADROOM <= available_memory(torch.device("cpu")):
        return "cpu"
    return "disk"


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file straight from their memory: no serialized copy of the
    whole file is built first (as ``safetensors.torch.save_file`` does), so writing a 1 GB Gram
    matrix costs no extra 1 GB. Tensors on a GPU are copied to host memory one file at a time."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    parts = []
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()  # numpy, below, reads host memory only
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        parts.append(tensor)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for tensor in parts:
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


class ShardReader:
    """Reads single tensors of a safetensors file with plain positioned reads, not a memory map: a
    mapped file's pages would stay resident (and counted) for as long as it is open. The format is
    an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} and
    the raw little-endian data; nothing in it is executed."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(size))
        self.start = 8 + size

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.start + begin)
            view, done = memoryview(buffer), 0
            while done < len(buffer):  # a read may return less than asked
                got = f.readinto(view[done:])
                if not got:
                    raise SubFitError(f"offload: '{self.path}' ends inside tensor {name} (truncated file)")
                done += got
        dtype = self.dtype(name)
        tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return tensor.reshape(entry["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """The stored type of tensor ``name`` (refused if safetensors' name for it is not one torch reads)."""
        stored = self.header[name]["dtype"]
        if stored not in DTYPES:
            raise SubFitError(f"offload: tensor {name} in '{self.path}' has dtype {stored}, which is not supported")
        return DTYPES[stored]


class Conversion:
    """How transformers builds one parameter from checkpoint tensors stored in another layout (a
    mixture of experts stores each expert's linears apart; the model holds them stacked): the
    checkpoint keys per source pattern, in transformers' order, and the converter whose operations
    join them. Streaming applies the same operations per module, so it reads what loading builds."""

    def __init__(self, converter, keys: dict[str, list[str]]):
        self.converter, self.keys = converter, keys

    def build(self, read: Callable[[str], torch.Tensor], name: str, model: nn.Module) -> torch.Tensor:
        c = self.converter
        tensors: dict = {pattern: [read(k) for k in keys] for pattern, keys in self.keys.items()}
        for op in c.operations:
            tensors = op.convert(tensors, source_patterns=c.source_patterns, target_patterns=c.target_patterns,
                                 full_layer_name=name, model=model, config=getattr(model, "config", None))
        (tensor,) = tensors.values()
        return tensor


def conversions(model: nn.Module, keys: list[str]) -> tuple[dict[str, str], dict[str, Conversion]]:
    """Where each of ``model``'s parameters comes from in a checkpoint holding ``keys`` that
    transformers converts while loading: (parameter -> the one key it is renamed from, parameter ->
    the conversion that builds it from several). Uses transformers' own mapping and renaming."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)  # type: ignore[arg-type]  # a PreTrainedModel (converted_on_load)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    meta = dict(model.named_parameters(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", None)
    renamed: dict[str, str] = {}
    built: dict[str, Conversion] = {}
    for key in sorted(keys, key=dot_natural_key):  # the order transformers collects them in (expert 2 before 10)
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:
            name, pattern = key, None
        if name not in meta:
            continue
        if pattern is None:
            renamed.setdefault(name, key)
        else:
            built.setdefault(name, Conversion(by_pattern[pattern], {})).keys.setdefault(pattern, []).append(key)
    return renamed, built


def converted_on_load(model: nn.Module) -> bool:
    """Whether transformers renames or merges this model's checkpoint tensors while loading them."""
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model
    except ImportError:  # a transformers without checkpoint conversions
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and bool(extract_weight_conversions_for_model(model))


class WeightStream:
    """Loads and drops the weights of a model whose parameters are on the meta device.

    ``source``: a checkpoint folder of safetensors (``disk``) or a state dict in host memory
    (``cpu``). ``bytes_read`` counts what was copied to the device (benchmarks read it)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype,
                 folder: Path | None = None, state: dict[str, torch.Tensor] | None = None):
        self.model, self.device, self.dtype = model, device, dtype
        self.files = checkpoint_files(folder) if folder is not None else {}
        self.state = state
        self._handles: dict[Path, ShardReader] = {}
        self.keys: dict[int, str] = {}  # id(meta parameter) -> its name in the checkpoint
        self.conversions: dict[str, Conversion] = {}  # parameter name -> how it is built from several tensors
        stored = set(self.files) | set(state or {})
        renamed: dict[str, str] = {}
        if converted_on_load(model) and any(n not in stored for n, p in model.named_parameters() if p.is_meta):
            renamed, self.conversions = conversions(model, sorted(stored))
        for name, p in model.named_parameters(remove_duplicate=False):
            if not p.is_meta:
                continue
            if name in stored:
                self.keys.setdefault(id(p), name)
            elif name in renamed:
                self.keys.setdefault(id(p), renamed[name])
            elif name in self.conversions:
                self.keys.setdefault(id(p), name)
        missing = [n for n, p in model.named_parameters() if p.is_meta and id(p) not in self.keys]
        if missing:
            raise SubFitError(f"offload: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more); "
                              "it does not match the model's config")
        self._meta: dict[tuple[int, str], nn.Parameter] = {}  # (id(module), name) -> its meta parameter
        self._adopted: dict[int, nn.Parameter] = {}  # id -> meta parameter of a module built during the run
        self._handles_of: dict[nn.Module, tuple] = {}  # adopted module -> its load/drop hooks
        self._keeping = 0  # depth of nested ``keep`` blocks
        self._kept: dict[int, nn.Module] = {}  # modules whose drop waits for the end of the block
        self.bytes_read = 0
        self._trimmed_at = 0  # bytes_read when freed memory was last handed back
        self.owners = [m for m in model.modules() if any(p.is_meta for p in m.parameters(recurse=False))]
        map_large_allocations()
        for m in self.owners:
            m.register_forward_pre_hook(lambda module, args: self.load(module))
            m.register_forward_hook(lambda module, args, out: self.drop(module))

    def adopt(self, module: nn.Module, folder: Path, name: str) -> None:
        """Stream ``module``, built in memory during the run (a factored linear), like the
        checkpoint's own modules: its tensors are written to ``folder/<name>.safetensors`` (with
        ``cpu``: kept in host memory) and its parameters become meta, read when it runs or is saved.
        What the run builds then holds no memory between uses either, however deep the model."""
        tensors = {f"{name}.{k}": p.detach().to("cpu").contiguous()
                   for k, p in module._parameters.items() if p is not None}
        if self.state is not None:
            self.state.update(tensors)
        else:
            path = folder / f"{name}.safetensors"
            write_safetensors(path, tensors)
            self.files.update(dict.fromkeys(tensors, path))
        for k, p in list(module._parameters.items()):
            if p is None:
                continue
            meta = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            module._parameters[k] = meta
            self.keys[id(meta)] = f"{name}.{k}"
            self._adopted[id(meta)] = meta  # held: its id in ``keys`` stays its own
        self.owners.append(module)
        self._handles_of[module] = (module.register_forward_pre_hook(lambda m, args: self.load(m)),
                                    module.register_forward_hook(lambda m, args, out: self.drop(m)))

    def forget_adopted(self) -> None:
        """Delete what ``adopt`` stored (the model holds those modules no more: a restored model)."""
        keys = {self.keys.pop(i) for i in self._adopted}
        self._adopted.clear()
        paths = {self.files.pop(k) for k in keys if k in self.files}
        for path in paths:
            self._handles.pop(path, None)
            path.unlink(missing_ok=True)
        if self.state is not None:
            for k in keys:
                self.state.pop(k, None)
        for module, handles in self._handles_of.items():
            for h in handles:
                h.remove()
            self.owners.remove(module)
        self._handles_of.clear()

    def _read(self, key: str) -> torch.Tensor:
        if key in self.conversions:  # its sources joined on the compute device, wherever each is stored
            return self.conversions[key].build(lambda k: self._read(k).to(self.device), key, self.model)
        if self.state is not None:
            return self.state[key]
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = ShardReader(path)
        return self._handles[path].get_tensor(key)

    def load(self, module: nn.Module) -> None:
        """Read ``module``'s own tensors onto the device (a no-op for one already loaded)."""
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            tensor = self.read(p).to(self.device)
            self.bytes_read += tensor.numel() * tensor.element_size()
            self._meta[(id(module), name)] = p
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)

    def drop(self, module: nn.Module) -> None:
        """Put ``module``'s meta parameters back (deferred to the end of a ``keep`` block)."""
        if self._keeping:
            self._kept[id(module)] = module
            return
        for name in list(module._parameters):
            meta = self._meta.pop((id(module), name), None)
            if meta is not None:
                module._parameters[name] = meta
        self.release()

    def release(self) -> None:
        """Hand freed heap memory back to the system once ``TRIM_BYTES`` more were read (glibc)."""
        if MALLOC_TRIM is not None and self.bytes_read - self._trimmed_at >= TRIM_BYTES:
            self._trimmed_at = self.bytes_read
            MALLOC_TRIM(0)

    @contextmanager
    def keep(self) -> Iterator[None]:
        """Within the block, a module's weights stay loaded after it runs: a loop that runs one
        submodule over many batches reads its weights once. All are dropped when the block ends."""
        self._keeping += 1
        try:
            yield
        finally:
            self._keeping -= 1
            if not self._keeping:
                kept, self._kept = self._kept, {}
                for module in kept.values():
                    self.drop(module)

    def fingerprint(self) -> list:
        """What identifies the weights without reading them: each shard's name, size and mtime."""
        files = sorted(set(self.files.values()))
        return file_stamps(files) if files else ["in memory"]

    def resident_bytes(self) -> int:
        """Bytes of weights loaded right now."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.is_meta)

    def read(self, param: torch.Tensor) -> torch.Tensor:
        """The stored value of a meta parameter (host memory, or a GPU's with ``gpus``; a parameter joined
        from several stored tensors, on the compute device), cast like a loaded one (for saving and
        factorizing)."""
        tensor = self._read(self.keys[id(param)])
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


def spread(folder: Path, dtype: torch.dtype, budgets: dict[torch.device, int]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (floating ones cast to ``dtype``) placed across ``budgets``' devices
    (``gpus``), read one at a time: host memory never holds more than one tensor."""
    sizes = checkpoint_sizes(folder, dtype)
    placement = place(sizes, budgets)
    if placement is None:
        gb = 1024**3
        raise SubFitError(f"offload: gpus: the weights ({sum(sizes.values()) / gb:.1f} GB as {str(dtype).split('.')[-1]}) "
                          f"do not fit in the {sum(budgets.values()) / gb:.1f} GB the GPUs have for them "
                          f"({len(budgets)} GPU(s), the compute device keeping room for the run); use offload=cpu or offload=disk")
    readers: dict[Path, ShardReader] = {}
    state: dict[str, torch.Tensor] = {}
    for name, path in checkpoint_files(folder).items():
        tensor = readers.setdefault(path, ShardReader(path)).get_tensor(name)
        state[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).to(placement[name])
    return state


def build_streamed(folder: Path, dtype: torch.dtype, device: torch.device, mode: str,
                   trust_remote_code: bool = False,
                   budgets: dict[torch.device, int] | None = None) -> tuple[nn.Module, WeightStream]:
    """A model of ``folder``'s config with no weights in memory, and the stream that supplies them.
    ``budgets`` (``gpus``): bytes of weights per device, filled in order (default: ``gpu_budgets``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint_files(folder)  # a folder without safetensors is refused before anything is built
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # a tied head is the embedding's parameter, stored once in the checkpoint
    for buffer_owner in model.modules():
        for name, b in list(buffer_owner._buffers.items()):
            if b is not None:
                buffer_owner._buffers[name] = b.to(device)
    model.eval()
    if mode == "gpus":
        spread_state = spread(folder, dtype, gpu_budgets(device) if budgets is None else budgets)
        return model, WeightStream(model, device, dtype, folder=folder, state=spread_state)
    if mode == "cpu":
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for path in sorted(set(checkpoint_files(folder).values())):
            state.update(load_file(str(path)))
        return model, WeightStream(model, device, dtype, folder=folder, state=state)
    return model, WeightStream(model, device, dtype, folder=folder)
