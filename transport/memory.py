"""In-memory channels with the same interface as TCP ones, for fast unit tests."""

from __future__ import annotations

from transport.channel import Message, TaggedInbox
from transport.codec import decode, encode
from transport.errors import ChannelClosed


class MemoryChannel:
    """One end of an in-process link. Messages go through the codec, so they are wire-faithful."""

    def __init__(self, peer: str):
        self.peer = peer
        self.inbox = TaggedInbox()
        self.other: MemoryChannel | None = None
        self.bytes_sent = 0

    async def send(self, msg: Message) -> None:
        if self.other is None or self.inbox.closed_reason is not None:
            raise ChannelClosed(f"link to {self.peer} closed")
        body = encode(msg)
        self.bytes_sent += len(body) + 4
        self.other.inbox.deliver(decode(body))

    async def recv(self, tag: str, timeout: float) -> Message:
        return await self.inbox.get(tag, timeout, self.peer)

    async def aclose(self) -> None:
        self.inbox.close("closed locally")
        if self.other is not None:
            self.other.inbox.close("closed by peer")


def memory_pair(a: str = "a", b: str = "b") -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected ends: what one sends, the other receives."""
    left, right = MemoryChannel(peer=b), MemoryChannel(peer=a)
    left.other, right.other = right, left
    return left, right


def memory_mesh(world_size: int) -> list[dict[int, MemoryChannel]]:
    """Full mesh for `world_size` ranks: result[r][q] is rank r's channel to rank q."""
    mesh: list[dict[int, MemoryChannel]] = [{} for _ in range(world_size)]
    for r in range(world_size):
        for q in range(r + 1, world_size):
            mesh[r][q], mesh[q][r] = memory_pair(f"rank{r}", f"rank{q}")
    return mesh
