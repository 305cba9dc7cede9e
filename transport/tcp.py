"""Authenticated channels over asyncio TCP: frames, HMAC handshake, per-tag inbox, link emulation."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from transport.auth import client_handshake, server_handshake
from transport.channel import Message, TaggedInbox
from transport.codec import decode, encode
from transport.errors import AuthError, ChannelClosed, FrameError, TransportError
from transport.frames import DEFAULT_MAX_FRAME, HANDSHAKE_MAX_FRAME, FrameParser, frame, header
from transport.link import DelayedWriter, LinkSpec, Uplink

log = logging.getLogger("edge_llm.transport")
HANDSHAKE_TIMEOUT = 5.0


class _FrameProtocol(asyncio.Protocol):
    """Bytes -> frames -> messages. Until authenticated, frames go to the handshake queue only."""

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self.parser = FrameParser(self._on_frame, HANDSHAKE_MAX_FRAME)
        self.inbox = TaggedInbox()
        self.handshake: asyncio.Queue[Message | None] = asyncio.Queue()
        self.authenticated = False
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.bytes_received = 0
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        try:
            self.parser.feed(data)
        except FrameError as e:
            self.drop(f"bad frame: {e}")

    def _on_frame(self, body: bytes) -> None:
        msg = decode(body)  # FrameError propagates to data_received, which drops the peer
        if self.authenticated:
            self.inbox.deliver(msg)
        else:
            self.handshake.put_nowait(msg)

    def mark_authenticated(self) -> None:
        self.authenticated = True
        self.parser.max_frame = self.max_frame
        while not self.handshake.empty():  # frames that raced ahead of the switch keep their order
            msg = self.handshake.get_nowait()
            if msg is not None:
                self.inbox.deliver(msg)

    def drop(self, reason: str) -> None:
        log.warning("dropping peer %s: %s", self.peer, reason)
        self.inbox.close(reason)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inbox.close(f"connection lost ({exc})" if exc else "connection closed by peer")
        self.handshake.put_nowait(None)
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def next_handshake(self) -> Message:
        msg = await self.handshake.get()
        if msg is None:
            raise AuthError("connection closed during the handshake")
        return msg

    def send_now(self, msg: Message) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ChannelClosed(f"link to {self.peer} is closed")
        self.transport.write(frame(encode(msg)))


class TcpChannel:
    """An authenticated link to one peer; `send` keeps order, `recv` waits per tag with a timeout."""

    def __init__(self, proto: _FrameProtocol, link: LinkSpec | None = None, uplink: Uplink | None = None):
        self._proto = proto
        self.peer = proto.peer
        active = link is not None and link.active
        self._delayed = DelayedWriter(self._write, link, uplink=uplink) if active else None
        self.bytes_sent = 0

    def _write(self, data: bytes) -> None:
        transport = self._proto.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def send(self, msg: Message) -> None:
        """Raises ChannelClosed if the peer is gone."""
        if self._proto.inbox.closed_reason is not None:
            raise ChannelClosed(f"link to {self.peer} closed: {self._proto.inbox.closed_reason}")
        body = encode(msg)
        self.bytes_sent += len(body) + 4
        if self._delayed is not None:
            self._delayed.submit(frame(body))
            return
        transport = self._proto.transport
        if transport is not None and not transport.is_closing():
            transport.writelines((header(body), body))  # one writev, no concatenation copy
        if not self._proto._writable.is_set():
            await self._proto._writable.wait()

    async def recv(self, tag: str, timeout: float) -> Message:
        """Raises CollectiveTimeout or ChannelClosed; the caller decides what fails."""
        return await self._proto.inbox.get(tag, timeout, self.peer)

    @property
    def local_host(self) -> str:
        """The address this end of the link has: where a peer on the same network can reach us."""
        transport = self._proto.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        return sockname[0] if sockname else "127.0.0.1"

    @property
    def bytes_received(self) -> int:
        return self._proto.bytes_received

    @property
    def closed(self) -> bool:
        return self._proto.inbox.closed_reason is not None

    async def aclose(self) -> None:
        if self._delayed is not None:
            await self._delayed.aclose()
        self._proto.inbox.close("closed locally")
        if self._proto.transport is not None:
            self._proto.transport.close()


async def connect(host: str, port: int, secret: bytes, *, link: LinkSpec | None = None,
                  uplink: Uplink | None = None, timeout: float = 10.0,
                  max_frame: int = DEFAULT_MAX_FRAME) -> TcpChannel:
    """Open and authenticate a channel; raises OSError, TimeoutError or AuthError to the caller."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, proto = await loop.create_connection(lambda: _FrameProtocol(max_frame), host, port)
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            await client_handshake(proto.send_now, proto.next_handshake, secret)
    except (AuthError, TimeoutError, TransportError) as e:
        proto.drop(f"handshake failed: {e}")
        raise AuthError(f"cannot authenticate with {host}:{port}: {e}") from e
    proto.mark_authenticated()
    return TcpChannel(proto, link, uplink)


class ChannelServer:
    """Accepts peers, authenticates each, and hands good channels to `on_channel`. Owns its tasks."""

    def __init__(self, secret: bytes, on_channel: Callable[[TcpChannel], Awaitable[None]],
                 link: LinkSpec | None = None, max_frame: int = DEFAULT_MAX_FRAME,
                 uplink: Uplink | None = None):
        self._secret, self._on_channel, self._link = secret, on_channel, link
        self._uplink = uplink
        self._max_frame = max_frame
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.refused = 0

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    def _protocol(self) -> _FrameProtocol:
        proto = _FrameProtocol(self._max_frame)
        task = asyncio.get_running_loop().create_task(self._admit(proto))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return proto

    async def _admit(self, proto: _FrameProtocol) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await server_handshake(proto.send_now, proto.next_handshake, self._secret)
        except (AuthError, TimeoutError, TransportError) as e:
            self.refused += 1
            proto.drop(f"authentication failed: {e}")
            return
        proto.mark_authenticated()
        await self._on_channel(TcpChannel(proto, self._link, self._uplink))

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
