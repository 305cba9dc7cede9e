"""Where a rank's layer weights come from: all resident, or a sliding window over per-layer files.

With a memory budget smaller than the shard, the first R layers stay resident for good and the
rest stream through a window of W >= 2 slots: a background reader loads the next streamed layer
while the current one computes and communicates, and a layer leaves memory once the forward has
moved past it. Bytes re-read per token are then about shard - budget, not the whole shard.
Reads are plain buffered reads of one contiguous file per layer; pages are dropped from the page
cache after a streamed read, so the emulation pays the disk as a memory-starved device would.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edge.split import SplitError, SplitPlan, embed_file, head_file, layer_file, verify_rank
from models.fusion import fuse_layer
from models.llama import HeadWeights, LayerWeights
from models.quant import gather_quantized

MB = 1 << 20


class BudgetTooSmall(SplitError):
    """The memory budget cannot hold two layers (plus the head and KV reserve); says what it needs."""


@dataclass
class WindowStats:
    """Counters exported in /metrics and the benchmark."""

    bytes_read: int = 0
    disk_busy_s: float = 0.0
    compute_wait_s: float = 0.0
    forwards: int = 0
    resident_bytes: int = 0
    streamed_layers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, float]:
        return {"bytes_read": self.bytes_read, "disk_busy_s": self.disk_busy_s,
                "compute_wait_s": self.compute_wait_s, "forwards": self.forwards,
                "resident_bytes": self.resident_bytes, "streamed_layers": self.streamed_layers}


SHARD_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8, "U8": torch.uint8}


def _tensor_views(buf: bytearray, path: Path) -> dict[str, torch.Tensor]:
    """Tensors that view one buffer holding a whole safetensors file: one read, no second copy."""
    (header_len,) = struct.unpack_from("<Q", buf)
    try:
        header = json.loads(bytes(buf[8:8 + header_len]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SplitError(f"{path}: corrupt shard header ({e}); run `edge-llm split` to repair it") from e
    header.pop("__metadata__", None)
    base, tensors = 8 + header_len, {}
    for name, entry in header.items():
        start, stop = entry["data_offsets"]
        dtype = SHARD_DTYPES.get(entry["dtype"])
        if dtype is None or base + stop > len(buf):
            raise SplitError(f"{path}: tensor {name!r} is damaged; run `edge-llm split` to repair it")
        count = (stop - start) // torch.empty(0, dtype=dtype).element_size()
        tensors[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start) \
            .view(entry["shape"])
    return tensors


def read_layer_file(path: Path, expected_bytes: int, drop_cache: bool,
                    buf: bytearray | None = None) -> tuple[dict, int]:
    """One sequential read of a whole shard file into `buf` (reused: no page faults, no zeroing);
    raises SplitError naming a truncated or bad file."""
    try:
        size = path.stat().st_size
        if size != expected_bytes:
            raise SplitError(f"{path}: shard file has {size} bytes, the manifest says {expected_bytes}; "
                             "run `edge-llm split` to repair it")
        if buf is None or len(buf) < size:
            buf = bytearray(size)
        with path.open("rb", buffering=0) as fh:
            if fh.readinto(memoryview(buf)[:size]) != size:
                raise SplitError(f"{path}: shard file shrank while reading; run `edge-llm split`")
            if drop_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return gather_quantized(_tensor_views(buf, path)), size
    except (struct.error, KeyError, TypeError, ValueError, OSError) as e:
        raise SplitError(f"{path}: cannot read shard file ({e}); run `edge-llm split` to repair it") from e


class WeightWindow:
    """Layer weights of one rank under a memory budget; `window(i)` is called by the forward."""

    def __init__(self, folder: Path, plan: SplitPlan, rank: int, num_layers: int, budget_bytes: int,
                 reserve_bytes: int = 0, window: int = 2, drop_cache: bool = True,
                 verified: dict[str, dict] | None = None, in_memory: dict[str, dict] | None = None):
        self.folder, self.plan, self.rank = folder, plan, rank
        self.stats = WindowStats()
        self._drop_cache = drop_cache
        self._in_memory = in_memory or {}  # file name -> its weights, already in memory (edge.reslice)
        self._names = [layer_file(plan.world_size, rank, i) for i in range(num_layers)]
        names = [*self._names, head_file(plan.world_size, rank)]
        if verified is not None and all(n in verified for n in names):
            self._entries = verified  # checked by the caller a moment ago (edge.fetch)
        else:
            self._entries = verify_rank(folder, plan, rank, num_layers)  # sha256 of every file, once
        head_name = head_file(plan.world_size, rank)
        head_tensors = self._in_memory.get(head_name) or \
            read_layer_file(folder / head_name, self._entries[head_name]["bytes"], False)[0]
        self.head = HeadWeights(embed=torch.empty(0), norm=head_tensors["norm"],
                                lm_head=head_tensors["lm_head"])
        resident_count = self._plan_residency(budget_bytes, reserve_bytes, window, num_layers)
        self._resident = {i: self._resident_layer(i) for i in range(resident_count)}
        self._in_memory = {}  # streamed layers come from their files, into the window's buffers
        self._streamed = [i for i in range(num_layers) if i not in self._resident]
        self.window = window
        self.stats.streamed_layers = len(self._streamed)
        self.stats.resident_bytes = sum(w.nbytes() for w in self._resident.values()) + \
            sum(t.nbytes for t in vars(self.head).values() if t is not None)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"weights-r{rank}")
        self._inflight: dict[int, Future[LayerWeights]] = {}
        # One buffer per window slot, allocated once and reused: a layer's tensors view its buffer.
        slot_bytes = max(self._entries[n]["bytes"] for n in self._names)
        self._free = [bytearray(slot_bytes) for _ in range(window if self._streamed else 0)]
        self._buffer_of: dict[int, bytearray] = {}
        self._held: int | None = None  # the streamed layer the forward is computing with

    def _plan_residency(self, budget: int, reserve: int, window: int, num_layers: int) -> int:
        """How many layers stay resident; raises BudgetTooSmall when not even the window fits."""
        layer_bytes = max(self._entries[n]["bytes"] for n in self._names)
        head_bytes = self._entries[head_file(self.plan.world_size, self.rank)]["bytes"]
        free = budget - head_bytes - reserve
        slots = free // layer_bytes
        if slots >= num_layers:
            return num_layers
        if slots < window:
            need = head_bytes + reserve + window * layer_bytes
            raise BudgetTooSmall(
                f"a memory budget of {budget / MB:.1f} MB is too small for rank {self.rank}: it needs at "
                f"least {need / MB:.1f} MB ({window} layers of {layer_bytes / MB:.1f} MB, the head "
                f"{head_bytes / MB:.1f} MB and a KV reserve of {reserve / MB:.1f} MB)")
        return int(slots - window)

    def _resident_layer(self, layer: int) -> LayerWeights:
        """A layer that stays, fused (models.fusion) in memory of its own. An in-memory layer's entry is
        taken out of `in_memory`, so its parts that fuse are freed as their fused copy is made."""
        name = self._names[layer]
        if name in self._in_memory:
            return fuse_layer(LayerWeights(**self._in_memory.pop(name)))
        return fuse_layer(self._read(layer, count=False), own=True)

    def _read(self, layer: int, count: bool = True, buf: bytearray | None = None) -> LayerWeights:
        name = self._names[layer]
        start = time.perf_counter()
        tensors, size = read_layer_file(self.folder / name, self._entries[name]["bytes"],
                                        self._drop_cache and count, buf)
        if count:
            with self.stats.lock:
                self.stats.bytes_read += size
                self.stats.disk_busy_s += time.perf_counter() - start
        return LayerWeights(**tensors)

    def _next_streamed(self, layer: int, ahead: int) -> list[int]:
        """The `ahead` streamed layers after `layer`, wrapping to the next token's first ones."""
        pos = self._streamed.index(layer)
        n = len(self._streamed)
        return [self._streamed[(pos + k) % n] for k in range(1, min(ahead, n - 1) + 1)]

    def _submit(self, layer: int) -> Future[LayerWeights]:
        fut = self._inflight.get(layer)
        if fut is None:
            buf = self._buffer_of[layer] = self._free.pop() if self._free else bytearray(0)
            fut = self._inflight[layer] = self._reader.submit(self._read, layer, True, buf)
        return fut

    def _release(self, layer: int) -> None:
        """The window moved past `layer`: its buffer serves the next read (once its own read ends)."""
        fut, buf = self._inflight.pop(layer, None), self._buffer_of.pop(layer, None)
        if buf is None or not len(buf):
            return
        if fut is not None and not fut.done():
            fut.add_done_callback(lambda _: self._free.append(buf))
        else:
            self._free.append(buf)

    def resident_layers(self) -> list[LayerWeights]:
        """The layers held in memory for good (not those streamed through the window)."""
        return list(self._resident.values())

    def __call__(self, layer: int) -> LayerWeights:
        """Layer `layer`'s weights; blocks (counted as compute wait) only if its read is not done.

        Called in layer order by the forward, so the previously returned streamed layer is done.
        """
        if layer in self._resident:
            if layer == 0 and self._streamed and self._held is None:
                self._submit(self._streamed[0])  # warm the window for the first token
            return self._resident[layer]
        if self._held is not None and self._held != layer:
            self._release(self._held)
        self._held = None
        keep = {layer, *self._next_streamed(layer, self.window - 1)}
        for other in [k for k in self._inflight if k not in keep]:
            self._release(other)
        fut = self._submit(layer)
        for nxt in sorted(keep - {layer}, key=lambda k: (k <= layer, k)):
            self._submit(nxt)
        start = time.perf_counter()
        try:
            weights = fut.result()  # SplitError propagates: the step fails with the file's name
        except SplitError:
            self._release(layer)
            raise
        with self.stats.lock:
            self.stats.compute_wait_s += time.perf_counter() - start
        self._inflight.pop(layer)
        self._held = layer
        if layer == self._streamed[-1]:
            self.stats.forwards += 1
        return weights

    def nbytes(self) -> int:
        return self.stats.resident_bytes

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)


class EmbeddingRows:
    """Rank 0's embedding table, memory-mapped: a step reads only the rows of its tokens.

    So the table (V x D, the largest tensor of many checkpoints) stays out of the budget.
    """

    def __init__(self, folder: Path, world_size: int):
        from safetensors import safe_open

        self._file = safe_open(str(folder / embed_file(world_size)), framework="pt")
        self._rows = self._file.get_slice("embed")

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, S] -> [B, S, D] in the split's dtype."""
        rows = [self._rows[int(t):int(t) + 1] for t in tokens.reshape(-1)]
        return torch.cat(rows).view(*tokens.shape, -1)
