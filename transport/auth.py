"""Mutual HMAC challenge-response with a shared cluster secret, before any other frame.

Each side proves it knows the secret by MACing both nonces under its own role label, so a
proof can be neither replayed nor reflected. Nothing else is accepted until both proofs check.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from transport.channel import Message
from transport.errors import AuthError

SECRET_ENV = "EDGE_LLM_SECRET"
NONCE_BYTES = 16
PROTOCOL_VERSION = 1

Send = Callable[[Message], None]
Receive = Callable[[], Awaitable[Message]]


def load_secret(path: str | Path | None = None) -> bytes:
    """The cluster secret from a file, else $EDGE_LLM_SECRET; raises AuthError if neither is set."""
    if path is not None:
        data = Path(path).read_bytes().strip()
    else:
        data = os.environ.get(SECRET_ENV, "").encode()
    if len(data) < 16:
        raise AuthError(f"the cluster secret must be at least 16 bytes (file or ${SECRET_ENV})")
    return data


def new_secret() -> bytes:
    return secrets.token_hex(32).encode()


def _proof(secret: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, role + first + second, hashlib.sha256).digest()


def _field(msg: Message, tag: str, key: str) -> bytes:
    value = msg.get(key)
    if msg.get("t") != tag or not isinstance(value, bytes) or len(value) > 64:
        raise AuthError(f"expected a {tag!r} handshake message, got {msg.get('t')!r}")
    return value


async def client_handshake(send: Send, receive: Receive, secret: bytes) -> None:
    """Prove ourselves to a server and check its proof; raises AuthError on any mismatch."""
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    send({"t": "hello", "v": PROTOCOL_VERSION, "nonce": client_nonce})
    challenge = await receive()
    server_nonce = _field(challenge, "challenge", "nonce")
    expected = _proof(secret, b"server", client_nonce, server_nonce)
    if not hmac.compare_digest(_field(challenge, "challenge", "proof"), expected):
        raise AuthError("the server does not know the cluster secret")
    send({"t": "auth", "proof": _proof(secret, b"client", server_nonce, client_nonce)})
    if (await receive()).get("t") != "welcome":
        raise AuthError("the server refused our proof")


async def server_handshake(send: Send, receive: Receive, secret: bytes) -> None:
    """Challenge a connecting peer; raises AuthError unless it proves it knows the secret."""
    hello = await receive()
    if hello.get("v") != PROTOCOL_VERSION:
        raise AuthError(f"protocol version {hello.get('v')!r} is not {PROTOCOL_VERSION}")
    client_nonce = _field(hello, "hello", "nonce")
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    send({"t": "challenge", "nonce": server_nonce,
          "proof": _proof(secret, b"server", client_nonce, server_nonce)})
    proof = _field(await receive(), "auth", "proof")
    if not hmac.compare_digest(proof, _proof(secret, b"client", server_nonce, client_nonce)):
        raise AuthError("wrong cluster secret")
    send({"t": "welcome"})
