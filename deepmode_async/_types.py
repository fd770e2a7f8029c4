"""The API's vocabulary: its enums (shared with the mock server and the CLI) and the
data classes of its answers."""

from __future__ import annotations

import datetime as dt
import enum

import attrs


class Gender(enum.StrEnum):
    """Who the trained model depicts (`gender` of create model)."""

    WOMAN = "woman"
    MAN = "man"


class ModelType(enum.StrEnum):
    """The style of training photos (`model_type` of create model)."""

    PROFESSIONAL = "professional"
    AMATEUR = "amateur"


class Ratio(enum.StrEnum):
    """Aspect ratio of generated images."""

    PORTRAIT = "portrait"
    SQUARE = "square"


class RemixMode(enum.StrEnum):
    """Whether a remix answers with the finished image (`sync`) or at once (`async`)."""

    SYNC = "sync"
    ASYNC = "async"


# ---------------------------------------------------------------- data classes
# What the API answers, as frozen, slotted attrs classes built by `_convert.converter`.
# Enum-valued fields are typed `Enum | str`: a value the SDK does not know yet (a new
# ratio, say) stays a plain string instead of breaking the parse.


@attrs.frozen
class Image:
    """A generated (or upscaled) image. `image_url` is signed and expires after an hour."""

    id: str
    file_name: str
    model_id: str
    image_url: str
    prompt: str
    negative_prompt: str | None = None
    upscaled: bool = False
    ratio: Ratio | str = Ratio.PORTRAIT


@attrs.frozen
class Generation:
    """The images of one `images.generate` call (or its callback)."""

    images: tuple[Image, ...]


@attrs.frozen
class Model:
    """A trained model, as the training callback describes it."""

    id: str
    gender: Gender | str
    active: bool
    created_at: dt.datetime
    expire_at: dt.datetime
    name: str | None = None


@attrs.frozen
class ModelCreated:
    """Training started; the model's id arrives with the training callback."""

    message: str


@attrs.frozen
class Accepted:
    """A callback-mode call was accepted; its result will be POSTed to the callback URL."""

    message: str


@attrs.frozen
class ModelExtension:
    """A model was extended by 30 days."""

    updated_expire_at: dt.datetime


@attrs.frozen
class RemixResult:
    """A remix. In async mode `image_url` serves the image once `status` work is done."""

    id: str
    file_name: str
    status: str
    created_at: dt.datetime
    image_url: str


@attrs.frozen
class Balance:
    """The account's remaining credits."""

    remaining_balance: int
