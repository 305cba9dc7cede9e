"""Starting an emulated cluster's device processes: forked from the CLI process once it has imported
everything (Linux), else new interpreters running `python -m edge_llm ...`.

Why fork: a new interpreter spends about 2 s of CPU importing torch, numba and the rest before it
does anything, and an emulated cluster's devices all import on the same few cores: a tiny model on
4 devices took 7.5 s to serve on the 2-core host (2.3 s on 1 device). A process forked after the
imports starts at once, then runs the same `edge-llm worker ...` command line, in the same code, as
a device started by hand.

Fork safety: `DeviceForks` forks before the event loop and before any torch, numba or OpenMP work
(a thread team forked mid-life would leave the child waiting for threads it does not have), from
a process whose only other thread is OpenBLAS's idle pool, which re-creates itself across fork.
Each child then waits on a pipe for its command line, which exists only once the master listens
(its port is in it); it is the master's direct child (the reaper waits for it, as for a Popen) and
dies with the master (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Self

PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # prctl(2)
M_MMAP_THRESHOLD = -3  # mallopt(3)
_order_pipes: set[int] = set()  # write ends of the pipes of children still waiting: no child keeps another's


def _libc(function: str, *args: object) -> None:
    """A best-effort call into the C library (prctl, mallopt): nothing where it has no such function."""
    with contextlib.suppress(OSError, AttributeError):
        getattr(ctypes.CDLL(None, use_errno=True), function)(*args)


def die_with_parent() -> None:
    """In a device process, before it runs: SIGTERM when the cluster process dies, even by SIGKILL,
    so no device outlives its cluster (Linux; elsewhere the master-timeout ends it)."""
    _libc("prctl", PR_SET_PDEATHSIG, signal.SIGTERM)


def start_process(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`python -m edge_llm *argv` as a new interpreter in a session of its own, with `env` added."""
    return subprocess.Popen([sys.executable, "-m", "edge_llm", *argv], env=os.environ | env,
                            start_new_session=True, preexec_fn=die_with_parent)  # noqa: PLW1509 - prctl only


class ForkedDevice:
    """A child forked before the event loop, waiting for its command line; after `start`, what the
    cluster reads of a subprocess.Popen: pid, poll, returncode, wait, terminate, kill."""

    def __init__(self) -> None:
        read, write = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns from it
            os.close(write)
            _run_order(read, parent)
        os.close(read)
        _order_pipes.add(write)
        self.pid, self._orders, self.returncode = pid, write, None

    def start(self, argv: list[str], env: dict[str, str]) -> ForkedDevice:
        """Run `edge-llm *argv` in the child with `env` added to its environment."""
        self._close_orders(json.dumps({"argv": argv, "env": env}).encode())
        return self

    def cancel(self) -> None:
        """Not needed after all: the child exits (status 0) and is collected."""
        self._close_orders(b"")
        self.wait()

    def _close_orders(self, order: bytes) -> None:
        if self._orders in _order_pipes:
            _order_pipes.discard(self._orders)
            with os.fdopen(self._orders, "wb") as pipe:
                pipe.write(order)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Device = ForkedDevice | subprocess.Popen  # a spawned device process, as the cluster handles it
Launch = Callable[[list[str], dict[str, str]], Device]  # (edge-llm's argv, env added) -> the process


def _run_order(orders: int, parent: int) -> None:  # pragma: no cover - the forked child
    """The child's whole life: wait for a command line, run it as `edge-llm` would, exit with its status."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the master, which closes our pipe
        for fd in _order_pipes:  # the other children's pipes: the master's to close, not ours
            os.close(fd)
        die_with_parent()
        if os.getppid() != parent:  # the master died before prctl took
            code = 0
            return
        with os.fdopen(orders, "rb") as pipe:
            order = pipe.read()
        if not order:  # the master ended, or needed no device after all
            code = 0
            return
        code = _run_cli(**json.loads(order))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 - the child's last word, whatever ended it, then its exit
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_cli(argv: list[str], env: dict[str, str]) -> int:  # pragma: no cover - the forked child
    """`edge-llm *argv` in this process as in a new one: its own session, environment and logging;
    the malloc threshold glibc read from the environment at start is set here instead."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(env)
    if threshold := env.get("MALLOC_MMAP_THRESHOLD_"):
        _libc("mallopt", M_MMAP_THRESHOLD, int(threshold))
    _libc("prctl", PR_SET_NAME, _process_name(argv).encode())
    for handler in list(logging.root.handlers):  # the command configures its own
        logging.root.removeHandler(handler)
    sys.argv = ["edge-llm", *argv]
    from edge_llm.cli import main

    return main(argv)


def _process_name(argv: list[str]) -> str:
    """What `ps -o comm` and `top` show for a forked device (its command line stays the master's):
    'edge-llm rank 2', 'edge-llm node 0' (15 characters at most)."""
    for flag, word in (("--rank", "rank"), ("--node", "node")):
        if flag in argv[:-1]:
            return f"edge-llm {word} {argv[argv.index(flag) + 1]}"[:15]
    return "edge-llm"


class DeviceForks:
    """`count` device processes forked now (Linux only; none elsewhere), handed out by `launch`;
    those never launched exit when the context ends."""

    def __init__(self, count: int):
        if count and sys.platform == "linux":
            sys.stdout.flush()  # what is buffered is the master's to write, not every child's again
            sys.stderr.flush()
        self._ready = [ForkedDevice() for _ in range(count)] if sys.platform == "linux" else []

    def launch(self, argv: list[str], env: dict[str, str]) -> Device:
        """`edge-llm *argv` in a forked device, or a new interpreter when none is left."""
        if self._ready:
            return self._ready.pop(0).start(argv, env)
        return start_process(argv, env)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._ready:
            self._ready.pop().cancel()
