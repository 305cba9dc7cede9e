"""Shard files over the authenticated transport: a worker without its files fetches exactly its own.

Worker -> master  FetchRequest(name, offset), ..., FetchRequest(done=True)   (edge.messages)
Master -> worker  Chunk(name, offset, data, eof)  (CHUNK bytes at a time)
The worker appends to NAME.part, so a broken transfer resumes where it stopped; at the end the
sha256 must match the master's manifest before the file takes its real name. Files already
present with the right checksum are not fetched again (after restarts, too).

After a re-plan a worker that holds the files of its old slice asks only for what they lack:
FetchRequest(name, field, start, stop) -> Piece(name, field, start, safetensors bytes), and
assembles the rest from its own files (edge.reslice); the sha256 check is the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

from edge.messages import Chunk, FetchRequest, Piece, receive, send
from edge.reslice import PIECE_BYTES, Reslice, assemble, load_weights, slice_weight, split_length
from edge.split import MANIFEST, sha256_file, stored_tensors
from edge.weights import SHARD_DTYPES
from models.llama import Weight, field_split
from models.quant import gather_quantized
from models.sharding import PlanError
from models.threads import to_passing_thread
from transport.channel import Channel
from transport.errors import FrameError, TransportError

log = logging.getLogger("edge_llm.fetch")
CHUNK = 4 << 20
FETCH_TIMEOUT = 120.0


def _safe_name(name: str, root: Path) -> Path:
    """A manifest name inside `root`; anything escaping it is a protocol error."""
    path = (root / name).resolve()
    if not isinstance(name, str) or root.resolve() not in path.parents:
        raise FrameError(f"refusing shard file name {name!r}")
    return path


async def serve_fetches(channel: Channel, split_dir: Path, allowed: set[str]) -> None:
    """Master side: answer fetch requests for `allowed` names until the worker says done."""
    while True:
        msg = await receive(channel, FetchRequest, FETCH_TIMEOUT)
        if msg.done:
            return
        name, offset = msg.name, msg.offset
        if name not in allowed or offset < 0:
            raise FrameError(f"worker asked for {name!r} at {offset!r}, which is not its file")
        path = _safe_name(name, split_dir)
        if msg.field is not None:
            data = await asyncio.to_thread(_read_piece, path, msg.field, msg.start, msg.stop)
            await send(channel, Piece(name, msg.field, msg.start, data))
            continue
        data = await asyncio.to_thread(_read_chunk, path, offset)
        await send(channel, Chunk(name, offset, data, len(data) < CHUNK))


def _read_chunk(path: Path, offset: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(CHUNK)


def _read_piece(path: Path, field: str, start: int, stop: int) -> bytes:
    """Elements start..stop of `field` of a shard file, as the safetensors bytes of its stored tensors."""
    try:
        kind, _ = field_split(field)
    except PlanError as e:
        raise FrameError(f"worker asked for field {field!r} of {path.name}: {e}") from e
    if kind not in ("out", "in"):
        raise FrameError(f"worker asked for a piece of {field} of {path.name}, which is not split")
    with safe_open(str(path), "pt") as fh:
        keys = [k for k in fh.keys() if k == field or k.startswith(field + ".")]
        if keys == [field]:  # a plain tensor: read only the piece
            return _plain_piece(path, fh.get_slice(field), field, kind, start, stop)
        weight = gather_quantized({k: fh.get_tensor(k) for k in keys}).get(field)
    if weight is None:
        raise FrameError(f"worker asked for {field} of {path.name}, which has none")
    length = split_length(weight, kind)
    _check_piece(path, field, start, stop, length, weight.nbytes // max(1, length))
    return save_safetensors(stored_tensors({field: slice_weight(weight, kind, start, stop)}))


def _plain_piece(path: Path, view, field: str, kind: str, start: int, stop: int) -> bytes:
    shape, dtype = view.get_shape(), SHARD_DTYPES.get(view.get_dtype())
    axis = 0 if kind == "out" else 1
    if len(shape) <= axis or dtype is None:
        raise FrameError(f"worker asked for a piece of {field} of {path.name}, which cannot be cut so")
    element_bytes = math.prod(shape) // max(1, shape[axis]) * dtype.itemsize
    _check_piece(path, field, start, stop, shape[axis], element_bytes)
    piece = view[start:stop] if axis == 0 else view[:, start:stop]
    return save_safetensors({field: piece.contiguous()})


def _check_piece(path: Path, field: str, start: int, stop: int, length: int, element_bytes: int) -> None:
    """A piece must lie inside the field and be no larger than a worker asks for (edge.reslice)."""
    if not 0 <= start < stop <= length:
        raise FrameError(f"worker asked for {field}[{start}:{stop}] of {path.name}, which it does not hold")
    if (stop - start) * element_bytes > 2 * PIECE_BYTES:
        raise FrameError(f"worker asked for {field}[{start}:{stop}] of {path.name}: too large a piece")


async def fetch_files(channel: Channel, files: dict[str, dict], plan: dict, dest: Path,
                      reslice: Reslice | None = None) -> int:
    """Worker side: make `dest` hold every file of `files` (name -> bytes, sha256); returns bytes
    fetched. With `reslice` (a re-plan of a worker that holds a slice), a file is assembled from
    its old file plus the pieces it lacks where it can be."""
    fetched = 0
    for name, entry in sorted(files.items()):
        path = _safe_name(name, dest)
        if path.is_file() and path.stat().st_size == entry["bytes"] and \
                await asyncio.to_thread(sha256_file, path) == entry["sha256"]:
            continue
        if reslice is not None and (old := reslice.held.file_for(name)) is not None:
            assembled, got = await _assemble_one(channel, name, path, entry, old, reslice)
            fetched += got
            if assembled:
                continue
        fetched += await _fetch_one(channel, name, path, entry)
    await send(channel, FetchRequest(done=True))
    manifest = {"plan": plan, "files": files}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return fetched


async def _fetch_one(channel: Channel, name: str, path: Path, entry: dict) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if offset > entry["bytes"]:
        part.unlink()
        offset = 0
    start = offset
    with part.open("ab") as fh:
        while True:
            await send(channel, FetchRequest(name, offset))
            msg = await receive(channel, Chunk, FETCH_TIMEOUT)
            if msg.name != name or msg.offset != offset:
                raise FrameError(f"unexpected chunk for {name} at {offset}")
            fh.write(msg.data)
            offset += len(msg.data)
            if msg.eof or offset >= entry["bytes"]:
                break
        log.info("fetched %s (%d MB)", name, (offset - start) >> 20)
    if await asyncio.to_thread(sha256_file, part) != entry["sha256"]:
        part.unlink()
        raise TransportError(f"{name}: checksum mismatch after fetching; will fetch again")
    part.replace(path)
    return offset - start


async def _assemble_one(channel: Channel, name: str, path: Path, entry: dict, old_path: Path,
                        reslice: Reslice) -> tuple[bool, int]:
    """Write `name` from the old file plus the pieces it lacks -> (whether the result is the
    master's file: else the caller fetches it whole, the bytes fetched)."""
    fetched = 0

    async def fetch_piece(field: str, start: int, stop: int) -> Weight:
        nonlocal fetched
        await send(channel, FetchRequest(name, field=field, start=start, stop=stop))
        msg = await receive(channel, Piece, FETCH_TIMEOUT)
        if (msg.name, msg.field, msg.start) != (name, field, start):
            raise FrameError(f"unexpected piece {msg.field}[{msg.start}:] of {msg.name}")
        try:
            tensors = load_safetensors(msg.data)
            piece = gather_quantized(tensors).get(field)
        except Exception as e:  # safetensors raises its own error types for damaged bytes
            raise FrameError(f"piece {field}[{start}:{stop}] of {name} is damaged: {e}") from e
        fetched += sum(t.nbytes for t in tensors.values())  # weight bytes, as a file's are counted
        if piece is None:
            raise FrameError(f"piece {field}[{start}:{stop}] of {name} holds no {field}")
        return piece

    old = await to_passing_thread(load_weights, old_path)
    weights = await assemble(old, reslice.held.dims, reslice.dims, fetch_piece)
    if weights is None:
        return False, fetched
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".assembled")  # not .part: a whole fetch resumes those
    await to_passing_thread(save_file, stored_tensors(weights), str(part))  # faster than bytes, then a write
    if await asyncio.to_thread(sha256_file, part) != entry["sha256"]:
        part.unlink()
        log.warning("%s assembled from the held slice differs from the master's; fetching it whole", name)
        return False, fetched
    part.replace(path)
    reslice.keep_weights(name, weights)
    return True, fetched
