"""Start and stop a real `edge-llm cluster` (N processes on loopback) for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SECRET = "test-secret-" + "x" * 32


class ClusterProcess:
    """`edge-llm cluster ...` as a user starts it; parses where it listens from its stdout."""

    def __init__(self, model: Path, workers: int, tmp: Path, *extra: str, ready_timeout: float = 90):
        self.secret_file = tmp / "secret"
        self.secret_file.write_text(SECRET)
        self.log = open(tmp / f"cluster-{workers}.log", "w")
        cmd = [sys.executable, "-m", "edge_llm", "cluster", "--model", str(model), "--workers", str(workers),
               "--port", "0", "--secret-file", str(self.secret_file), *extra]
        self.model = model
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True)
        self.worker_pids: dict[int, int] = {}
        self.restart_hints: dict[int, str] = {}
        self.stdout_lines: list[str] = []  # rank -> the command the cluster printed when it died
        self.node_pids: dict[int, int] = {}
        self.url = ""
        self.worker_port = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        if not self._ready.wait(ready_timeout) or not self.url:
            self.stop()
            raise RuntimeError(f"cluster did not come up; log: {(tmp / f'cluster-{workers}.log').read_text()[-2000:]}")

    def stdout_text(self) -> str:
        return "".join(self.stdout_lines)

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            if m := re.search(r"worker rank (\d+) pid (\d+)", line):
                self.worker_pids[int(m[1])] = int(m[2])
            if m := re.search(r"worker rank (\d+) \(pid \d+\) exited .*restart it with: (.*)$", line):
                self.restart_hints[int(m[1])] = m[2].strip()
            if m := re.search(r"attention node (\d+) pid (\d+)", line):
                self.node_pids[int(m[1])] = int(m[2])
            if m := re.search(r"serving .* on (http://\S+) .*join at port (\d+)", line):
                self.url, self.worker_port = m[1], int(m[2])
                self._ready.set()
        self._ready.set()

    def start_worker(self, rank: int, model: Path | None = None, *extra: str,
                     fetch: bool = False) -> subprocess.Popen:
        """A worker device started by hand, as on a real device (it joins the master); stderr to a file.

        With `fetch` it has no checkpoint and fetches its shard files from the master.
        """
        source = [] if fetch else ["--model", str(model or self.model)]
        cmd = [sys.executable, "-m", "edge_llm", "worker", *source,
               "--rank", str(rank), "--master", f"127.0.0.1:{self.worker_port}",
               "--secret-file", str(self.secret_file), "--threads", "1", "--step-timeout", "2", *extra]
        self.worker_log = self.secret_file.parent / f"worker-{rank}.log"
        with open(self.worker_log, "w") as err:
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def start_attention_node(self, node: int) -> subprocess.Popen:
        """An attention node started by hand (`edge-llm worker --role attention`); stopped by the caller."""
        cmd = [sys.executable, "-m", "edge_llm", "worker", "--role", "attention", "--node", str(node),
               "--master", f"127.0.0.1:{self.worker_port}", "--secret-file", str(self.secret_file),
               "--threads", "1"]
        with open(self.secret_file.parent / f"node-{node}.log", "w") as err:
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def restart_hint(self, rank: int, timeout: float = 10) -> str:
        """The restart command the cluster printed for `rank` after it died."""
        deadline = time.monotonic() + timeout
        while rank not in self.restart_hints and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.restart_hints[rank]

    def kill_worker(self, rank: int) -> None:
        os.kill(self.worker_pids[rank], signal.SIGKILL)

    def kill_attention_node(self, node: int) -> None:
        os.kill(self.node_pids[node], signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM (SIGKILL to its group after 20 s); AssertionError if a device outlived it. The log
        is closed either way, so a failing check is not followed by a ResourceWarning."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            self._reader.join(timeout=5)
            self.proc.stdout.close()
            for pid in [*self.worker_pids.values(), *self.node_pids.values()]:  # none may outlive the cluster
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    continue
                raise AssertionError(f"worker pid {pid} survived the cluster's shutdown")
        finally:
            self.log.close()


async def wait_health(url: str, status: int, tries: int = 600) -> None:
    """Poll /health until it answers `status` (every 0.1 s)."""
    import asyncio

    import aiohttp

    async with aiohttp.ClientSession() as s:
        for _ in range(tries):
            try:
                async with s.get(f"{url}/health") as r:
                    if r.status == status:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url}/health never answered {status}")


async def wait_plan(url: str, ranks: list[int], tries: int = 600) -> dict:
    """Poll /health until the cluster serves the plan over `ranks` (every 0.1 s) and return its
    answer: after a device is lost the cluster re-plans without it; when it is back, with it."""
    import asyncio

    import aiohttp

    async with aiohttp.ClientSession() as s:
        for _ in range(tries):
            try:
                async with s.get(f"{url}/health") as r:
                    body = await r.json()
                    if r.status == 200 and [p["rank"] for p in body.get("plan", [])] == ranks:
                        return body
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never served the plan over {ranks}")
