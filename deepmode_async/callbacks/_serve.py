"""`CallbackHub.serve()`: the hub alone, on a thread and event loop of its own."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from .. import _validate as check
from .._errors import ValidationError

if TYPE_CHECKING:
    from aiohttp import web


class ServedHub:
    """A `CallbackHub` served on its own thread until `close()` (or the end of a `with`
    or `async with` block).

    `url` is the local address it listens on: the API must reach it there (a mock on
    this machine does), or through a public URL forwarded to it. Because it has a loop of
    its own, a blocking call waiting on the hub (a `Client` in a notebook cell) cannot
    starve it.
    """

    def __init__(
        self, make_app: Callable[[], web.Application], public_base_url: str, host: str, port: int
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValidationError(f"host must be a host name or address, not {check.shown(host)}")
        port = check.integer("port", port, 0, 65535)
        public = urlsplit(public_base_url)
        if port == 0 and is_loopback(public.hostname or "") and public.port:
            port = public.port  # the hub's URLs already name where it must listen
        self._listener = _bind(host, port)
        self.port: Final = self._listener.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url: Final = f"http://{shown}:{self.port}"
        self._prefix = public.path.rstrip("/")
        self._make_app = make_app
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._failure: BaseException | None = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="deepmode-hub-server", daemon=True
        )
        self._thread.start()
        started.wait()
        if self._failure is not None:
            self.close()
            raise ValidationError(f"cannot serve the hub at {self.url}: {self._failure}")

    def __repr__(self) -> str:
        return f"<ServedHub {self.url}>"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except Exception as error:  # reported to the constructor
            self._failure = error
        started.set()
        if self._failure is None:
            self._loop.run_forever()
        self._loop.run_until_complete(self._stop())
        self._loop.close()

    async def _start(self) -> None:
        from aiohttp import web  # the server side of aiohttp: only a served hub loads it

        app = self._make_app()
        if self._prefix:  # a tunnel passes the path on: serve the hub where its URLs point
            app, hub_app = web.Application(), app
            app.add_subapp(self._prefix, hub_app)
        self._runner = web.AppRunner(app, access_log=None)  # paths hold the tokens
        await self._runner.setup()
        await web.SockSite(self._runner, self._listener).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def close(self) -> None:
        """Stop serving (idempotent); deliveries after this are refused by the OS."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join()
        self._listener.close()

    def __enter__(self) -> ServedHub:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> ServedHub:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise ValidationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
