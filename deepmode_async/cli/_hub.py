"""A `CallbackHub` served on this machine for as long as a command waits on it."""

from __future__ import annotations

import argparse
import contextlib
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from .._errors import CallbackTimeoutError, ValidationError
from ..callbacks import CallbackHub, is_loopback


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
    if public_url is None and not is_loopback(urlsplit(api_base_url).hostname or ""):
        raise ValidationError(
            f"the API at {api_base_url} cannot reach 127.0.0.1 on this machine: forward a "
            "public URL to a --callback-port here (a tunnel) and give it as --public-url"
        )
    if public_url is not None and port == 0:
        raise ValidationError("with --public-url, give the --callback-port it forwards to")
    if port == 0:
        port = _free_port()  # the hub's URLs must name it before it serves
    hub = CallbackHub(public_url or f"http://127.0.0.1:{port}", ttl=ttl)
    try:
        async with hub.serve(port=port):
            yield hub
    except CallbackTimeoutError as error:  # said again in the command's terms
        option = hasattr(options, "wait_timeout")  # the demo has none
        raise CallbackTimeoutError(
            _timed_out(error, option, ttl, port, public_url),
            pending=error.pending,
            refused=error.refused,
        ) from None
    finally:
        hub.close()


def _timed_out(
    error: CallbackTimeoutError, option: bool, ttl: float, port: int, public_url: str | None
) -> str:
    kind = getattr(error.pending, "kind", "the")
    limit = f"--wait-timeout ({ttl:g} s)" if option else f"{ttl:g} s"
    message = f"no {kind} callback arrived within {limit}"
    if error.refused is not None:
        return f"{message}; the last delivery to this machine was refused: {error.refused}"
    if public_url is not None:
        return (
            f"{message}, and none reached --callback-port {port} here: check that "
            f"--public-url {public_url} forwards to it from where the API runs"
        )
    longer = "; give a longer --wait-timeout" if option else ""
    return (
        f"{message}, and none reached --callback-port {port} here: the work may not "
        f"be done yet{longer}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
