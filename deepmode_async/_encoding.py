"""Undoing a body's `Content-Encoding` ourselves, for answers read with `decompress=False`.

Downloads read the image host's bytes raw and decode them here because aiohttp does not
notice a gzip stream that ends early: a cut-off image would be saved as complete.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Final

#: What downloads advertise in `Accept-Encoding`: what `BodyDecoder` undoes.
ACCEPTED: Final = "gzip, deflate"

_IDENTITY: Final = frozenset({"", "identity"})
_GZIP: Final = frozenset({"gzip", "x-gzip"})


class BodyDecoder:
    """Decodes one body, chunk by chunk, into pieces of at most `piece` bytes (a small
    compressed body cannot expand into memory at once).

    `decode` raises `zlib.error` for bytes that are not what the encoding says;
    `complete` tells, once the body has ended, whether its encoded stream ended too.
    """

    def __init__(self, encoding: str, piece: int) -> None:
        self.encoding = encoding.strip().lower()
        self.supported = self.encoding in _IDENTITY | _GZIP | {"deflate"}
        self._piece = piece
        self._zlib: zlib._Decompress | None = None

    @property
    def complete(self) -> bool:
        return self.encoding in _IDENTITY or (self._zlib is not None and self._zlib.eof)

    def decode(self, chunk: bytes) -> Iterator[bytes]:
        if self.encoding in _IDENTITY:
            yield chunk
            return
        while chunk:
            if self._zlib is None or self._zlib.eof:
                if self._zlib is not None and self.encoding not in _GZIP:
                    raise zlib.error("data after the end of the deflate stream")
                # The first stream, or the next member of a multi-member gzip file.
                self._zlib = zlib.decompressobj(self._window_bits(chunk))
            data = self._zlib.decompress(chunk, self._piece)
            while data:
                yield data
                data = self._zlib.decompress(self._zlib.unconsumed_tail, self._piece)
            chunk = self._zlib.unused_data if self._zlib.eof else b""

    def _window_bits(self, head: bytes) -> int:
        if self.encoding in _GZIP:
            return 16 + zlib.MAX_WBITS
        # "deflate" is meant to be zlib-wrapped, but servers send raw deflate too.
        wrapped = len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
        return zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS


def decoded_prefix(body: bytes, encoding: str, limit: int) -> bytes:
    """Up to `limit` bytes of `body` decoded, or `body` as it is when that fails: for
    error pages, which are read only to be shown."""
    decoder = BodyDecoder(encoding, limit)
    if not decoder.supported:
        return body
    try:
        return next(decoder.decode(body), b"")
    except zlib.error:
        return body
