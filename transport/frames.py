"""Length-prefixed frames: a 4-byte big-endian length, then the msgpack body."""

from __future__ import annotations

import struct
from collections.abc import Callable

from transport.errors import FrameTooLarge

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 256 * 1024 * 1024  # a 4M-element float32 tensor plus headroom
HANDSHAKE_MAX_FRAME = 4096  # an unauthenticated peer gets no more than this


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def header(body: bytes) -> bytes:
    """The length prefix alone, for writev-style sends that avoid copying the body."""
    return HEADER.pack(len(body))


class FrameParser:
    """Feeds raw bytes, calls `on_frame(body)` per complete frame; checks the limit before buffering a body."""

    def __init__(self, on_frame: Callable[[bytes], None], max_frame: int = DEFAULT_MAX_FRAME):
        self.on_frame = on_frame
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None

    def feed(self, data: bytes) -> None:
        """Raises FrameTooLarge as soon as a header announces an oversize body."""
        if not self._buf and self._need is None:
            data = self._feed_whole(data)  # the common case: whole frames, no buffering copy
            if not data:
                return
        self._buf += data
        while True:
            if self._need is None:
                if len(self._buf) < HEADER.size:
                    return
                (size,) = HEADER.unpack_from(self._buf)
                if size > self.max_frame:
                    raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
                self._need = size
                del self._buf[: HEADER.size]
            if len(self._buf) < self._need:
                return
            body = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            self._need = None
            self.on_frame(body)

    def _feed_whole(self, data: bytes) -> bytes:
        """Deliver the complete frames at the start of `data`; return the incomplete rest."""
        view, pos = memoryview(data), 0
        while len(data) - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(data, pos)
            if size > self.max_frame:
                raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
            end = pos + HEADER.size + size
            if end > len(data):
                break
            self.on_frame(view[pos + HEADER.size:end])
            pos = end
        return data[pos:]
