"""Staying joined: a device (compute worker or attention node) joins the master, serves until the
link drops, and joins again, so a restarted master or device heals without operator action."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from transport.errors import AuthError, ChannelClosed, TransportError
from transport.tcp import TcpChannel

log = logging.getLogger("edge_llm.rejoin")
RETRY_S = 0.5


async def stay_joined(join: Callable[[], Awaitable[TcpChannel]], serve: Callable[[TcpChannel], Awaitable[None]],
                      who: str) -> None:
    """Forever: join (retrying while the master is unreachable), serve, rejoin when the link drops.

    Any other error from `join` (a refused plan) ends it and reaches the caller.
    """
    while True:
        try:
            ch = await join()
        except (OSError, TimeoutError, AuthError, TransportError) as e:
            log.info("%s: master not reachable (%s); retrying", who, e)
            await asyncio.sleep(RETRY_S)
            continue
        try:
            await serve(ch)
        except ChannelClosed as e:
            log.warning("%s lost the master: %s; rejoining", who, e)
        finally:
            await ch.aclose()
