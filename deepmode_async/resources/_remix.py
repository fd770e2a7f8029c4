"""`dm.images.remix` and `face_id_remix`: paint a subject into an artwork, by a mask."""

from __future__ import annotations

from .. import _validate as check
from .._timeout import Timeout
from .._types import RemixMode, RemixResult
from .._uploads import ImageInput, check_files, multipart
from ._base import Resource


class Remixing(Resource):
    """The remix calls of `dm.images`: multipart uploads of an artwork and its mask."""

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
            upload for name, image in images.items() for upload in await check_files(name, [image])
        ]
        return await self._call(
            RemixResult,
            "POST",
            path,
            body=multipart(fields, files),
            content_type=None,
            timeout=timeout,
        )
