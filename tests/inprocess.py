"""A cluster's master, workers and attention nodes in one process (one event loop, loopback TCP)
for fast tests."""

import asyncio
import contextlib

from edge.attention import AttentionNode, AttentionNodeSettings
from edge.master import ClusterEngine, MasterSettings
from edge.worker import Worker, WorkerSettings

SECRET = b"in-process-secret-" + b"z" * 20


@contextlib.asynccontextmanager
async def cluster(folder, world_size: int, worker: dict | None = None, **settings):
    """The engine with every worker joined (and every attention node linked); `worker`: extra
    WorkerSettings fields for every worker."""
    engine = ClusterEngine(MasterSettings(model=str(folder), world_size=world_size, secret=SECRET, **settings))
    port = await engine.start()
    workers = [Worker(WorkerSettings(str(folder), r, "127.0.0.1", port, SECRET, **(worker or {})))
               for r in range(1, world_size)]
    tasks = {w.settings.rank: asyncio.create_task(w.run(), name=f"worker-{w.settings.rank}") for w in workers}
    nodes = [asyncio.create_task(AttentionNode(AttentionNodeSettings(n, "127.0.0.1", port, SECRET)).run())
             for n in range(settings.get("attention_nodes", 0))]
    try:
        await engine.wait_ready(30, with_attention_nodes=bool(nodes))
        yield engine, workers, tasks
    finally:
        for t in [*tasks.values(), *nodes]:
            t.cancel()
        await asyncio.gather(*tasks.values(), *nodes, return_exceptions=True)
        for w in workers:
            await w.aclose()
        await engine.aclose()
