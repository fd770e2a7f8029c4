"""The API's vocabulary: enums shared by the client, the mock server and the CLI."""

from __future__ import annotations

import enum


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
