"""`dm.models`: train a model from photos, and extend its life."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, overload

import anyio.to_thread

from .. import _validate as check
from .._errors import ValidationError
from .._timeout import Timeout
from .._transport import json_body
from .._types import Gender, Model, ModelCreated, ModelExtension, ModelType
from .._uploads import ImageInput, UploadProgressCallback, check_files, multipart
from .._validate import MAX_TRAINING_IMAGES
from ..callbacks import CallbackHub
from ._base import Resource
from ._callbacks import submit_and_wait

if TYPE_CHECKING:
    from ._raw_types import ModelsWithRawResponse


class Models(Resource):
    """Personal models: trained from 1-30 photos, valid for 30 days, extendable."""

    with_raw_response: ModelsWithRawResponse

    @overload
    async def create(
        self,
        *,
        images: Iterable[ImageInput] | None = None,
        image_urls: Iterable[str] | None = None,
        gender: Gender | str,
        model_type: ModelType | str,
        name: str | None = None,
        callback: str | None = None,
        progress: UploadProgressCallback | None = None,
        prepare: bool = False,
        timeout: Timeout | float | None = None,
    ) -> ModelCreated: ...

    @overload
    async def create(
        self,
        *,
        images: Iterable[ImageInput] | None = None,
        image_urls: Iterable[str] | None = None,
        gender: Gender | str,
        model_type: ModelType | str,
        name: str | None = None,
        callback: CallbackHub,
        progress: UploadProgressCallback | None = None,
        prepare: bool = False,
        timeout: Timeout | float | None = None,
    ) -> Model: ...

    async def create(
        self,
        *,
        images: Iterable[ImageInput] | None = None,
        image_urls: Iterable[str] | None = None,
        gender: Gender | str,
        model_type: ModelType | str,
        name: str | None = None,
        callback: str | CallbackHub | None = None,
        progress: UploadProgressCallback | None = None,
        prepare: bool = False,
        timeout: Timeout | float | None = None,
    ) -> ModelCreated | Model:
        """Start training a model (50 credits) from `images` or from `image_urls`.

        `images` are paths (streamed from disk), bytes, binary file objects or
        `(filename, data[, content_type])` tuples, checked by content to be jpeg, png,
        webp or heic. `image_urls` must be public http(s) URLs. Exactly one of the two,
        with 1 to 30 items. The model's id arrives only with the training result: POSTed
        to a `callback` URL when given (else the API e-mails the account owner). With a
        `CallbackHub` as `callback`, the call waits for training to finish and returns
        the trained `Model` (at most the hub's `ttl`). `progress` is called with an
        `UploadProgress` as the image bytes of `images` are sent; if it raises, the
        upload stops with a `ProgressCallbackError` (and is not retried).

        With `prepare=True` (needs the `images` extra), `images` first go through
        `deepmode_async.prep.prepare_training_set`: turned upright, padded to 640 x 640 on
        white, and re-encoded as JPEG without any metadata (no GPS location). If any photo
        would be skipped (not an image, damaged, too small, a duplicate), nothing is sent
        and a `deepmode_async.prep.TrainingSetError` lists why; call
        `prepare_training_set` yourself to train on the usable ones only.
        """
        if isinstance(callback, CallbackHub):
            return await submit_and_wait(
                callback.expect("model"),
                lambda url: self.create(
                    images=images,
                    image_urls=image_urls,
                    gender=gender,
                    model_type=model_type,
                    name=name,
                    callback=url,
                    progress=progress,
                    prepare=prepare,
                    timeout=timeout,
                ),
            )
        if (images is None) == (image_urls is None):
            raise ValidationError("give exactly one of images= or image_urls=")
        if progress is not None and not callable(progress):
            raise ValidationError("progress must be a callable or None")
        if check.boolean("prepare", prepare) and images is None:
            raise ValidationError("prepare=True applies to images=, not to image_urls=")
        fields: dict[str, Any] = {
            "gender": check.choice("gender", gender, Gender),
            "model_type": check.choice("model_type", model_type, ModelType),
        }
        if name is not None:
            fields["name"] = check.text("name", name)
        if callback is not None:
            fields["callback"] = check.http_url("callback", callback)
        if image_urls is not None:
            urls = check.as_list("image_urls", image_urls)
            check.count("image_urls", urls, 1, MAX_TRAINING_IMAGES)
            fields["image_urls"] = [
                check.http_url(f"image_urls[{index}]", url) for index, url in enumerate(urls)
            ]
            return await self._call(
                ModelCreated, "POST", "/api/models", body=json_body(fields), timeout=timeout
            )
        inputs = check.as_list("images", images)
        check.count("images", inputs, 1, MAX_TRAINING_IMAGES)
        if prepare:
            inputs = await _prepared(inputs)
        files = await check_files("images", inputs)
        return await self._call(
            ModelCreated,
            "POST",
            "/api/models",
            body=multipart(list(fields.items()), files, progress),
            content_type=None,  # aiohttp writes multipart/form-data with its boundary
            timeout=timeout,
        )

    async def extend(
        self, model_id: str, *, timeout: Timeout | float | None = None
    ) -> ModelExtension:
        """Extend a model's life by 30 days (20 credits)."""
        segment = check.path_segment("model_id", model_id)
        return await self._call(
            ModelExtension, "POST", f"/api/models/{segment}/extend", timeout=timeout
        )


async def _prepared(inputs: list[ImageInput]) -> list[ImageInput]:
    """`inputs` as `deepmode_async.prep` prepares them, or an error if any is unusable."""
    try:
        # Imported in a worker thread (Pillow takes tens of milliseconds), then bound here.
        await anyio.to_thread.run_sync(importlib.import_module, "deepmode_async.prep")
        from .. import prep
    except ImportError as exc:
        raise ValidationError(f"prepare needs Pillow: {exc}") from None
    training_set = await prep.prepare_training_set(inputs)
    if training_set.skipped:
        reasons = "; ".join(f"{photo.source}: {photo.reason}" for photo in training_set.skipped)
        raise prep.TrainingSetError(
            f"{len(training_set.skipped)} of {len(inputs)} photos cannot be used, so nothing "
            f"was sent: {reasons}. Leave them out, or train on the usable ones with "
            "deepmode_async.prep.prepare_training_set",
            training_set,
        )
    return list(training_set.images)
