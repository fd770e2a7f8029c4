"""The commands: each turns parsed options into SDK calls and prints what came back."""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs

from .. import _validate as check
from .._client import AsyncClient
from .._downloads import DownloadProgress, check_destination
from .._errors import DeepModeError, ValidationError
from .._mock_options import MOCK_API_KEY
from .._pacing import Pacer, pacing
from .._tasks import map_bounded
from .._types import Accepted, Image, Model, ModelCreated, RemixResult
from .._uploads import UploadProgress
from . import _signals
from ._batch import Requests, generate_batch
from ._hub import local_hub
from ._terminal import Bar, dumps, emit, image_line, jsonable, progress_bar, say

T = TypeVar("T")


class BatchFailed(DeepModeError):
    """Some requests of a batch failed (each was reported on its own line)."""


def check_client_options(options: argparse.Namespace) -> None:
    """Refuse a missing key, a bad `--timeout` or `--max-retries` before the command
    does anything (the demo against its own mock needs no key)."""
    needs_key = getattr(options, "live", True)
    if options.api_key == "":
        raise ValidationError("--api-key is empty: give the key, or leave the option out")
    if needs_key and not options.api_key and not os.environ.get("DEEPMODE_API_KEY"):
        raise ValidationError(
            "no API key: give --api-key KEY or set DEEPMODE_API_KEY (keys are at "
            "https://deepmode.ai, under API; `deepmode mock serve` prints a mock's)"
        )
    if options.timeout is not None:
        check.seconds("--timeout", options.timeout)
    if options.max_retries is not None and options.max_retries < 0:
        raise ValidationError(f"--max-retries must be 0 or more, not {options.max_retries}")


def client(options: argparse.Namespace, **where: str) -> AsyncClient:
    """A client made from the common options (see `check_client_options`); `where`
    (`api_key`, `base_url`) overrides the ones given, as the demo does for its mock."""
    settings: dict[str, Any] = {"api_key": options.api_key, "base_url": options.base_url}
    if options.timeout is not None:
        settings["timeout"] = options.timeout
    if options.max_retries is not None:
        settings["max_retries"] = options.max_retries
    return AsyncClient(**(settings | where))


def run(options: argparse.Namespace, call: Callable[[AsyncClient], Awaitable[T]]) -> T:
    """Run `call` with a client made from the options, on a fresh event loop."""

    async def with_client() -> T:
        async with client(options) as dm:
            return await call(dm)

    return _signals.run(with_client())


# ----------------------------------------------------------------------------- account


def balance(options: argparse.Namespace) -> None:
    result = run(options, lambda dm: dm.account.balance())
    emit(options, result, f"{result.remaining_balance} credits")


# ----------------------------------------------------------------------------- models


def models_create(options: argparse.Namespace) -> None:
    photos, urls = options.images, options.image_urls
    if bool(photos) == bool(urls):
        raise ValidationError("give the photos (1 to 30 paths) or --image-url, not both")
    if options.wait and options.callback:
        raise ValidationError("--wait receives the training callback itself: drop --callback")
    if not options.wait and (options.public_url is not None or options.callback_port):
        raise ValidationError("--public-url and --callback-port are for --wait")
    wait_timeout = check.seconds("--wait-timeout", options.wait_timeout)
    arguments: dict[str, Any] = {
        "images": photos or None,
        "image_urls": urls or None,
        "gender": options.gender,
        "model_type": options.model_type,
        "name": options.name,
    }
    if options.prepare:
        if urls:
            raise ValidationError("--prepare is for photos (paths), not --image-url")
        arguments["prepare"] = True

    async def create(dm: AsyncClient) -> ModelCreated | Model:
        if not options.wait:
            return await upload(options, dm, arguments, callback=options.callback)
        note = (lambda message: None) if options.json else say
        return await train_and_wait(options, dm, arguments, ttl=wait_timeout, note=note)

    result = run(options, create)
    if isinstance(result, Model):
        emit(options, result, model_line(result))
    else:
        emit(options, result, result.message)


async def train_and_wait(
    options: argparse.Namespace,
    dm: AsyncClient,
    arguments: dict[str, Any],
    *,
    ttl: float,
    note: Callable[[str], None],
) -> Model:
    """`models.create` with its callback received by a hub on this machine: the trained
    model (`models create --wait` and the demo)."""
    async with local_hub(dm.base_url, options, ttl=ttl) as hub:
        pending = hub.expect("model")
        created = await upload(options, dm, arguments, callback=pending.url)
        note(f"{created.message}; waiting for the training callback")
        return await pending.wait()


async def upload(
    options: argparse.Namespace,
    dm: AsyncClient,
    arguments: dict[str, Any],
    *,
    callback: str | None,
) -> ModelCreated:
    """`models.create` with a progress bar for the photos' bytes."""
    with progress_bar(options, "uploading", None, in_bytes=True) as bar:
        return await dm.models.create(
            **arguments, callback=callback, progress=_upload_progress(bar)
        )


def _upload_progress(bar: Bar | None) -> Callable[[UploadProgress], None] | None:
    if bar is None:
        return None
    return lambda progress: bar.update(progress.bytes_sent, progress.bytes_total)


def model_line(model: Model) -> str:
    name = f" ({model.name})" if model.name else ""
    return f"{model.id}{name} trained; expires {model.expire_at:%Y-%m-%d %H:%M %Z}"


