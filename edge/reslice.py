"""A fetching worker's slice of a new plan, built from the slice it holds plus only the pieces it lacks.

A worker without a checkpoint fetched the shard files of the plan it served. After a re-plan its
new slice of every tensor is a range of the same full tensor along the same axis (TENSOR_SPLITS:
query heads, KV heads, MLP columns, vocabulary rows), and most plans overlap the old range. The
overlap is byte for byte what its old file holds (quantization is per output row and per group,
whatever the plan), so it is copied from there and only the ranges before and after it are asked
of the master (edge.fetch), a field at a time in pieces of at most PIECE_BYTES.

The assembled file must have the sha256 that the master's manifest lists for the new file
(safetensors writes the same bytes for the same tensors); when it does not, the file is fetched
whole, so a mistake here costs time, never a wrong weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from edge.split import rank_dir
from models.llama import Weight, field_split
from models.quant import GROUP, QuantWeight, gather_quantized
from models.sharding import LocalDims, PlanError, SplitKind

PIECE_BYTES = 8 << 20  # at most this much of one field per request (a frame, and memory, stay small)

FetchPiece = Callable[[str, int, int], Awaitable[Weight]]  # (field, start, stop) of the new file -> weight


def slice_weight(w: Weight, kind: SplitKind, start: int, stop: int) -> Weight:
    """Elements start..stop of a weight along the dimension `kind` splits (out: rows, in: columns)."""
    if isinstance(w, QuantWeight):
        return w.rows(start, stop) if kind == "out" else w.cols(start, stop)
    return w[start:stop] if kind == "out" else w[:, start:stop]


def split_length(w: Weight, kind: SplitKind) -> int:
    """Elements of `w` along the dimension `kind` splits."""
    shape = w.shape
    return shape[0] if kind == "out" else shape[1]


def cat_weights(parts: list[Weight], kind: SplitKind) -> Weight:
    """The weight made of `parts` laid end to end along the dimension `kind` splits."""
    if not isinstance(parts[0], QuantWeight):
        return torch.cat(parts, 0 if kind == "out" else 1)
    plains = [p.plain() for p in parts]  # q, scale, min with output channels last
    first = parts[0]
    if kind == "out":
        axis_of = (-1, -1, -1)
    elif first.kind == "int8":
        axis_of = (0, None, None)  # q [K, N]; per-channel scales are whole in every input slice
    else:
        axis_of = (0, 0, 0)  # [G, 32 | 16, N], scale and min [G, N]
    joined = [None if plains[0][i] is None else
              plains[0][i] if axis is None else torch.cat([p[i] for p in plains], axis)
              for i, axis in enumerate(axis_of)]
    return QuantWeight.from_plain(first.kind, *joined)


@dataclass(frozen=True)
class Part:
    """A range of the new slice along the split dimension, in its own coordinates; `held`: copied
    from the old slice (at `old_start`), else fetched."""

    start: int
    stop: int
    held: bool
    old_start: int = 0


def parts_of(old: tuple[int, int], new: tuple[int, int]) -> list[Part]:
    """The new range [s, e) of a full tensor, cut into the part the old range covers and the
    pieces before and after it (in the new slice's coordinates)."""
    (s_old, e_old), (s_new, e_new) = old, new
    lo, hi = max(s_old, s_new), min(e_old, e_new)
    if lo >= hi:
        return [Part(0, e_new - s_new, False)]
    parts = [Part(0, lo - s_new, False), Part(lo - s_new, hi - s_new, True, lo - s_old),
             Part(hi - s_new, e_new - s_new, False)]
    return [p for p in parts if p.stop > p.start]


def piece_step(w: Weight, kind: SplitKind) -> int:
    """Elements along the split dimension per fetched piece: at most PIECE_BYTES, whole groups."""
    per_element = max(1, w.nbytes // max(1, split_length(w, kind)))
    return max(GROUP, PIECE_BYTES // per_element // GROUP * GROUP)


@dataclass(frozen=True)
class HeldSlice:
    """The slice a fetching worker holds: its files in `folder` for its position `dims.rank` of a
    plan over `world_size` devices (fetched and checked against the master's sha256 when it did)."""

    folder: Path
    world_size: int
    dims: LocalDims

    def file_for(self, name: str) -> Path | None:
        """Its file of the same part of the model as the new plan's file `name` (a layer, the head)."""
        base = name.rsplit("/", 1)[-1]
        path = self.folder / rank_dir(self.world_size, self.dims.rank) / base
        return path if base != "embed.safetensors" and path.is_file() else None


@dataclass
class Reslice:
    """How a re-plan's files are built from a held slice: `held` (the files it served), `dims` (its
    slice of the new plan) and, with `keep`, the weights of every file it assembled, kept by file
    name (a resident shard then takes them as they are instead of reading back what was written)."""

    held: HeldSlice
    dims: LocalDims
    keep: bool = False
    kept: dict[str, dict[str, Weight]] = dataclasses.field(default_factory=dict)

    def keep_weights(self, name: str, weights: dict[str, Weight]) -> None:
        if self.keep:
            self.kept[name] = {f: _owned(w) for f, w in weights.items()}


def _owned(w: Weight) -> Weight:
    """`w` in memory of its own (a copy of a view, which would keep the old file's tensor alive)."""
    if isinstance(w, QuantWeight):
        return QuantWeight(w.kind, _owned(w.q), _owned(w.scale), None if w.min is None else _owned(w.min))
    return w.clone() if w._base is not None or not w.is_contiguous() else w


def load_weights(path: Path) -> dict[str, Weight]:
    """A shard file's fields (quantized ones gathered back into QuantWeights)."""
    return gather_quantized(load_file(str(path)))


async def assemble(old: dict[str, Weight], held: LocalDims, new: LocalDims,
                   fetch_piece: FetchPiece) -> dict[str, Weight] | None:
    """The new slice of every field of a file whose old slice is `old`; None when a field has no
    rule to cut it by (the caller fetches the file whole)."""
    out = {}
    for field, w in old.items():
        try:
            kind, unit = field_split(field)
        except PlanError:
            return None
        if kind == "replicated":
            out[field] = w
            continue
        if kind != "out" and kind != "in":
            return None  # rank 0's biases: a worker never holds them
        pieces = []
        for part in parts_of(held.rows(unit), new.rows(unit)):
            if part.held:
                pieces.append(slice_weight(w, kind, part.old_start, part.old_start + part.stop - part.start))
                continue
            step = piece_step(w, kind)
            for start in range(part.start, part.stop, step):
                pieces.append(await fetch_piece(field, start, min(part.stop, start + step)))
        out[field] = cat_weights(pieces, kind) if len(pieces) > 1 else pieces[0]
    return out
