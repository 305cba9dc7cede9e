"""The files of a Hugging Face checkpoint folder: which file holds each tensor (the index or the
headers), safetensors headers checked against the file size, and a cheap fingerprint."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from models.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse a safetensors header and check the file is as long as its header says (not truncated)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                  f"(header of {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: header needs "
                              f"{8 + header_len + end} bytes, file has {size}")
    return header


def tensor_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the file that holds it, from the index or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        return {name: folder / fname for name, fname in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found "
                              f"(expected {SINGLE_FILE} or {INDEX_FILE})")
    names: dict[str, Path] = {}
    for path in files:
        for name in read_safetensors_header(path):
            names[name] = path
    return names


def checkpoint_fingerprint(folder: Path | str) -> str:
    """Identifies a checkpoint by its config and weight-file headers (cheap: no tensor data read)."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            digest.update(path.name.encode() + fh.read(min(size, 1 << 24)))
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]