def models_extend(options: argparse.Namespace) -> None:
    result = run(options, lambda dm: dm.models.extend(options.model_id))
    emit(
        options, result, f"{options.model_id} expires {result.updated_expire_at:%Y-%m-%d %H:%M %Z}"
    )


# ----------------------------------------------------------------------------- images


def generate(options: argparse.Namespace) -> None:
    check.positive("--concurrency", options.concurrency)
    requests = Requests(options)
    if options.resend_unknown and options.journal is None:
        raise ValidationError("--resend-unknown needs --journal")
    if options.callback is not None:
        if options.journal is not None:
            raise ValidationError("--journal is for batches in sync mode: drop --callback")
        if requests.count > 1:
            raise ValidationError("--callback takes one --prompt, not a batch")
        if options.out is not None:
            raise ValidationError("--out needs the images now: drop --callback")
        request = requests.first
        accepted = run(
            options,
            lambda dm: dm.images.generate(**attrs.asdict(request), callback=options.callback),
        )
        emit(options, accepted, accepted.message)
        return
    tally = run(
        options,
        lambda dm: generate_batch(options, dm, requests, total=requests.count, keep=options.json),
    )
    if options.json:
        print(dumps(jsonable(tally.results)))
    if tally.failed:
        raise BatchFailed(f"{tally.failed} of {tally.total} requests failed")


def upscale(options: argparse.Namespace) -> None:
    if options.callback is not None and options.out is not None:
        raise ValidationError("--out needs the image now: drop --callback")
    _check_out(options)

    async def call(dm: AsyncClient) -> Image | Accepted | pathlib.Path:
        callback: str | None = options.callback
        if callback is not None:
            return await dm.images.upscale(options.image_id, callback=callback)
        image = await dm.images.upscale(options.image_id)
        return image if options.out is None else await download_one(options, dm, image)

    _emit_image(options, run(options, call))


def remix(options: argparse.Namespace) -> None:
    if (options.model_id is None) == (options.identity_image is None):
        raise ValidationError("give --model-id (remix) or --identity-image (face-id remix)")
    if options.out is not None and options.mode != "sync":
        raise ValidationError("--out needs --mode sync (an async remix is not ready yet)")
    _check_out(options)
    common = {
        "artwork_image": options.artwork_image,
        "mask_image": options.mask_image,
        "prompt": options.prompt,
        "negative_prompt": options.negative_prompt,
        "mode": options.mode,
    }

    async def call(dm: AsyncClient) -> RemixResult | pathlib.Path:
        if options.model_id is not None:
            result = await dm.images.remix(model_id=options.model_id, **common)
        else:
            result = await dm.images.face_id_remix(identity_image=options.identity_image, **common)
        return result if options.out is None else await download_one(options, dm, result)

    _emit_image(options, run(options, call))


def _emit_image(
    options: argparse.Namespace, result: Image | RemixResult | Accepted | pathlib.Path
) -> None:
    if isinstance(result, Accepted):
        emit(options, result, result.message)
    elif isinstance(result, pathlib.Path):
        emit(options, result, str(result))
    else:
        extra = f" {result.status}" if isinstance(result, RemixResult) else ""
        emit(options, result, image_line(result) + extra)


async def download_one(
    options: argparse.Namespace, dm: AsyncClient, image: Image | RemixResult
) -> pathlib.Path:
    try:
        (path,) = await dm.images.download(image, options.out)
    except DeepModeError:
        emit(options, image, image_line(image))  # paid for: the image is still shown
        raise
    return path


def download(options: argparse.Namespace) -> None:
    check.positive("--concurrency", options.concurrency)
    for number, image_id in enumerate(options.image_ids, 1):  # all of them before any request
        check.non_empty(f"IMAGE_ID #{number}", image_id)

    async def call(dm: AsyncClient) -> list[pathlib.Path]:
        # Fresh URLs for all of them first, side by side (paced together, as a batch is,
        # should the API rate-limit them): the file names are chosen together.
        pacer = Pacer(options.concurrency)

        async def retrieve(image_id: str) -> Image:
            with pacing(pacer):
                return await dm.images.retrieve(image_id)

        images = await map_bounded(retrieve, options.image_ids, options.concurrency)
        with progress_bar(options, "downloading", len(images)) as bar:
            return await dm.images.download(
                images,
                options.out,
                concurrency=options.concurrency,
                overwrite=options.overwrite,
                progress=_download_progress(bar),
            )

    paths = run(options, call)
    if options.json:
        print(dumps(jsonable(paths)))
    else:
        for path in paths:
            print(path)


def _download_progress(bar: Bar | None) -> Callable[[DownloadProgress], None] | None:
    if bar is None:
        return None
    return lambda progress: bar.update(progress.files_done)


def mock_serve(options: argparse.Namespace) -> None:
    from ..testing.__main__ import run as serve

    if options.api_key is None:  # none given, before the command or after it
        options = argparse.Namespace(**(vars(options) | {"api_key": MOCK_API_KEY}))
    try:
        serve(options)
    except (OSError, OverflowError) as exc:  # a port in use or out of range, a bad host
        raise DeepModeError(f"the mock cannot listen on {options.host}: {exc}") from None


# ----------------------------------------------------------------------------- helpers


def _check_out(options: argparse.Namespace) -> None:
    """`--out` checked before a paid call, so that its result is not lost to a bad path."""
    if options.out is not None:
        check_destination(options.out)
