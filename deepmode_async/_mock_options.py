"""The mock's command-line options, shared by `deepmode mock serve` and `python -m
deepmode_async.testing`.

Only argparse: the CLI builds its parser without loading the mock, and the mock's
entry point parses its options without loading the CLI.
"""

from __future__ import annotations

import argparse
from typing import Final

#: The key the mock accepts unless told otherwise.
MOCK_API_KEY: Final = "mock-key"


def add_mock_options(
    parser: argparse.ArgumentParser, *, port: int = 0, api_key: object = MOCK_API_KEY
) -> None:
    """Add the options of `deepmode_async.testing.__main__.run` to `parser`; `port` is
    the API port's default, `api_key` the key's (`argparse.SUPPRESS`: none, for a caller
    that takes it from elsewhere first)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=port, help="API port (0: any free port)")
    parser.add_argument("--blob-port", type=int, default=0, help="image host port")
    parser.add_argument(
        "--api-key",
        default=api_key,
        help=f"the key the mock accepts (default: {MOCK_API_KEY})",
    )
    parser.add_argument("--balance", type=int, default=10_000, help="starting credits")
    parser.add_argument("--training-delay", type=float, default=0.0, help="seconds to train")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each call takes")
    parser.add_argument("--image-size", type=int, default=None, help="bytes of each image")
