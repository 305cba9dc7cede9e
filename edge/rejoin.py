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
MASTER_GONE_S = 300.0  # a device whose master stays unreachable this long gives up (--master-timeout)


class StopJoining(Exception):
    """The device cannot take part: the master does not share its secret, or it stayed unreachable
    for the stated time. Reported in one line; the process exits with status 2."""


async def stay_joined(join: Callable[[], Awaitable[TcpChannel]], serve: Callable[[TcpChannel], Awaitable[None]],
                      who: str, give_up_after: float = MASTER_GONE_S) -> None:
    """Join (retrying while the master is unreachable), serve, rejoin when the link drops; give up
    after `give_up_after` seconds without a master. A wrong secret (AuthError) is fatal at once.

    Any other error from `join` (a refused plan) ends it and reaches the caller.
    """
    loop = asyncio.get_running_loop()
    gone_since = loop.time()
    while True:
        try:
            ch = await join()
        except AuthError as e:
            raise StopJoining(f"{who}: the master does not accept this device ({e}); give it the cluster's "
                              "secret (--secret-file F or $EDGE_LLM_SECRET)") from e
        except (OSError, TimeoutError, TransportError) as e:
            if loop.time() - gone_since > give_up_after:
                raise StopJoining(f"{who}: the master has been unreachable for {give_up_after:.0f} s ({e}); "
                                  "exiting") from e
            log.info("%s: master not reachable (%s); retrying", who, e)
            await asyncio.sleep(RETRY_S)
            continue
        try:
            await serve(ch)
        except ChannelClosed as e:
            log.warning("%s lost the master: %s; rejoining", who, e)
        finally:
            await ch.aclose()
        gone_since = loop.time()
