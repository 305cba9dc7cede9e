"""What the master reports of its cluster: the typed status (/health, the router) and counters
(/metrics), assembled from its parts."""

from __future__ import annotations

import psutil

from edge.attention_pool import AttentionPool
from edge.planner import Planner
from edge.profile import kv_room
from edge.roster import Roster
from models.engine import OffloadStatus
from transport.collectives import StarAllReduce


def offload_status(pool: AttentionPool | None, ready: bool) -> OffloadStatus | None:
    if pool is None:
        return None
    missing = pool.missing()
    reason = ("" if ready else f"attention node(s) {missing} not connected" if missing
              else "the attention nodes are not linked to every rank yet")
    return OffloadStatus(pool.n_nodes, ready, missing, reason, pool.free_kv_bytes())


def plan_table(planner: Planner) -> list[dict]:
    """Per device serving now: its rank, position and what it holds."""
    return [{"rank": device, "position": d.rank, "heads": d.n_local_heads, "kv_heads": d.n_local_kv_heads,
             "mlp_columns": d.local_intermediate, "vocab_rows": d.local_vocab}
            for device, d in zip(planner.devices, planner.dims, strict=True)]


def peer_meta_by_device(star: StarAllReduce, devices: list[int]) -> dict[int, dict]:
    """What each worker reported with its last step (star.peer_meta is by position)."""
    return {devices[p]: m for p, m in star.peer_meta.items() if p < len(devices)}


def free_kv_bytes(roster: Roster, star: StarAllReduce, planner: Planner) -> int:
    """What one request's KV could take on the compute ranks: the tightest rank's free memory
    scaled by its share of the KV heads (each rank holds the KV of its own heads)."""
    free = {0: psutil.virtual_memory().available}
    free |= {r: rec.free_bytes for r, rec in roster.records.items() if rec.free_bytes is not None}
    for device, meta in peer_meta_by_device(star, planner.devices).items():
        if isinstance(meta.get("mem_available"), int):
            free[device] = meta["mem_available"]
    heads = {device: d.n_local_kv_heads for device, d in zip(planner.devices, planner.dims, strict=True)}
    return kv_room({r: f for r, f in free.items() if r in heads}, heads)


def link_bytes(roster: Roster) -> dict[int, dict[str, int]]:
    """Bytes rank 0 sent to and received from each worker: control channel plus data link."""
    links = {r: {"sent": rec.channel.bytes_sent, "received": rec.channel.bytes_received}
             for r, rec in roster.records.items()}
    for r, data in list(roster.data_links.items()):
        if r in links:
            links[r] = {"sent": links[r]["sent"] + data.bytes_sent,
                        "received": links[r]["received"] + data.bytes_received}
    return links
