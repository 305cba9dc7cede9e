"""A full mesh of authenticated channels among N ranks (rank r dials every lower rank)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

from transport.errors import AuthError, FrameError
from transport.link import LinkSpec, Uplink
from transport.tcp import ChannelServer, TcpChannel, connect

Address = tuple[str, int]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the OS says are free now (bound then released): addresses for a loopback mesh in tests
    and benchmarks, where another process taking one in between is not a concern."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((host, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Mesh:
    """This rank's channels to every other rank, and the server that accepted the higher ranks."""

    rank: int
    world_size: int
    channels: dict[int, TcpChannel] = field(default_factory=dict)
    server: ChannelServer | None = None

    def bytes_sent(self) -> int:
        return sum(ch.bytes_sent for ch in self.channels.values())

    async def aclose(self) -> None:
        for ch in list(self.channels.values()):
            await ch.aclose()
        if self.server is not None:
            await self.server.aclose()


async def _dial(address: Address, secret: bytes, link: LinkSpec | None, uplink: Uplink,
                deadline: float) -> TcpChannel:
    """Connect, retrying while the peer is not listening yet; AuthError is final."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await connect(*address, secret, link=link, uplink=uplink,
                                 timeout=max(0.1, deadline - loop.time()))
        except (OSError, TimeoutError):
            if loop.time() > deadline:
                raise TimeoutError(f"rank at {address[0]}:{address[1]} did not come up") from None
            await asyncio.sleep(0.05)


async def build_mesh(rank: int, addresses: list[Address], secret: bytes, *,
                     link: LinkSpec | None = None, timeout: float = 30.0) -> Mesh:
    """Listen on addresses[rank], dial the lower ranks, accept the higher ones; all within `timeout`."""
    world = len(addresses)
    mesh = Mesh(rank, world)
    accepted: asyncio.Queue[TcpChannel] = asyncio.Queue()

    async def on_channel(ch: TcpChannel) -> None:
        await accepted.put(ch)

    uplink = Uplink()  # all of this rank's links share its emulated bandwidth
    mesh.server = ChannelServer(secret, on_channel, link, uplink=uplink)
    await mesh.server.start(*addresses[rank])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        for peer in range(rank):
            ch = await _dial(addresses[peer], secret, link, uplink, deadline)
            await ch.send({"t": "iam", "rank": rank})
            mesh.channels[peer] = ch
        async with asyncio.timeout(max(0.1, deadline - loop.time())):
            while len(mesh.channels) < world - 1:
                ch = await accepted.get()
                peer = (await ch.recv("iam", timeout))["rank"]
                if not isinstance(peer, int) or not rank < peer < world or peer in mesh.channels:
                    raise FrameError(f"peer {ch.peer} claimed an invalid rank {peer!r}")
                mesh.channels[peer] = ch
    except (TimeoutError, AuthError, FrameError):
        await mesh.aclose()
        raise
    return mesh
