"""What the mock stores and lets tests inspect: models, images, charges, requests, callbacks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

import attrs

Endpoint = Literal[
    "create_model",
    "extend_model",
    "generate",
    "retrieve_image",
    "upscale",
    "remix",
    "face_id_remix",
    "balance",
    "download",
]
"""Names of the mock's endpoints, used for faults, latency, costs and records.

`download` is the image host (`mock.blob_base_url`); the others are the API's eight.
"""

ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)


def check_endpoint(endpoint: str) -> Endpoint:
    """`endpoint` if it names one, else a `ValueError` listing the names (catches typos)."""
    for known in ENDPOINTS:
        if endpoint == known:
            return known
    raise ValueError(f"unknown endpoint {endpoint!r}: expected one of {', '.join(ENDPOINTS)}")


CallbackKind = Literal["model", "generation", "upscale"]

COSTS: Mapping[Endpoint, int] = MappingProxyType(
    {
        "create_model": 50,
        "extend_model": 20,
        "generate": 1,
        "upscale": 3,
        "remix": 1,
        "face_id_remix": 1,
    }
)
"""Credits each endpoint costs, as documented; endpoints not listed are free."""


MODEL_LIFETIME: Final = dt.timedelta(days=30)
"""How long a model lives after training, and what an extension adds."""


def iso(moment: dt.datetime, *, fraction: bool = False) -> str:
    """Format like the API: UTC with a `Z`, with microseconds where the API shows them."""
    text = moment.astimezone(dt.UTC).isoformat(timespec="microseconds" if fraction else "seconds")
    return text.removesuffix("+00:00") + "Z"


@attrs.define
class MockModel:
    """A model the mock knows; `active` turns true when training completes."""

    id: str
    name: str | None
    gender: str
    model_type: str
    created_at: dt.datetime
    expire_at: dt.datetime
    active: bool = False
    image_count: int = 0

    def to_json(self) -> dict[str, Any]:
        """The `Model` body the API POSTs to the training callback."""
        return {
            "id": self.id,
            "name": self.name,
            "gender": self.gender,
            "active": self.active,
            "created_at": iso(self.created_at),
            "expire_at": iso(self.expire_at),
        }


@attrs.define
class MockImage:
    """A generated or upscaled image; its `image_url` is signed anew each time it is served."""

    id: str
    file_name: str
    model_id: str
    prompt: str
    negative_prompt: str | None
    upscaled: bool
    ratio: str
    blob_path: str


@attrs.define
class MockRemix:
    """The result of a remix or face-id remix; `async` ones are ready at `ready_at`."""

    id: str
    file_name: str
    kind: Literal["remix", "face_id_remix"]
    model_id: str | None
    created_at: dt.datetime
    ready_at: dt.datetime
    blob_path: str


@attrs.frozen
class Charge:
    """One entry of the credit ledger: credits taken by one accepted call."""

    endpoint: Endpoint
    cost: int
    balance_after: int
    request_id: str


@attrs.frozen
class UploadedFile:
    """A file part of a multipart request, as the mock saw it (its bytes are not kept)."""

    field: str
    filename: str | None
    content_type: str | None
    size: int
    format: str | None


@attrs.define
class RecordedRequest:
    """One request the mock received. `status` and `disconnected` are filled in as it ends.

    `status` stays `None` when no answer was sent (the connection was dropped, or the
    client hung up first, which also sets `disconnected`).

    `headers` has the value of `Authorization` replaced by `[redacted]`, so tests can
    assert whether it was sent without the key ending up in their output.
    """

    endpoint: Endpoint | None
    method: str
    path: str
    query: str
    headers: dict[str, str]
    request_id: str
    json: Any = None
    form: dict[str, str] = attrs.Factory(dict)
    files: list[UploadedFile] = attrs.Factory(list)
    status: int | None = None
    disconnected: bool = False


@attrs.define
class CallbackDelivery:
    """The fate of one callback: every attempt's status (or error) and whether it landed."""

    kind: CallbackKind
    url: str
    body: Any
    attempts: list[str] = attrs.Factory(list)
    delivered: bool = False
    finished: bool = False
