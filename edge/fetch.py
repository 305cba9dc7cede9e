"""Shard files over the authenticated transport: a worker without its files fetches exactly its own.

Worker -> master  FetchRequest(name, offset), ..., FetchRequest(done=True)   (edge.messages)
Master -> worker  Chunk(name, offset, data, eof)  (CHUNK bytes at a time)
The worker appends to NAME.part, so a broken transfer resumes where it stopped; at the end the
sha256 must match the master's manifest before the file takes its real name. Files already
present with the right checksum are not fetched again (after restarts, too).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from edge.messages import Chunk, FetchRequest, receive, send
from edge.split import MANIFEST, sha256_file
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
        data = await asyncio.to_thread(_read_chunk, _safe_name(name, split_dir), offset)
        await send(channel, Chunk(name, offset, data, len(data) < CHUNK))


def _read_chunk(path: Path, offset: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(CHUNK)


async def fetch_files(channel: Channel, files: dict[str, dict], plan: dict, dest: Path) -> int:
    """Worker side: make `dest` hold every file of `files` (name -> bytes, sha256); returns bytes fetched."""
    fetched = 0
    for name, entry in sorted(files.items()):
        path = _safe_name(name, dest)
        if path.is_file() and path.stat().st_size == entry["bytes"] and \
                await asyncio.to_thread(sha256_file, path) == entry["sha256"]:
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
