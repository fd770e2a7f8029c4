"""Callback tokens that check themselves: any process holding the hub's key can tell a
token it issued (its kind and expiry included) from a guess, without a lookup.

A token is 32 bytes in URL-safe base64 (43 characters, as before): the kind, the expiry
in milliseconds, 72 random bits, and a 128-bit MAC over those under a key that every
process sharing the store shares (`Store.secret`): keyed BLAKE2b (RFC 7693's MAC mode,
a fifth of HMAC-SHA256's time, on every expect and every delivery). Forging
one means guessing the MAC; telling two apart needs no more than the random part.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import Final, NamedTuple

from ._parsers import CallbackKind

KINDS: Final[tuple[CallbackKind, ...]] = ("model", "generation", "upscale")
TOKEN_LENGTH: Final = 43
#: The latest expiry a token carries (the end of year 9999): a longer ttl means "never".
LATEST: Final = 253402300799.0
_PAYLOAD: Final = 16  # kind (1) + expiry in ms (6) + random (9)
_MAC: Final = 16


class TokenInfo(NamedTuple):  # a tuple: made on every expect and delivery
    """What a genuine token says about itself."""

    kind: CallbackKind
    expires_at: float  # seconds since the epoch


class Held(NamedTuple):
    """What the expectation of a token held by this process says, and whether it is done.
    Its token is genuine: this process issued or checked it."""

    info: TokenInfo
    done: bool


class Signer:
    """Issues and checks tokens under one key."""

    def __init__(self, key: bytes) -> None:
        # Keyed once, copied for each MAC: keying is most of BLAKE2b's cost on 16 bytes.
        if len(key) > 64:  # BLAKE2b's longest key (the stores' secrets are 32 bytes)
            key = hashlib.blake2b(key).digest()
        self._keyed = hashlib.blake2b(key=key, digest_size=_MAC)

    def __repr__(self) -> str:
        return "<Signer>"  # the key stays out

    def issue(self, kind: CallbackKind, expires_at: float) -> str:
        """A new token for a callback of `kind` that expires at `expires_at`."""
        millis = min(int(expires_at * 1000), 2**48 - 1)
        payload = (
            KINDS.index(kind).to_bytes(1, "big")
            + millis.to_bytes(6, "big")
            + os.urandom(9)  # what `secrets.token_bytes` returns, one call fewer
        )
        raw = payload + self._mac(payload)
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def read(self, token: str) -> TokenInfo | None:
        """What `token` says, or None when this key did not issue it."""
        if len(token) != TOKEN_LENGTH or not token.isascii():
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=")
        except (binascii.Error, ValueError):
            return None
        if base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
            return None  # a non-canonical spelling of the same bytes
        payload, mac = raw[:_PAYLOAD], raw[_PAYLOAD:]
        if not hmac.compare_digest(mac, self._mac(payload)) or payload[0] >= len(KINDS):
            return None
        return TokenInfo(KINDS[payload[0]], int.from_bytes(payload[1:7], "big") / 1000)

    def _mac(self, payload: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(payload)
        return mac.digest()
