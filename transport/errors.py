"""Transport-level failures, each caught where something can be done (retry, drop peer, 503)."""

from __future__ import annotations

from enum import StrEnum


class TransportError(Exception):
    """Base of every transport failure."""


class FrameError(TransportError):
    """A frame that is not a valid message: garbage msgpack, wrong types, bad tensor. The peer is dropped."""


class FrameTooLarge(FrameError):
    """A length prefix over the limit; checked before the body is read, so nothing is allocated."""


class AuthError(TransportError):
    """The peer failed the HMAC challenge (wrong or no secret); it never reaches the collectives."""


class ChannelClosed(TransportError):
    """The peer went away (or we closed); pending receives fail with this."""


class CollectiveTimeout(TransportError):
    """A peer did not answer within the timeout; the caller fails the request (503)."""


class CollectiveAborted(TransportError):
    """The hub gave up on the current all-reduce (another rank failed); the step is abandoned."""


class FailureCause(StrEnum):
    """Why a rank could not finish a step; the master's recovery depends on it."""

    PEER = "peer"  # a link or another rank failed (passed on around a ring)
    ATTENTION = "attention"  # an attention node failed: the request can be rebuilt on the compute ranks
    WEIGHTS = "weights"  # the rank's own weight files failed
    INTERNAL = "internal"  # a bug on that rank

    @classmethod
    def parse(cls, raw: object) -> FailureCause:
        """A cause from the wire; anything unknown counts as a peer failure."""
        try:
            return cls(raw)
        except ValueError:
            return cls.PEER


class PeerFailed(TransportError):
    """A peer reported that it cannot finish the step: the message is its reason, `cause` the kind."""

    def __init__(self, reason: str, cause: FailureCause = FailureCause.PEER):
        super().__init__(reason)
        self.cause = cause
