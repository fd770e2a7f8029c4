"""`dm.images`: generate, retrieve, upscale, remix and download images."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable
from typing import Any, overload

from .. import _validate as check
from .._downloads import Downloadable, Downloader, ProgressCallback, check_destination, flatten
from .._errors import ValidationError
from .._transport import Timeout, Transport, coerce_timeout, json_body
from .._types import Accepted, Generation, Image, Ratio, RemixMode, RemixResult
from .._uploads import ImageInput, multipart, prepare
from .._validate import MAX_NUM_IMAGES
from ._base import Resource


class Images(Resource):
    """Images from a trained model, and what can be done with them."""

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
        callback: None = None,
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
        callback: str | None = None,
        timeout: Timeout | float | None = None,
    ) -> Generation | Accepted:
        """Generate 1-8 images of a trained model from a prompt (1 credit).

        Without `callback` (sync mode) the answer carries the images, which can take a
        while (the read timeout defaults to 600 s). With `callback` the API answers at
        once with `Accepted` and later POSTs the `Generation` to that URL.

        Spending credits, this call is never sent twice when the server may have acted on
        it: a timeout or a 5xx is raised, not retried (see the README's retry table).
        """
        body: dict[str, Any] = {
            "model_id": check.non_empty("model_id", model_id),
            "prompt": check.non_empty("prompt", prompt),
            "num_images": check.integer("num_images", num_images, 1, MAX_NUM_IMAGES),
            "upscale": check.boolean("upscale", upscale),
            "ratio": check.choice("ratio", ratio, Ratio),
        }
        if negative_prompt is not None:
            body["negative_prompt"] = check.text("negative_prompt", negative_prompt)
        if callback is None:
            return await self._call(
                Generation, "POST", "/api/images/generate", body=json_body(body), timeout=timeout
            )
        body["callback"] = check.http_url("callback", callback)
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
        self, image_id: str, *, callback: None = None, timeout: Timeout | float | None = None
    ) -> Image: ...

    @overload
    async def upscale(
        self, image_id: str, *, callback: str, timeout: Timeout | float | None = None
    ) -> Accepted: ...

    async def upscale(
        self,
        image_id: str,
        *,
        callback: str | None = None,
        timeout: Timeout | float | None = None,
    ) -> Image | Accepted:
        """Upscale an image x4 (3 credits): the new `Image`, or `Accepted` with `callback`."""
        body = {"image_id": check.non_empty("image_id", image_id)}
        if callback is None:
            return await self._call(
                Image, "POST", "/api/images/upscale", body=json_body(body), timeout=timeout
            )
        body["callback"] = check.http_url("callback", callback)
        return await self._call(
            Accepted, "POST", "/api/images/upscale", body=json_body(body), timeout=timeout
        )

    async def remix(
        self,
        *,
        model_id: str,
        artwork_image: ImageInput,
        mask_image: ImageInput,
        prompt: str = "",
        negative_prompt: str = "",
        mode: RemixMode | str = RemixMode.SYNC,
        timeout: Timeout | float | None = None,
    ) -> RemixResult:
        """Paint a trained model's subject into `artwork_image` where `mask_image` is white
        (1 credit). In `async` mode the answer comes at once and `image_url` serves the
        image when it is ready."""
        fields = [("model_id", check.non_empty("model_id", model_id))]
        return await self._remix(
            "/api/remix/generate",
            fields,
            {"artwork_image": artwork_image, "mask_image": mask_image},
            prompt,
            negative_prompt,
            mode,
            timeout,
        )

    async def face_id_remix(
        self,
        *,
        identity_image: ImageInput,
        artwork_image: ImageInput,
        mask_image: ImageInput,
        prompt: str = "",
        negative_prompt: str = "",
        mode: RemixMode | str = RemixMode.SYNC,
        timeout: Timeout | float | None = None,
    ) -> RemixResult:
        """Put the face of `identity_image` into `artwork_image` where `mask_image` is
        white, without a trained model (1 credit)."""
        images = {
            "identity_image": identity_image,
            "artwork_image": artwork_image,
            "mask_image": mask_image,
        }
        return await self._remix(
            "/api/face-id-remix", [], images, prompt, negative_prompt, mode, timeout
        )

    async def _remix(
        self,
        path: str,
        fields: list[tuple[str, str]],
        images: dict[str, ImageInput],
        prompt: str,
        negative_prompt: str,
        mode: RemixMode | str,
        timeout: Timeout | float | None,
    ) -> RemixResult:
        fields += [
            ("prompt", check.text("prompt", prompt)),
            ("negative_prompt", check.text("negative_prompt", negative_prompt)),
            ("mode", check.choice("mode", mode, RemixMode)),
        ]
        files = [
            upload for name, image in images.items() for upload in await prepare(name, [image])
        ]
        return await self._call(
            RemixResult,
            "POST",
            path,
            body=multipart(fields, files),
            content_type=None,
            timeout=timeout,
        )

    async def download(
        self,
        items: Downloadable | Iterable[Downloadable],
        dest: str | os.PathLike[str],
        *,
        concurrency: int = 16,
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
        `progress` is called with a `DownloadProgress` as bytes and files arrive.
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
            timeout=coerce_timeout(timeout, self._transport.timeout),
        )
