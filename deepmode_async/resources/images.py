"""`dm.images`: generate, retrieve, upscale and download images (remix: `_remix`)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, overload

from .. import _validate as check
from .._downloads import (
    DOWNLOAD_CONCURRENCY,
    Downloadable,
    Downloader,
    ProgressCallback,
    check_destination,
    flatten,
)
from .._errors import ValidationError
from .._raw import not_raw
from .._requests import GenerateRequest, generate_body
from .._timeout import Timeout
from .._transport import Transport, json_body
from .._types import Accepted, Generation, Image, Ratio
from ..callbacks import CallbackHub
from ._batching import Batching
from ._callbacks import submit_and_wait
from ._remix import Remixing

if TYPE_CHECKING:
    from ._raw_types import ImagesWithRawResponse


class Images(Batching, Remixing):
    """Images from a trained model, and what can be done with them."""

    with_raw_response: ImagesWithRawResponse

    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._downloader = Downloader(transport, self.retrieve)

    @overload
    async def generate(
        self,
        *,
        model_id: str,
        prompt: str,
        negative_prompt: str | None = None,
        num_images: int = 1,
        upscale: bool = False,
        ratio: Ratio | str = Ratio.PORTRAIT,
        callback: CallbackHub | None = None,
        timeout: Timeout | float | None = None,
    ) -> Generation: ...

    @overload
    async def generate(
        self,
        *,
        model_id: str,
        prompt: str,
        negative_prompt: str | None = None,
        num_images: int = 1,
        upscale: bool = False,
        ratio: Ratio | str = Ratio.PORTRAIT,
        callback: str,
        timeout: Timeout | float | None = None,
    ) -> Accepted: ...

    async def generate(
        self,
        *,
        model_id: str,
        prompt: str,
        negative_prompt: str | None = None,
        num_images: int = 1,
        upscale: bool = False,
        ratio: Ratio | str = Ratio.PORTRAIT,
        callback: str | CallbackHub | None = None,
        timeout: Timeout | float | None = None,
    ) -> Generation | Accepted:
        """Generate 1-8 images of a trained model from a prompt (1 credit).

        Without `callback` (sync mode) the answer carries the images, which can take a
        while (the read timeout defaults to 600 s). With a `callback` URL the API
        answers at once with `Accepted` and later POSTs the `Generation` to that URL.
        With a `CallbackHub` as `callback`, the call goes in callback mode and waits for
        the hub to receive the `Generation` (at most the hub's `ttl`).

        Spending credits, this call is never sent twice when the server may have acted on
        it: a timeout or a 5xx is raised, not retried (see the README's retry table).
        """
        request = GenerateRequest(
            model_id=model_id,
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_images=num_images,
            upscale=upscale,
            ratio=ratio,
        )
        if isinstance(callback, CallbackHub):
            return await submit_and_wait(
                callback.expect("generation"),
                lambda url: self._generate_later(request, url, timeout),
            )
        if callback is not None:
            return await self._generate_later(request, callback, timeout)
        return await self._generate(request, timeout)

    async def _generate(
        self, request: GenerateRequest, timeout: Timeout | float | None
    ) -> Generation:
        """Sync mode: the images in the answer."""
        body = json_body(generate_body(request))
        return await self._call(
            Generation, "POST", "/api/images/generate", body=body, timeout=timeout
        )

    async def _generate_later(
        self, request: GenerateRequest, callback: str, timeout: Timeout | float | None
    ) -> Accepted:
        """Callback mode: the images go to `callback` later."""
        body = {**generate_body(request), "callback": check.http_url("callback", callback)}
        return await self._call(
            Accepted, "POST", "/api/images/generate", body=json_body(body), timeout=timeout
        )

    async def retrieve(self, image_id: str, *, timeout: Timeout | float | None = None) -> Image:
        """An image by id, with a freshly signed `image_url` (free)."""
        segment = check.path_segment("image_id", image_id)
        return await self._call(
            Image, "GET", f"/api/images/{segment}", idempotent=True, timeout=timeout
        )

    @overload
    async def upscale(
        self,
        image_id: str,
        *,
        callback: CallbackHub | None = None,
        timeout: Timeout | float | None = None,
    ) -> Image: ...

    @overload
    async def upscale(
        self, image_id: str, *, callback: str, timeout: Timeout | float | None = None
    ) -> Accepted: ...

    async def upscale(
        self,
        image_id: str,
        *,
        callback: str | CallbackHub | None = None,
        timeout: Timeout | float | None = None,
    ) -> Image | Accepted:
        """Upscale an image x4 (3 credits): the new `Image`, or `Accepted` with a
        `callback` URL. With a `CallbackHub` as `callback`, waits for the hub to receive
        the upscaled `Image`."""
        body = {"image_id": check.non_empty("image_id", image_id)}
        if isinstance(callback, CallbackHub):
            return await submit_and_wait(
                callback.expect("upscale"),
                lambda url: self.upscale(image_id, callback=url, timeout=timeout),
            )
        if callback is None:
            return await self._call(
                Image, "POST", "/api/images/upscale", body=json_body(body), timeout=timeout
            )
        body["callback"] = check.http_url("callback", callback)
        return await self._call(
            Accepted, "POST", "/api/images/upscale", body=json_body(body), timeout=timeout
        )

    @not_raw
    async def download(
        self,
        items: Downloadable | Iterable[Downloadable],
        dest: str | os.PathLike[str],
        *,
        concurrency: int = DOWNLOAD_CONCURRENCY,
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
        timeout: Timeout | float | None = None,
    ) -> list[pathlib.Path]:
        """Download images into the directory `dest` (created if missing), in parallel.

        `items` is an `Image`, `RemixResult` or `Generation`, or an iterable of them; the
        paths returned follow their order. Names come from each image's `file_name`,
        made safe and unique; an existing file gets a `-2` name unless `overwrite`. A file
        appears under its name only when complete. An expired URL is refreshed once. The
        first failure cancels the rest and raises `DownloadError`; finished files stay.
        `progress` is called with a `DownloadProgress` as bytes and files arrive; if it
        raises, the downloads stop with a `ProgressCallbackError`.
        """
        images = flatten(items)
        check.positive("concurrency", concurrency)
        check.boolean("overwrite", overwrite)
        if progress is not None and not callable(progress):
            raise ValidationError("progress must be a callable or None")
        directory = check_destination(dest)
        return await self._downloader.download(
            images,
            directory,
            concurrency=concurrency,
            overwrite=overwrite,
            progress=progress,
            timeout=self._timeout(timeout),
        )
