"""The image host: Azure-Blob-like signed, expiring URLs that refuse API credentials."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from aiohttp import web

from ._http import CHUNK, Problem, drop_connection, misbehave_before, note_answer
from ._records import RecordedRequest

if TYPE_CHECKING:
    from ._api import Handler
    from ._mock import MockDeepMode

SAS_VERSION: Final = "2023-11-03"
_SAS_TIME: Final = "%Y-%m-%dT%H:%M:%SZ"


@functools.lru_cache(maxsize=1024)
def _sas_time(epoch_second: int) -> str:
    """Azure's SAS time format; cached because a burst of URLs shares a few seconds."""
    return time.strftime(_SAS_TIME, time.gmtime(epoch_second))


_PERCENT_ENCODE: Final = str.maketrans({":": "%3A", "+": "%2B", "/": "%2F", "=": "%3D"})


class UrlSigner:
    """Signs blob paths like an Azure SAS token and checks what comes back byte for byte.

    The query is percent-encoded as Azure does (`%3A` in times, `%2B`, `%2F` and `%3D`
    in the signature). The check is stricter than Azure's, on purpose: it compares the
    raw query string, so a client that re-encodes or decodes any of it gets a 403
    (Azure itself tolerates some of that, but not a `%2B` turned into `+`).
    """

    def __init__(self, now: Callable[[], dt.datetime], ttl: float) -> None:
        self._key = secrets.token_bytes(32)
        self._now = now
        self.ttl = ttl

    def _signature(self, path: str, start: str, expiry: str) -> str:
        message = "\n".join((path, start, expiry, "r", SAS_VERSION, "b")).encode()
        return base64.b64encode(hmac.digest(self._key, message, hashlib.sha256)).decode()

    def _query(self, start: str, expiry: str, signature: str) -> str:
        # Only these four characters in times and base64 need escaping: a translation
        # table is exact for them and many times faster than `urllib.parse.quote`.
        start, expiry, signature = (
            v.translate(_PERCENT_ENCODE) for v in (start, expiry, signature)
        )
        return f"st={start}&se={expiry}&sp=r&sv={SAS_VERSION}&sr=b&sig={signature}"

    def sign(self, path: str) -> str:
        """A signed query string for `path`, valid from now for `ttl` seconds."""
        now = int(self._now().timestamp())
        expiry = _sas_time(now + math.ceil(self.ttl))
        # Azure backdates the start time to allow for clock skew; choosing how far back
        # lets every URL carry both `%2B` and `%2F`, so re-encoding bugs never hide.
        for skew in range(300):
            start = _sas_time(now - skew)
            signature = self._signature(path, start, expiry)
            if "+" in signature and "/" in signature:
                break
        return self._query(start, expiry, signature)

    def check(self, path: str, raw_query: str) -> None:
        """Raise the image host's 403 unless `raw_query` is exactly a valid, unexpired one."""
        values = dict(item.partition("=")[::2] for item in raw_query.split("&"))
        start, expiry = unquote(values.get("st", "")), unquote(values.get("se", ""))
        expected = self._query(start, expiry, self._signature(path, start, expiry))
        if not hmac.compare_digest(raw_query.encode(), expected.encode()):
            message = "Signature did not match. String to sign used was r, " + path
            raise Problem(403, message, code="AuthenticationFailed")
        expires = dt.datetime.strptime(expiry, _SAS_TIME).replace(tzinfo=dt.UTC)
        if expires <= self._now():
            message = "Signature not valid in the specified time frame: expired at " + expiry
            raise Problem(403, message, code="AuthenticationFailed")


def azure_error(problem: Problem) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{problem.code}</Code><Message>{problem.detail}</Message></Error>"
    )
    return web.Response(status=problem.status, text=body, content_type="application/xml")


class BlobHost:
    """Serves the images the API's `image_url`s point at, on an origin of its own."""

    def __init__(self, mock: MockDeepMode) -> None:
        self.mock = mock

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware])
        app.router.add_get("/{container}/{name}", self.download, name="download")
        return app

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        record = self.mock._record(request)
        try:
            response = await self._answer(request, handler, record)
        except (asyncio.CancelledError, ConnectionError):  # the client hung up
            record.disconnected = True
            raise
        note_answer(record, request, response)
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, record: RecordedRequest
    ) -> web.StreamResponse:
        try:
            if "Authorization" in request.headers:
                message = "An Authorization header cannot be combined with a SAS token"
                raise Problem(400, message, code="InvalidAuthenticationInfo")
            if record.endpoint is None:
                raise Problem(400, "The requested URI does not represent a blob", code="InvalidUri")
            return await handler(request)
        except Problem as problem:
            return azure_error(problem)

    async def download(self, request: web.Request) -> web.StreamResponse:
        mock = self.mock
        fault = mock._take_fault("download")
        if (early := await misbehave_before(fault, request)) is not None:
            return early
        mock._signer.check(request.path, request.rel_url.raw_query_string)
        ready_at = mock._blobs.get(request.path)
        if ready_at is None or ready_at > mock.now():
            raise Problem(404, "The specified blob does not exist.", code="BlobNotFound")
        await mock._simulate_work("download")
        body = mock._image_bytes
        if fault is None or (fault.kind == "stall" and fault.after_bytes is None):
            return web.Response(body=body, content_type="image/jpeg")
        # Misbehave mid-body: a stall after some bytes, or a truncation half-way.
        cut = len(body) // 2 if fault.kind == "truncate" else min(fault.after_bytes or 0, len(body))
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:cut])
        if fault.kind == "truncate":
            drop_connection(request)
            return response
        await asyncio.sleep(fault.seconds)
        for start in range(cut, len(body), CHUNK):
            await response.write(body[start : start + CHUNK])
        await response.write_eof()
        return response
