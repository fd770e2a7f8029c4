"""`python -m deepmode_async.testing`: run the mock DeepMode API until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from ._mock import MockDeepMode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deepmode_async.testing", description="Serve the mock DeepMode API."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="API port (0: any free port)")
    parser.add_argument("--blob-port", type=int, default=0, help="image host port")
    parser.add_argument("--api-key", default="mock-key", help="the key the mock accepts")
    parser.add_argument("--balance", type=int, default=10_000, help="starting credits")
    parser.add_argument("--training-delay", type=float, default=0.0, help="seconds to train")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each call takes")
    parser.add_argument("--image-size", type=int, default=None, help="bytes of each image")
    options = parser.parse_args(argv)
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
