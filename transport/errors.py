"""Transport-level failures, each caught where something can be done (retry, drop peer, 503)."""


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


class PeerFailed(TransportError):
    """A peer reported that it cannot finish the step; the message is the peer's reason."""
