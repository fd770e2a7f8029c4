"""The arguments of API calls that are passed around as values: `GenerateRequest`."""

from __future__ import annotations

from typing import Any

import attrs

from . import _validate as check
from ._types import Ratio
from ._validate import MAX_NUM_IMAGES


def _ratio(value: Ratio | str) -> Ratio:
    if value.__class__ is Ratio:  # the default, or a member passed: nothing to check
        return value
    return Ratio(check.choice("ratio", value, Ratio))


@attrs.frozen
class GenerateRequest:
    """The arguments of one `images.generate` call, checked when it is made.

    `GenerateRequest(model_id, prompt, negative_prompt=None, num_images=1,
    upscale=False, ratio="portrait")` takes the arguments of `images.generate` but
    `callback`:

    - `model_id`: a trained model's id (non-empty);
    - `prompt`: what to paint (non-empty); `negative_prompt`: what to keep out;
    - `num_images`: 1 to 8 images from the one call (1 credit a call);
    - `upscale`: upscale the images too;
    - `ratio`: a `Ratio` or its value (`"portrait"` or `"square"`), kept as a `Ratio`.

    Invalid arguments raise `ValidationError` here, before anything is sent. The batch
    calls (`images.generate_many`) take an iterable of them.
    """

    model_id: str
    prompt: str
    negative_prompt: str | None = None
    num_images: int = 1
    upscale: bool = False
    ratio: Ratio = attrs.field(default=Ratio.PORTRAIT, converter=_ratio)

    def __attrs_post_init__(self) -> None:
        check.non_empty("model_id", self.model_id)
        check.non_empty("prompt", self.prompt)
        if self.negative_prompt is not None:
            check.text("negative_prompt", self.negative_prompt)
        check.integer("num_images", self.num_images, 1, MAX_NUM_IMAGES)
        check.boolean("upscale", self.upscale)


def generate_body(request: GenerateRequest) -> dict[str, Any]:
    """The JSON body of `request`, as the API takes it."""
    body: dict[str, Any] = {
        "model_id": request.model_id,
        "prompt": request.prompt,
        "num_images": request.num_images,
        "upscale": request.upscale,
        "ratio": str(request.ratio),
    }
    if request.negative_prompt is not None:
        body["negative_prompt"] = request.negative_prompt
    return body
