"""A `CallbackHub` served on this machine for as long as a command waits on it."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from .._errors import ValidationError
from ..callbacks import CallbackHub


def add_hub_options(parser: argparse.ArgumentParser) -> None:
    """Where the API sends callbacks to: this machine's loopback, or a tunnel to it."""
    parser.add_argument(
        "--public-url",
        help="the URL at which the API reaches --callback-port on this machine (a tunnel); "
        "not needed when the API runs on this machine (the mock)",
    )
    parser.add_argument(
        "--callback-port",
        type=int,
        default=0,
        help="the port on 127.0.0.1 receiving callbacks (default: any free port)",
    )


@contextlib.asynccontextmanager
async def local_hub(
    api_base_url: str, options: argparse.Namespace, *, ttl: float
) -> AsyncIterator[CallbackHub]:
    """Serve a hub on 127.0.0.1 (`--callback-port`); the API must reach it, directly when
    the API runs on this machine, else through `--public-url`."""
    port, public_url = options.callback_port, options.public_url
    if not 0 <= port <= 65535:
        raise ValidationError(f"--callback-port must be 0 to 65535, not {port}")
    if public_url is None and not _on_this_machine(api_base_url):
        raise ValidationError(
            f"the API at {api_base_url} cannot reach 127.0.0.1 on this machine: forward a "
            "public URL to a --callback-port here (a tunnel) and give it as --public-url"
        )
    if public_url is not None and port == 0:
        raise ValidationError("with --public-url, give the --callback-port it forwards to")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ValidationError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
        from aiohttp import web  # the server side of aiohttp: only commands that wait load it

        bound_port = listener.getsockname()[1]
        hub = CallbackHub(public_url or f"http://127.0.0.1:{bound_port}", ttl=ttl)
        app = hub.aiohttp_app()
        prefix = urlsplit(hub.public_base_url).path.rstrip("/")
        if prefix:  # a tunnel passes the path on: serve the hub where its URLs point
            app, hub_app = web.Application(), app
            app.add_subapp(prefix, hub_app)
        runner = web.AppRunner(app, access_log=None)  # paths hold the tokens: no access log
        try:
            await runner.setup()
            await web.SockSite(runner, listener).start()
            yield hub
        finally:
            await runner.cleanup()
    finally:
        listener.close()


def _on_this_machine(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
