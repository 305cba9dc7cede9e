"""Process-level entry points: the emulated cluster, a real cluster's master, and a worker device."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aiohttp import web

from edge.attention import AttentionNode, AttentionNodeSettings
from edge.master import ClusterEngine, MasterSettings
from edge.worker import Worker, WorkerSettings
from edge_llm.spawn import Device, DeviceForks, Launch, start_process
from models.drafting import SpeculationSettings
from models.dtypes import dtype_name
from models.threads import set_threads
from scheduler.app import ServerSettings, create_app
from scheduler.cloud import CloudSettings
from scheduler.router import Policy
from scheduler.state import ADMISSION
from transport.auth import SECRET_ENV
from transport.fastpath import set_poll_us
from transport.link import LinkSpec

log = logging.getLogger("edge_llm.cluster")


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    served_name: str | None = None
    ready_timeout: float = 300.0
    max_running: int = 16
    max_queue: int = 64
    request_timeout: float = 600.0
    body_timeout: float = 30.0
    drain_timeout: float = 10.0  # on SIGTERM / Ctrl-C: how long requests in flight may finish
    api_key: str | None = None
    cloud: CloudSettings | None = None
    policy: Policy = field(default_factory=Policy)
    speculation: SpeculationSettings = field(default_factory=SpeculationSettings)


def threads_per_process(world_size: int) -> int:
    """Each emulated device gets its share of the cores, so N processes do not oversubscribe."""
    return max(1, (os.cpu_count() or 1) // world_size)


def poll_per_process(settings: MasterSettings) -> tuple[int, bool]:
    """How emulated devices poll their data links (transport.fastpath.set_poll_us): 300 us when each
    process has a core of its own; where processes share cores polling would take the core a peer
    computes on, so there they poll 1000 us giving the core away between tries (yield)."""
    if settings.world_size + settings.attention_nodes <= (os.cpu_count() or 1):
        return 300, False
    return 1000, True


def _spawn_worker(rank: int, master_port: int, settings: MasterSettings, threads: int, launch: Launch) -> Device:
    poll_us, poll_yield = poll_per_process(settings)
    argv = ["worker", "--model", settings.model, "--rank", str(rank),
            "--master", f"127.0.0.1:{master_port}", "--threads", str(threads),
            "--step-timeout", str(settings.step_timeout), "--poll-us", str(poll_us)]
    if poll_yield:
        argv += ["--poll-yield"]
    if settings.memory_budget_mb is not None:
        argv += ["--memory-budget-mb", str(settings.memory_budget_mb)]
    if settings.split_dir is not None:
        argv += ["--split-dir", settings.split_dir]
    if settings.keep_page_cache:
        argv += ["--keep-page-cache"]
    return launch(argv + _link_args(settings), _device_env(settings))


def _spawn_attention_node(node: int, master_port: int, settings: MasterSettings, threads: int,
                          launch: Launch) -> Device:
    argv = ["worker", "--role", "attention", "--node", str(node),
            "--master", f"127.0.0.1:{master_port}", "--threads", str(threads)]
    return launch(argv + _link_args(settings), _device_env(settings))


def _link_args(settings: MasterSettings) -> list[str]:
    if settings.link is None or not settings.link.active:
        return []
    return ["--link-latency-ms", str(settings.link.latency_ms), "--link-bandwidth-mbps", str(settings.link.bandwidth_mbps)]


def _device_env(settings: MasterSettings) -> dict[str, str]:
    """A spawned device's environment beyond the master's: the secret, and a fixed mmap threshold,
    which lets glibc hand freed layer buffers back to the OS at once, so a windowed worker's RSS
    follows its window instead of its high-water mark."""
    return {SECRET_ENV: settings.secret.decode(), "MALLOC_MMAP_THRESHOLD_": "1048576"}


def _http_listener(http: HttpSettings) -> socket.socket:
    """The HTTP port, taken before anything loads or spawns: a port in use is one line at once,
    not a traceback after the model loaded (and the socket is ours from then on, no race)."""
    try:
        return socket.create_server((http.host, http.port), reuse_port=False)
    except OSError as e:
        raise StartupError(f"cannot serve HTTP on {http.host}:{http.port}: {e.strerror or e}; "
                           "choose another --port (0 picks a free one)") from e


async def _serve_http(engine: ClusterEngine, http: HttpSettings, listener: socket.socket) -> web.AppRunner:
    name = http.served_name or Path(engine.settings.model).resolve().name
    backend = f"{engine.fingerprint}:{dtype_name(engine.dtype)}:{engine.quantize}"
    server = ServerSettings(served_name=name, request_timeout=http.request_timeout, body_timeout=http.body_timeout,
                            max_running=http.max_running, max_queue=http.max_queue, api_key=http.api_key,
                            cloud=http.cloud, policy=http.policy,
                            system_fingerprint="fp_" + hashlib.sha256(backend.encode()).hexdigest()[:10])
    # handler_cancellation: a client that disconnects cancels its request's handler, so a request
    # nobody waits for stops generating (or never starts, when it was queued) and frees its slot.
    # shutdown_timeout: requests were given their time to finish (_drain); cleanup does not wait again.
    try:
        speculation = http.speculation.build(engine.config, engine.tokenizer)
    except ValueError as e:
        raise StartupError(str(e)) from e
    runner = web.AppRunner(create_app(engine, server, speculation), handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=0.5)
    await runner.setup()
    site = web.SockSite(runner, listener)
    await site.start()
    port = runner.addresses[0][1]
    print(f"edge-llm: serving {name!r} on http://{http.host}:{port} "
          f"({engine.settings.world_size} device(s): rank 0 and {engine.settings.world_size - 1} worker(s)); "
          f"workers join at port {engine.port}", flush=True)
    return runner


async def _drain(runner: web.AppRunner, timeout: float) -> None:
    """Stop taking connections and let the requests in flight (and queued) finish, for up to
    `timeout` seconds; a second SIGINT/SIGTERM stops at once."""
    admission = runner.app[ADMISSION]
    if not admission.running + admission.waiting or timeout <= 0:
        return
    print(f"edge-llm: stopping; draining {admission.running + admission.waiting} request(s) for up to "
          f"{timeout:g} s (Ctrl-C again to stop now)", flush=True)
    for site in list(runner.sites):
        await site.stop()
    again = asyncio.create_task(_until_signalled())
    try:
        async with asyncio.timeout(timeout):
            while admission.running + admission.waiting and not again.done():
                await asyncio.wait({again}, timeout=0.05)
    except TimeoutError:
        print(f"edge-llm: {admission.running + admission.waiting} request(s) still running after "
              f"{timeout:g} s; stopping them", flush=True)
    finally:
        again.cancel()
        await asyncio.gather(again, return_exceptions=True)


def _stop_on_signal() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets from now on: the handlers are in place when this returns,
    so a signal that comes right after a process says it is up (a test's, a supervisor's) stops it
    cleanly instead of killing it by the default action."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _until_signalled() -> None:
    await _stop_on_signal().wait()


class StartupError(RuntimeError):
    """A process the cluster spawned exited before joining (its own error went to stderr first)."""


async def _wait_ready(engine: ClusterEngine, timeout: float, with_nodes: bool,
                      spawned: list[tuple[str, Device]]) -> None:
    """engine.wait_ready, but fail at once when a spawned worker or node exits first (a checkpoint it
    cannot read, a plan it refuses), instead of waiting out the timeout for a process that is gone."""
    ready = asyncio.ensure_future(engine.wait_ready(timeout, with_attention_nodes=with_nodes))
    try:
        while not (await asyncio.wait({ready}, timeout=0.2))[0]:
            for name, child in spawned:
                if child.poll() is not None:
                    raise StartupError(f"{name} (pid {child.pid}) exited with status {child.returncode} "
                                       "before joining; its error is above")
        ready.result()
    finally:
        ready.cancel()
        await asyncio.gather(ready, return_exceptions=True)


@asynccontextmanager
async def running_cluster(settings: MasterSettings, spawn_workers: bool, ready_timeout: float,
                          announce: bool = True, secret_file: str | None = None,
                          forks: DeviceForks | None = None) -> AsyncIterator[ClusterEngine]:
    """The master engine with every worker joined; with `spawn_workers`, ranks 1..N-1 (and the
    attention nodes) run here, in processes `forks` forked early while it has them, and are stopped on
    exit. Raises PlanError / CheckpointError before any device runs."""
    threads = threads_per_process(settings.world_size) if spawn_workers else torch.get_num_threads()
    set_threads(threads)
    if spawn_workers:  # `serve` and `worker` poll as their --poll-us and --poll-yield say
        set_poll_us(*poll_per_process(settings))
    engine = ClusterEngine(settings)
    try:
        port = await engine.start()
    except OSError as e:
        await engine.aclose()
        raise StartupError(f"cannot listen for workers on {settings.host}:{settings.port}: {e.strerror or e}; "
                           "choose another worker port") from e
    launch = forks.launch if forks is not None else start_process
    children = [_spawn_worker(r, port, settings, threads, launch) for r in range(1, settings.world_size)] \
        if spawn_workers else []
    nodes = [_spawn_attention_node(k, port, settings, 1, launch) for k in range(settings.attention_nodes)] \
        if spawn_workers else []
    spawned = [(f"worker rank {rank}", child) for rank, child in enumerate(children, start=1)] + \
        [(f"attention node {node}", child) for node, child in enumerate(nodes)]
    for name, child in spawned:
        if announce:
            print(f"edge-llm: {name} pid {child.pid}", flush=True)
    children += nodes
    hint = _restart_hint(settings, port, secret_file)
    if announce and children:
        print(f"edge-llm: a worker that dies is planned around; restart one with: {hint.format(rank='R')}",
              flush=True)
    reaper = asyncio.create_task(_reap(spawned, hint), name="reaper")
    try:
        await _wait_ready(engine, ready_timeout, bool(nodes), spawned)
        yield engine
    finally:
        reaper.cancel()
        await asyncio.gather(reaper, return_exceptions=True)
        await engine.aclose()
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


async def _reap(spawned: list[tuple[str, Device]], hint: str) -> None:
    """Collect a spawned device that exits (no zombie) and say so once, with how to restart it."""
    reported: set[int] = set()
    while True:
        await asyncio.sleep(0.5)
        for name, child in spawned:
            if child.pid not in reported and child.poll() is not None:
                reported.add(child.pid)
                rank = name.rsplit(" ", 1)[-1]
                print(f"edge-llm: {name} (pid {child.pid}) exited with status {child.returncode}; "
                      + (f"restart it with: {hint.format(rank=rank)}" if name.startswith("worker") else
                         "offload stays off until it is back"), flush=True)


def _restart_hint(settings: MasterSettings, port: int, secret_file: str | None) -> str:
    """The command that restarts a worker of this emulated cluster by hand (README: Losing a device)."""
    secret = f"--secret-file {secret_file}" if secret_file else "(the cluster secret in $EDGE_LLM_SECRET)"
    return f"edge-llm worker --model {settings.model} --rank {{rank}} --master 127.0.0.1:{port} {secret}"


async def run_master(settings: MasterSettings, http: HttpSettings, spawn_workers: bool,
                     secret_file: str | None = None, forks: DeviceForks | None = None) -> None:
    """Serve until SIGINT/SIGTERM; with `spawn_workers`, start and stop ranks 1..N-1 locally."""
    listener = _http_listener(http)
    try:
        async with running_cluster(settings, spawn_workers, http.ready_timeout,
                                   secret_file=secret_file, forks=forks) as engine:
            stop = _stop_on_signal()  # before the serving line (_stop_on_signal)
            runner = await _serve_http(engine, http, listener)
            try:
                await stop.wait()
                await _drain(runner, http.drain_timeout)
            finally:
                await runner.cleanup()
    finally:
        listener.close()


async def _until_done_or_signalled(main: Coroutine[None, None, None]) -> None:
    """Run a device's main loop until it ends (its error propagates to the CLI) or a signal stops it."""
    task = asyncio.create_task(main)
    stopper = asyncio.create_task(_stop_on_signal().wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # PlanRefused / NodeRefused
    finally:
        for t in (task, stopper):
            t.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)


async def run_worker(settings: WorkerSettings, threads: int) -> None:
    set_threads(threads)
    await _until_done_or_signalled(Worker(settings).run())


async def run_attention_node(settings: AttentionNodeSettings, threads: int) -> None:
    set_threads(threads)
    await _until_done_or_signalled(AttentionNode(settings).run())


def link_from_args(latency_ms: float, bandwidth_mbps: float) -> LinkSpec | None:
    link = LinkSpec(latency_ms=latency_ms, bandwidth_mbps=bandwidth_mbps)
    return link if link.active else None
