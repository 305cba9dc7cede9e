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


class FrameParser:
    """Feeds raw bytes, calls `on_frame(body)` per complete frame; checks the limit before buffering a body."""

    def __init__(self, on_frame: Callable[[bytes], None], max_frame: int = DEFAULT_MAX_FRAME):
        self.on_frame = on_frame
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None

    def feed(self, data: bytes) -> None:
        """Raises FrameTooLarge as soon as a header announces an oversize body."""
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
