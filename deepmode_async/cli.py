"""`deepmode`, the command line: the SDK's calls from a shell (also `python -m deepmode_async`).

Options mirror the Python parameter names with dashes (`--model-id`, `--num-images`).
The key and base URL come from `--api-key` / `--base-url` or the same environment
variables as `AsyncClient`. `--json` prints machine-readable output on stdout. A failure
prints one line on stderr and exits non-zero (1 for an API failure, 2 for bad
arguments, 130 when interrupted); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import attrs

from . import _validate as check
from ._client import AsyncClient
from ._errors import DeepModeError, ValidationError
from ._types import Image, Ratio
from .batch import BatchProgress, BatchResult, GenerateRequest

#: Exit codes: an API or network failure, and arguments refused before any request.
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run one command and exit with its status."""
    parser = _parser()
    options = parser.parse_args(argv)
    if options.command is None:
        parser.print_help(sys.stderr)
        sys.exit(EXIT_USAGE)
    log = logging.getLogger("deepmode_async")
    if options.debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    elif "DEEPMODE_LOG" not in os.environ:
        # Retry warnings would otherwise reach stderr through logging's last resort,
        # breaking the one-line error; DEEPMODE_LOG or --debug show them.
        log.addHandler(logging.NullHandler())
    try:
        options.run(options)
    except KeyboardInterrupt:
        if options.debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except DeepModeError as error:
        if options.debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_USAGE if isinstance(error, ValidationError) else EXIT_FAILED)
    sys.exit(0)


# ----------------------------------------------------------------------------- commands


def _balance(options: argparse.Namespace) -> None:
    balance = _run(options, lambda dm: dm.account.balance())
    _print(options, balance, f"{balance.remaining_balance} credits")


def _generate(options: argparse.Namespace) -> None:
    check.positive("--concurrency", options.concurrency)
    prompts = _prompts(options)
    requests = [
        GenerateRequest(
            model_id=options.model_id,
            prompt=prompt,
            negative_prompt=options.negative_prompt,
            num_images=options.num_images,
            upscale=options.upscale,
            ratio=options.ratio,
        )
        for prompt in prompts
    ]

    async def batch(dm: AsyncClient) -> list[BatchResult]:
        results = []
        with _progress(options, len(requests)) as report:
            async with contextlib.aclosing(
                dm.images.generate_many(
                    requests,
                    concurrency=options.concurrency,
                    download_to=options.out,
                    progress=report,
                )
            ) as stream:
                async for result in stream:
                    results.append(result)
                    if not options.json:
                        print(_describe(result), flush=True)
        return sorted(results, key=lambda result: result.index)

    results = _run(options, batch)
    if options.json:
        print(json.dumps([_jsonable(result) for result in results], default=str))
    failures = [result for result in results if not result.ok]
    if failures:
        raise _BatchFailed(f"{len(failures)} of {len(results)} requests failed")


def _download(options: argparse.Namespace) -> None:
    check.positive("--concurrency", options.concurrency)

    async def download(dm: AsyncClient) -> list[pathlib.Path]:
        images = [await dm.images.retrieve(image_id) for image_id in options.image_ids]
        return await dm.images.download(
            images, options.out, concurrency=options.concurrency, overwrite=options.overwrite
        )

    paths = _run(options, download)
    if options.json:
        print(json.dumps([str(path) for path in paths]))
    else:
        for path in paths:
            print(path)


def _mock_serve(options: argparse.Namespace) -> None:
    from .testing.__main__ import run

    run(options)


# ----------------------------------------------------------------------------- helpers


class _BatchFailed(DeepModeError):
    """Some requests of a batch failed (each was reported on its own line)."""


def _run(options: argparse.Namespace, call: Callable[[AsyncClient], Any]) -> Any:
    """Run `call` with a client made from the options, on a fresh event loop."""

    async def run() -> Any:
        async with AsyncClient(options.api_key, base_url=options.base_url) as dm:
            return await call(dm)

    return asyncio.run(run())


