"""`python -m deepmode_async.testing`: run the mock DeepMode API until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from .._mock_options import add_mock_options
from ._mock import MockDeepMode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deepmode_async.testing",
        description="Serve the mock DeepMode API.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_mock_options(parser)
    run(parser.parse_args(argv))


def run(options: argparse.Namespace) -> None:
    """Serve a mock made from `add_mock_options`' options until interrupted."""
    mock = MockDeepMode(
        api_key=options.api_key,
        balance=options.balance,
        training_delay=options.training_delay,
        latency=options.latency,
        image_size=options.image_size,
        host=options.host,
        port=options.port,
        blob_port=options.blob_port,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(mock))


async def serve(mock: MockDeepMode) -> None:
    """Serve until SIGINT or SIGTERM, after printing where and with which key."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with mock:
        print(f"DEEPMODE_BASE_URL={mock.base_url}")
        print(f"DEEPMODE_API_KEY={mock.api_key}")
        print(f"# images are served from {mock.blob_base_url}; Ctrl+C stops", flush=True)
        await stop.wait()
    print("mock stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
