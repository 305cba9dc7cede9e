"""Memory budgets for tests of the sliding-window loader (edge.weights.WeightWindow)."""

import json
from pathlib import Path

from edge.split import MANIFEST, head_file, split_model
from models.config import load_config
from models.sharding import kv_bytes_per_token, local_dims


def window_floor(folder: Path, world: int, out: Path) -> int:
    """The least budget (bytes) rank 0 of a `world`-device split accepts: its head, the KV reserve
    and two layers (the window's floor), splitting `folder` into `out`."""
    config = load_config(folder)
    split = split_model(folder, world, out=out, quiet=True)
    files = json.loads((split / MANIFEST).read_text())["files"]
    layer = max(e["bytes"] for n, e in files.items() if n.startswith("rank-0") and "layer" in n)
    reserve = kv_bytes_per_token(config, local_dims(config, world)[0]) * min(2048, config.max_position_embeddings)
    return files[head_file(world, 0)]["bytes"] + reserve + 2 * layer


def budget_between_one_and_two_devices(folder: Path, out: Path) -> float:
    """A memory budget (MB) that holds a rank's window of the 2-device plan but not of one device:
    a 2-device cluster under it cannot re-plan onto one device when it loses the other."""
    need = [window_floor(folder, world, out / f"split-{world}") for world in (1, 2)]
    return sum(need) / 2 / (1 << 20)
