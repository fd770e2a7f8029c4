"""The hub served from an app: as an aiohttp sub-application, or as a plain ASGI app.

Both take a delivery's token and body and hand them to `receive` (the hub's), which
answers with an HTTP status and a detail; they know nothing else of the hub.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias

if TYPE_CHECKING:
    from aiohttp import web

#: Takes one delivery (token, body) and answers (status, detail).
Receive: TypeAlias = Callable[[str, bytes], Awaitable[tuple[int, str]]]

Scope: TypeAlias = MutableMapping[str, Any]
AsgiReceive: TypeAlias = Callable[[], Awaitable[MutableMapping[str, Any]]]
AsgiSend: TypeAlias = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp: TypeAlias = Callable[[Scope, AsgiReceive, AsgiSend], Awaitable[None]]

_POST_ONLY: Final = "callbacks are delivered with POST"


def aiohttp_app(receive: Receive, max_body_size: int) -> web.Application:
    """An aiohttp application passing POST {prefix}/{token} to `receive`."""
    from aiohttp import web

    async def deliver(request: web.Request) -> web.Response:
        try:
            body = await _read_at_most(request.content.iter_chunked(64 * 1024), max_body_size)
        except web.RequestPayloadError as exc:  # e.g. a Content-Encoding it does not have
            return web.json_response({"detail": f"Malformed body: {exc}"}, status=400)
        status, detail = await receive(request.match_info["token"], body)
        return web.json_response({"detail": detail}, status=status)

    async def refuse(request: web.Request) -> web.Response:
        detail = {"detail": _POST_ONLY}
        return web.json_response(detail, status=405, headers={"Allow": "POST"})

    app = web.Application()
    for path in ("/{token}", "/{token}/"):  # with a slash a proxy added (asgi_app: any)
        app.router.add_post(path, deliver)
        app.router.add_route("*", path, refuse)
    return app


class AsgiHub:
    """An ASGI 3 application passing POST {prefix}/{token} to `receive`."""

    def __init__(self, receive: Receive, max_body_size: int) -> None:
        self._receive = receive
        self._max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: AsgiReceive, send: AsgiSend) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: closing without accepting refuses them
        if scope["method"] != "POST":
            await _respond(send, 405, _POST_ONLY, allow=True)
            return
        # Mounted, the app sees its prefix in `root_path`, and in `path` too or not
        # depending on the framework and its version; behind a proxy the path may have
        # more in front. The token (the secret) is the last segment whatever comes before.
        token = str(scope["path"]).rstrip("/").rpartition("/")[2]

        disconnected = False

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True  # a cut-off body is not a delivery to judge
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        body = await _read_at_most(chunks(), self._max_body_size)
        if not disconnected:
            status, detail = await self._receive(token, body)
            await _respond(send, status, detail)


async def _read_at_most(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The body, cut at one byte more than `limit` when longer: enough to refuse it
    without reading (and holding) the rest."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            return bytes(body[: limit + 1])
    return bytes(body)


async def _respond(send: AsgiSend, status: int, detail: str, *, allow: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if allow:
        headers.append((b"allow", b"POST"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: AsgiReceive, send: AsgiSend) -> None:
    """Served on its own (`uvicorn module:app`), the hub has nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
