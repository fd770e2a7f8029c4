"""The connections under every request: the session the client makes, its keep-alive, and
the guard that leaves every re-send to the SDK's retry table (`_retry`).

aiohttp sends an idempotent request (a GET) once more by itself when a reused
connection turns out to be lost. That hidden attempt doubles what the server sees and
what the retry table allows (`max_retries=0` reached the server twice), so `no_resend`,
a client middleware on every request, turns the failure aiohttp would have re-sent into
one aiohttp does not re-send; the retry table then decides as for any lost connection.
Requests aiohttp never re-sends (a POST) go without it (`middlewares_for`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import aiohttp

from ._errors import DeepModeError

#: Seconds an idle pooled connection is kept for reuse. Servers close idle connections
#: too (uvicorn after 5 s, gunicorn after 2 s, some proxies after 1 s); a request
#: written onto a connection the server is closing at that moment fails after it left,
#: and a paid call cannot be sent again then (the server may have read it). Letting go
#: of a connection well before any common server would keeps that race from happening,
#: at the cost of a new connection after half a second of quiet; a busy client keeps
#: reusing its connections.
KEEPALIVE_SECONDS: Final = 0.5


class NotResent(aiohttp.ClientConnectionError):
    """A lost connection that aiohttp would have re-sent the request on by itself;
    `original` is aiohttp's own error, which the transport reports instead."""

    def __init__(self, original: aiohttp.ClientConnectionError) -> None:
        super().__init__(str(original))
        self.original = original


async def no_resend(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: a lost connection raises `NotResent`, never a second send."""
    try:
        return await handler(request)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
        raise  # never re-sent by aiohttp, and `_retry` reads them as "not sent"
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        raise NotResent(exc) from None


#: Every request's middlewares: passed per request, so that a session the user passed
#: in gets them too (they take the place of that session's own middlewares).
MIDDLEWARES: Final = (no_resend,)
#: The methods aiohttp re-sends by itself (its `IDEMPOTENT_METHODS`). Other requests get
#: no middleware at all, which still replaces the session's: `no_resend` would change
#: nothing for them, and its two extra coroutines cost CPU on every request.
_RESENT_BY_AIOHTTP: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def middlewares_for(method: str) -> tuple[aiohttp.ClientMiddlewareType, ...]:
    """The middlewares of a request with `method`."""
    return MIDDLEWARES if method in _RESENT_BY_AIOHTTP else ()


def new_session(max_connections: int) -> aiohttp.ClientSession:
    """The session a client creates for itself (inside the running loop)."""
    connector = aiohttp.TCPConnector(
        limit=max_connections, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),  # a stateless API; no cookies to leak
    )


class Pool:
    """The session (and with it the connection pool) of a client and of every client
    derived from it with `with_options`: created lazily, inside the running loop."""

    def __init__(self, max_connections: int, session: aiohttp.ClientSession | None) -> None:
        self._max_connections = max_connections
        self._session = session
        self._owns_session = session is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        # The tasks of calls in flight on any client of the pool, and those that
        # `aclose` cancelled.
        self.calls: set[asyncio.Task[Any]] = set()
        self.closed_calls: set[asyncio.Task[Any]] = set()

    def get(self) -> aiohttp.ClientSession:
        """The session, created on first use; only in the loop it was created in."""
        if self.closed:
            raise DeepModeError("This client is closed; create a new one to make more calls")
        loop = asyncio.get_running_loop()
        if self._session is None:
            self._session = new_session(self._max_connections)
            self._loop = loop
        elif self._owns_session and self._loop is not loop:
            raise DeepModeError(
                "This AsyncClient belongs to the event loop it was first used in; "
                "create one client per event loop (or use the blocking Client)"
            )
        return self._session

    async def aclose(self) -> None:
        """End the calls in flight on every client of the pool, and close the session if
        the pool created it; a session passed in stays open."""
        self.closed = True
        # Closing the session alone would leave a call reading a body waiting forever:
        # aiohttp drops the reader's wake-up and its read timeout with the connection.
        for task in self.calls:
            self.closed_calls.add(task)
            task.cancel()
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    def forget(self) -> aiohttp.ClientSession | None:
        """Let go of the session without closing it (after a fork its loop is not ours);
        the caller keeps it referenced, as collecting it would warn about it."""
        session = self._session
        if self._owns_session:
            self._session = None
            self._loop = None
        return session
