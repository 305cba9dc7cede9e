"""A data link's receive side: one read takes a frame's header and its payload together.

Why: an all-reduce frame is a 16-byte header and a few kilobytes of floats, sent in one write;
reading the header and then the payload cost two recv calls, and CPython's socket with a timeout
polls before each of them: four system calls for a frame that one read takes whole (with the
Python that parsed each header, a 2-rank all-reduce of 576 floats took 2.3-2.9x the same bytes on
bare sockets when polling, 1.5x when not: scripts/bench_dataplane.py). Here bytes go through a
buffer: a read asks for everything the kernel holds, up to the buffer's size, and later reads of
the same frame (and of the next, when it came along) are copies. Payloads of the buffer's size or
more are read straight into their destination. Every read first tries the non-blocking descriptor
(the socket has a timeout, so it is non-blocking underneath) and sleeps in the socket's own timed
recv only when nothing is there.
"""

from __future__ import annotations

import os
import socket
import time

BUFFER_BYTES = 64 << 10


class Inbox:
    """Buffered reads of one socket's byte stream; the caller owns the socket and maps errors.

    `read` returns how many bytes it placed in the view (0 only at end of stream) and raises
    TimeoutError (nothing came within the socket's timeout) or OSError, as socket.recv_into does.
    """

    def __init__(self, size: int = BUFFER_BYTES):
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # buffered bytes not yet handed out: _buf[_start:_end]

    def take(self, view: memoryview) -> int:
        """Copies what the buffer holds, up to len(view), into view; returns how much."""
        n = min(len(view), self._end - self._start)
        if n:
            view[:n] = self._view[self._start:self._start + n]
            self._start += n
        return n

    def take_frame(self, sock: socket.socket, header: bytes, view: memoryview, poll_seconds: float,
                   yield_cpu: bool = False) -> bool:
        """If the stream's next bytes are `header` and then len(view) more: those copied into view,
        all of them consumed, True. Reads once if nothing is buffered; False consumes nothing (the
        caller parses the frame the long way: another kind, a stale one, or not all here yet)."""
        if self._start == self._end:
            self._fill(sock, poll_seconds, yield_cpu)
        begin, end = self._start + len(header), self._start + len(header) + len(view)
        if end > self._end or self._view[self._start:begin] != header:
            return False
        view[:] = self._view[begin:end]
        self._start = end
        return True

    def read(self, sock: socket.socket, view: memoryview, poll_seconds: float, yield_cpu: bool = False) -> int:
        """At least one byte into `view` (buffered ones first); 0 at end of stream."""
        n = self.take(view)
        if n:
            return n
        if len(view) >= len(self._buf):
            return _read_some(sock, view, poll_seconds, yield_cpu)
        self._fill(sock, poll_seconds, yield_cpu)
        return self.take(view)

    def _fill(self, sock: socket.socket, poll_seconds: float, yield_cpu: bool) -> None:
        """The buffer, empty, refilled by one read (nothing at end of stream)."""
        self._start, self._end = 0, _read_some(sock, self._view, poll_seconds, yield_cpu)


def _read_some(sock: socket.socket, target: memoryview, poll_seconds: float, yield_cpu: bool) -> int:
    """Bytes read into target: non-blocking tries for up to `poll_seconds` (one try when 0), then
    the socket's timed recv. Polling burns the core meanwhile, unless `yield_cpu` gives it to any
    other runnable process between tries (see fastpath.set_poll_us)."""
    fd, deadline = sock.fileno(), 0.0
    while True:
        try:
            return os.readv(fd, [target])
        except BlockingIOError:
            now = time.perf_counter()
            deadline = deadline or now + poll_seconds
            if now >= deadline:
                return sock.recv_into(target)
            if yield_cpu:
                os.sched_yield()