def _prompts(options: argparse.Namespace) -> list[str]:
    if options.prompts_file is not None:
        try:
            text = pathlib.Path(options.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValidationError(f"cannot read --prompts-file: {exc}") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValidationError("--prompts-file has no prompts (one a line)")
        return prompts
    if options.prompt is None:
        raise ValidationError("give --prompt or --prompts-file")
    if options.count < 1:
        raise ValidationError(f"--count must be at least 1, not {options.count}")
    return [options.prompt] * options.count


@contextlib.contextmanager
def _progress(
    options: argparse.Namespace, total: int
) -> Iterator[Callable[[BatchProgress], None] | None]:
    """A progress bar on a terminal (with the `cli` extra's rich), else nothing."""
    if options.json or total < 2 or not sys.stderr.isatty():
        yield None
        return
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:  # rich is in the `cli` extra; plain lines do without it
        yield None
        return
    with Progress(transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("generating", total=total)

        def report(progress: BatchProgress) -> None:
            bar.update(task, completed=progress.completed)

        yield report


def _describe(result: BatchResult) -> str:
    if result.error is not None:
        return f"[{result.index}] failed: {_one_line(result.error)}"
    assert result.generation is not None
    if result.paths is not None:
        return f"[{result.index}] " + " ".join(str(path) for path in result.paths)
    return f"[{result.index}] " + " ".join(_image_line(image) for image in result.generation.images)


def _image_line(image: Image) -> str:
    return f"{image.id} {image.image_url}"


def _jsonable(value: Any) -> Any:
    """Data classes as JSON-ready dicts (enums are strings already; the rest via str)."""
    if isinstance(value, BatchResult):
        return {
            "index": value.index,
            "prompt": value.request.prompt,
            "ok": value.ok,
            "generation": _jsonable(value.generation) if value.generation else None,
            "paths": [str(path) for path in value.paths] if value.paths is not None else None,
            "error": _one_line(value.error) if value.error is not None else None,
            "error_type": type(value.error).__name__ if value.error is not None else None,
        }
    return attrs.asdict(value, recurse=True)


def _print(options: argparse.Namespace, value: Any, text: str) -> None:
    print(json.dumps(_jsonable(value), default=str) if options.json else text)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ----------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api-key", help="API key (default: $DEEPMODE_API_KEY)")
    common.add_argument("--base-url", help="API base URL (default: $DEEPMODE_BASE_URL)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    parser = argparse.ArgumentParser(
        prog="deepmode", description="The DeepMode image API from the command line."
    )
    parser.set_defaults(command=None, debug=False)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    balance = commands.add_parser("balance", parents=[common], help="remaining credits")
    balance.set_defaults(command="balance", run=_balance)

    generate = commands.add_parser(
        "generate", parents=[common], help="generate images (one call, or a batch)"
    )
    generate.set_defaults(command="generate", run=_generate)
    generate.add_argument("--model-id", required=True)
    generate.add_argument("--prompt")
    generate.add_argument("--negative-prompt")
    generate.add_argument("--num-images", type=int, default=1, help="1-8 a call")
    generate.add_argument("--upscale", action="store_true")
    generate.add_argument("--ratio", choices=[ratio.value for ratio in Ratio], default="portrait")
    generate.add_argument("--count", type=int, default=1, help="calls with --prompt")
    generate.add_argument("--prompts-file", help="one prompt a line, one call each")
    generate.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    generate.add_argument("--out", help="download the images into this directory")

    download = commands.add_parser(
        "download", parents=[common], help="download images by id (fresh signed URLs)"
    )
    download.set_defaults(command="download", run=_download)
    download.add_argument("image_ids", nargs="+", metavar="IMAGE_ID")
    download.add_argument("--out", default=".", help="directory (default: here)")
    download.add_argument("--concurrency", type=int, default=16)
    download.add_argument("--overwrite", action="store_true")

    mock = commands.add_parser("mock", help="the embedded mock API")
    mock_commands = mock.add_subparsers(title="mock commands", metavar="COMMAND")
    serve = mock_commands.add_parser(
        "serve", help="serve the mock on 127.0.0.1; prints the base URL and the key"
    )
    serve.set_defaults(command="mock serve", run=_mock_serve, debug=False)
    add_mock_options(serve)
    return parser


def add_mock_options(parser: argparse.ArgumentParser) -> None:
    """The mock's options, for `deepmode mock serve` and `python -m deepmode_async.testing`
    (here, so that the CLI does not import the mock to build its parser)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="API port (0: any free port)")
    parser.add_argument("--blob-port", type=int, default=0, help="image host port")
    parser.add_argument("--api-key", default="mock-key", help="the key the mock accepts")
    parser.add_argument("--balance", type=int, default=10_000, help="starting credits")
    parser.add_argument("--training-delay", type=float, default=0.0, help="seconds to train")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each call takes")
    parser.add_argument("--image-size", type=int, default=None, help="bytes of each image")
