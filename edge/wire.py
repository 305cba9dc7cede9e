"""Typed messages on msgpack channels: a frozen dataclass per message, sent as the map of its
fields plus the channel tag `t` (and `op` for commands that share a tag), and checked field by
field when it arrives, so a malformed message from a peer is a FrameError that names the field,
never a KeyError later. The messages themselves are in edge/messages.py."""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, fields
from functools import cache
from typing import Any, ClassVar, Self, TypeVar

from transport.channel import Channel
from transport.errors import FrameError


@dataclass(frozen=True)
class Message:
    """Base of every control message: `TAG` names its channel queue, `OP` the command on "ctl"."""

    TAG: ClassVar[str]
    OP: ClassVar[str | None] = None

    def wire(self) -> dict[str, Any]:
        """The msgpack map: tag (and op) plus every field that is set."""
        head = {"t": self.TAG} | ({"op": self.OP} if self.OP else {})
        return head | {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Self:
        """Check and build; FrameError names the message and the field that is wrong."""
        hints, values = _hints(cls), {}
        for f in fields(cls):
            if f.name not in raw:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise FrameError(f"{cls.__name__} message without {f.name!r}")
                continue
            value = raw[f.name]
            if not _fits(value, hints[f.name]):
                raise FrameError(f"{cls.__name__} message: {f.name}={value!r:.60} is not {hints[f.name]}")
            values[f.name] = value
        return cls(**values)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a decoded msgpack value matches a field's annotation (ints pass as floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_fits(k, args[0]) and _fits(v, args[1])
                                                             for k, v in value.items()))
    return isinstance(value, origin or hint)


M = TypeVar("M", bound=Message)


async def send(ch: Channel, msg: Message) -> None:
    await ch.send(msg.wire())


async def receive(ch: Channel, kind: type[M], timeout: float) -> M:
    """The next message of `kind` on its tag; FrameError when it is malformed."""
    return kind.from_wire(await ch.recv(kind.TAG, timeout))
