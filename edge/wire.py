"""Typed messages on msgpack channels: a frozen dataclass per message, sent as the map of its
fields plus the channel tag `t` (and `op` for commands that share a tag), and checked field by
field when it arrives, so a malformed message from a peer is a FrameError that names the field,
never a KeyError later. The messages themselves are in edge/messages.py."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
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
        values = {}
        for name, required, fits, hint in _schema(cls):
            if name not in raw:
                if required:
                    raise FrameError(f"{cls.__name__} message without {name!r}")
                continue
            value = raw[name]
            if not fits(value):
                raise FrameError(f"{cls.__name__} message: {name}={value!r:.60} is not {hint}")
            values[name] = value
        return cls(**values)


Check = Callable[[Any], bool]


@cache
def _schema(cls: type) -> list[tuple[str, bool, Check, Any]]:
    """Per field of a message class: its name, whether it must be there, its check and its annotation.

    Why built once: resolving the annotations and walking typing's origins on every message took
    15 us of a worker's 17 us to take a decode step's command (scratch timing), on the path from
    rank 0's token to the worker's forward."""
    hints = typing.get_type_hints(cls)
    return [(f.name, f.default is MISSING and f.default_factory is MISSING, _checker(hints[f.name]),
             hints[f.name]) for f in fields(cls)]


@cache
def _checker(hint: Any) -> Check:
    """Whether a decoded msgpack value matches the annotation `hint` (ints pass as floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_checker(a) for a in args]
        return lambda value: any(fits(value) for fits in options)
    if hint is type(None):
        return lambda value: value is None
    if hint is Any:
        return lambda value: True
    if hint is float:
        return lambda value: isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return lambda value: isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        item = _checker(args[0]) if args else None
        return lambda value: isinstance(value, list) and (item is None or all(map(item, value)))
    if origin is dict:
        key, val = (_checker(args[0]), _checker(args[1])) if args else (None, None)
        return lambda value: isinstance(value, dict) and (key is None or all(
            key(k) and val(v) for k, v in value.items()))
    kind = origin or hint
    return lambda value: isinstance(value, kind)


M = TypeVar("M", bound=Message)


async def send(ch: Channel, msg: Message) -> None:
    await ch.send(msg.wire())


async def receive(ch: Channel, kind: type[M], timeout: float) -> M:
    """The next message of `kind` on its tag; FrameError when it is malformed."""
    return kind.from_wire(await ch.recv(kind.TAG, timeout))
