"""The image host: Azure-Blob-like signed, expiring URLs that refuse API credentials."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ._faults import Faults
from ._http import CHUNK, Handler, Problem, drop_connection, misbehave_before, note_answer
from ._records import RecordedRequest
from ._state import MockState
from ._work import Work


def azure_error(problem: Problem) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{problem.code}</Code><Message>{problem.detail}</Message></Error>"
    )
    return web.Response(status=problem.status, text=body, content_type="application/xml")


class BlobHost:
    """Serves the images the API's `image_url`s point at, on an origin of its own."""

    def __init__(self, state: MockState, faults: Faults, work: Work) -> None:
        self.state = state
        self.faults = faults
        self.work = work

    def app(self) -> web.Application:
        """A new aiohttp application serving the images."""
        app = web.Application(middlewares=[self.middleware])
        app.router.add_get("/{container}/{name}", self.download, name="download")
        return app

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        record = self.state.record(request)
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
        state = self.state
        fault = self.faults.take("download")
        if (early := await misbehave_before(fault, request)) is not None:
            return early
        state.signer.check(request.path, request.rel_url.raw_query_string)
        if not state.blob_ready(request.path):
            raise Problem(404, "The specified blob does not exist.", code="BlobNotFound")
        await self.work.simulate("download")
        body = state.image_bytes
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
