"""`deepmode demo`: train, wait for the callback, generate a batch, download, summarise.

Against the embedded mock (in this process, on 127.0.0.1) unless `--live` is given;
then against the real API with the user's key and photos, after asking.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio.to_thread
import attrs

from .._client import AsyncClient
from .._downloads import check_destination
from .._errors import ValidationError
from .._requests import GenerateRequest
from . import _signals
from ._batch import generate_batch
from ._commands import BatchFailed, client, train_and_wait
from ._terminal import dumps, say

PROMPTS: Final = tuple(
    f"portrait of me as {role}, golden hour"
    for role in ("an astronaut", "a chef", "a knight", "a pilot", "a painter", "a surfer")
)
IMAGES_PER_PROMPT: Final = 2
CONCURRENCY: Final = 3
SAMPLE_PHOTOS: Final = 5
TRAINING_CREDITS: Final = 50  # what the API charges; generate costs 1 a call
#: The mock's pace: long enough for the concurrency to show, short enough to watch.
MOCK_TRAINING_DELAY: Final = 1.0
MOCK_GENERATE_LATENCY: Final = 0.4


@attrs.frozen
class Summary:
    """What the demo did, for the last lines (or `--json`)."""

    api: str
    model_id: str
    images: list[pathlib.Path]
    bytes_downloaded: int
    credits_spent: int
    failed_calls: int
    training_seconds: float
    batch_seconds: float
    total_seconds: float


def demo(options: argparse.Namespace) -> None:
    if not options.live and (options.public_url is not None or options.callback_port):
        raise ValidationError("--public-url and --callback-port are for --live")
    if options.live:
        if not options.photos:
            raise ValidationError("--live trains from your photos: give --photo PATH (1-30)")
        _confirm(options)
    elif options.photos:
        raise ValidationError("--photo is for --live; the mock demo makes its own photos")
    elif options.api_key is not None or options.base_url is not None:
        raise ValidationError("--api-key and --base-url are for --live")
    check_destination(options.out)  # before any credit is spent (it creates the directory)
    summary = _signals.run(_run(options))
    if options.json:
        print(dumps(attrs.asdict(summary)))
        return
    print(
        f"done in {summary.total_seconds:.2f}s (training {summary.training_seconds:.2f}s, "
        f"batch {summary.batch_seconds:.2f}s): {len(summary.images)} images "
        f"({summary.bytes_downloaded / 1024:.0f} KiB) in {options.out}, "
        f"{summary.credits_spent} credits spent"
    )
    if summary.failed_calls:  # each was reported on its own line above
        raise BatchFailed(f"{summary.failed_calls} of {len(PROMPTS)} generate calls failed")


async def _run(options: argparse.Namespace) -> Summary:
    started = time.perf_counter()
    async with _client(options) as (dm, photos):
        _note(options, f"DeepMode API at {dm.base_url}" + ("" if options.live else " (the mock)"))
        before = (await dm.account.balance()).remaining_balance

        _note(options, f"1. training a model from {len(photos)} photos")
        arguments: dict[str, Any] = {
            "images": photos,
            "gender": options.gender,
            "model_type": options.model_type,
            "name": "deepmode demo",
        }
        model = await train_and_wait(
            options, dm, arguments, ttl=3 * 3600.0, note=lambda line: _note(options, "   " + line)
        )
        trained = time.perf_counter()
        _note(options, f"   model {model.id} trained in {trained - started:.2f}s")

        _note(
            options,
            f"2. generating {len(PROMPTS) * IMAGES_PER_PROMPT} images from {len(PROMPTS)} "
            f"prompts, {CONCURRENCY} calls at a time, into {options.out}",
        )
        requests = [
            GenerateRequest(model_id=model.id, prompt=prompt, num_images=IMAGES_PER_PROMPT)
            for prompt in PROMPTS
        ]
        batch_options = argparse.Namespace(
            json=options.json, concurrency=CONCURRENCY, out=options.out
        )
        tally = await generate_batch(batch_options, dm, requests, total=len(requests), keep=True)
        results = tally.results
        generated = time.perf_counter()
        after = (await dm.account.balance()).remaining_balance

    paths = [path for result in results for path in result.paths or ()]
    return Summary(
        api=str(dm.base_url),
        model_id=model.id,
        images=paths,
        bytes_downloaded=sum(path.stat().st_size for path in paths),
        credits_spent=before - after,
        failed_calls=sum(not result.ok for result in results),
        training_seconds=round(trained - started, 3),
        batch_seconds=round(generated - trained, 3),
        total_seconds=round(time.perf_counter() - started, 3),
    )


@contextlib.asynccontextmanager
async def _client(
    options: argparse.Namespace,
) -> AsyncIterator[tuple[AsyncClient, list[str | pathlib.Path]]]:
    """A client for the real API and the user's photos, or for a fresh embedded mock and
    sample photos written to a temporary directory."""
    if options.live:
        async with client(options) as dm:
            yield dm, list(options.photos)
        return
    from ..testing import MockDeepMode, sample_image

    def write_photos(directory: str) -> list[str | pathlib.Path]:
        photos: list[str | pathlib.Path] = []
        for index in range(SAMPLE_PHOTOS):
            # Distinct bytes per photo (the padding differs), as real photos would be.
            path = pathlib.Path(directory, f"me-{index + 1}.jpg")
            path.write_bytes(sample_image(size=4096 + 512 * index))
            photos.append(path)
        return photos

    with tempfile.TemporaryDirectory(prefix="deepmode-demo-") as directory:
        photos = await anyio.to_thread.run_sync(write_photos, directory)
        async with (
            MockDeepMode(
                training_delay=MOCK_TRAINING_DELAY, latency={"generate": MOCK_GENERATE_LATENCY}
            ) as mock,
            client(options, api_key=mock.api_key, base_url=mock.base_url) as dm,
        ):
            yield dm, photos


def _confirm(options: argparse.Namespace) -> None:
    cost = TRAINING_CREDITS + len(PROMPTS)
    if options.yes:
        return
    if not sys.stdin.isatty():
        raise ValidationError(
            f"--live spends about {cost} credits: confirm on a terminal, or pass --yes"
        )
    say(
        f"The live demo trains a model from {len(options.photos)} photos and generates "
        f"{len(PROMPTS) * IMAGES_PER_PROMPT} images: about {cost} credits of your balance."
    )
    print("Spend them? [y/N] ", end="", file=sys.stderr, flush=True)  # stdout: results
    answer = sys.stdin.readline()  # "" at end of input: no
    if answer.strip().lower() not in {"y", "yes"}:
        raise ValidationError("the live demo was not confirmed; nothing was spent")


def _note(options: argparse.Namespace, message: str) -> None:
    if not options.json:
        print(message, flush=True)
