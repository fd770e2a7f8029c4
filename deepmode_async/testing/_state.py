"""What the mock knows: its clock, the records tests inspect, the credit ledger, image URLs."""

from __future__ import annotations

import collections
import datetime as dt
import secrets
import uuid
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from ._http import Problem
from ._records import (
    COSTS,
    ENDPOINTS,
    MODEL_LIFETIME,
    Charge,
    Endpoint,
    MockImage,
    MockModel,
    MockRemix,
    RecordedRequest,
    check_endpoint,
    iso,
)
from ._samples import sample_image
from ._signing import UrlSigner

_REDACTED: Final = "[redacted]"
_SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})


class MockState:
    """The mock's memory, shared by its two hosts: records, credits, the clock, image URLs.

    The hosts change it as calls arrive; `MockDeepMode` shows copies of it to tests.
    """

    def __init__(
        self,
        *,
        balance: int,
        costs: Mapping[Endpoint, int] | None,
        url_ttl: float,
        image_size: int | None,
        max_recorded_requests: int,
    ) -> None:
        self.balance = balance
        self.costs: dict[Endpoint, int] = {
            **COSTS,
            **{check_endpoint(name): cost for name, cost in (costs or {}).items()},
        }
        self.image_bytes = sample_image("jpeg", size=image_size)
        self.models: dict[str, MockModel] = {}
        self.images: dict[str, MockImage] = {}
        self.remixes: dict[str, MockRemix] = {}
        self.ledger: list[Charge] = []
        self.requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=max_recorded_requests
        )
        self.blobs: dict[str, dt.datetime] = {}  # blob path -> when it can be downloaded
        self.in_flight = 0
        self.peak_in_flight = 0
        self.clock_offset = dt.timedelta()
        self.signer = UrlSigner(self.now, url_ttl)
        self.blob_base_url: str | None = None  # known once the image host listens

    # ------------------------------------------------------------------ the clock

    def now(self) -> dt.datetime:
        """The mock's clock: the real time plus whatever `advance_clock` added."""
        return dt.datetime.now(dt.UTC) + self.clock_offset

    def advance_clock(self, seconds: float) -> None:
        """Move the mock's clock forward, to expire image URLs or models without waiting."""
        self.clock_offset += dt.timedelta(seconds=seconds)

    # ------------------------------------------------------------------ calls and credits

    def record(self, request: web.Request) -> RecordedRequest:
        """Keep what a request was, its secrets redacted, in `requests`."""
        headers = {
            name: _REDACTED if name.lower() in _SECRET_HEADERS else value
            for name, value in request.headers.items()
        }
        route = request.match_info.route.name
        record = RecordedRequest(
            endpoint=route if route in ENDPOINTS else None,
            method=request.method,
            path=request.path,
            query=request.rel_url.raw_query_string,
            headers=headers,
            request_id=f"req_{secrets.token_hex(8)}",
        )
        self.requests.append(record)
        return record

    def enter(self) -> None:
        """An API call starts."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self) -> None:
        """An API call ends."""
        self.in_flight -= 1

    def charge(self, endpoint: Endpoint, record: RecordedRequest) -> None:
        """Take the credits `endpoint` costs, or answer 402 when the balance is short."""
        cost = self.costs.get(endpoint, 0)
        if cost > self.balance:
            message = f"Insufficient credits: this call costs {cost}, the balance is {self.balance}"
            raise Problem(402, message)
        self.balance -= cost
        self.ledger.append(Charge(endpoint, cost, self.balance, record.request_id))

    # ------------------------------------------------------------------ what calls make

    def add_model(
        self,
        *,
        name: str | None = "Test model",
        gender: str = "woman",
        model_type: str = "amateur",
        active: bool = True,
    ) -> MockModel:
        """A model ready to use, without the training call (whose id only a callback tells)."""
        now = self.now()
        model = MockModel(
            id=new_id(21),
            name=name,
            gender=gender,
            model_type=model_type,
            created_at=now,
            expire_at=now + MODEL_LIFETIME,
            active=active,
        )
        self.models[model.id] = model
        return model

    def find_model(self, model_id: str, *, trained: bool = True) -> MockModel:
        """The model, or the answer the API gives for an unknown, untrained or expired one."""
        model = self.models.get(model_id)
        if model is None:
            raise Problem(404, f"Model {model_id!r} not found")
        if trained and not model.active:
            raise Problem(409, f"Model {model_id!r} is still training")
        if trained and model.expire_at <= self.now():
            raise Problem(403, f"Model {model_id!r} expired at {iso(model.expire_at)}; extend it")
        return model

    def add_image(
        self, model_id: str, prompt: str, negative_prompt: str | None, *, upscaled: bool, ratio: str
    ) -> MockImage:
        """A generated or upscaled image, downloadable at once."""
        file_name = new_file_name()
        image = MockImage(
            id=new_id(21),
            file_name=file_name,
            model_id=model_id,
            prompt=prompt,
            negative_prompt=negative_prompt,
            upscaled=upscaled,
            ratio=ratio,
            blob_path=f"/deepmode-user-image/{file_name}",
        )
        self.images[image.id] = image
        self.blobs[image.blob_path] = self.now()
        return image

    def add_remix(self, kind: Endpoint, model_id: str | None, *, ready_in: float) -> MockRemix:
        """A remix result, downloadable `ready_in` seconds from now."""
        assert kind in ("remix", "face_id_remix")
        file_name = new_file_name()
        container = "remix-generation" if kind == "remix" else "face-id-remix-generation"
        now = self.now()
        remix = MockRemix(
            id=new_id(24),
            file_name=file_name,
            kind=kind,
            model_id=model_id,
            created_at=now,
            ready_at=now + dt.timedelta(seconds=ready_in),
            blob_path=f"/{container}/{file_name}",
        )
        self.remixes[remix.id] = remix
        self.blobs[remix.blob_path] = remix.ready_at
        return remix

    def blob_ready(self, blob_path: str) -> bool:
        """Whether the image host has something to serve at `blob_path` yet."""
        ready_at = self.blobs.get(blob_path)
        return ready_at is not None and ready_at <= self.now()

    # ------------------------------------------------------------------ answers

    def signed_url(self, blob_path: str) -> str:
        """A fresh signed URL of `blob_path` on the image host."""
        if self.blob_base_url is None:
            raise RuntimeError("the image host is not listening")
        return f"{self.blob_base_url}{blob_path}?{self.signer.sign(blob_path)}"

    def image_json(self, image: MockImage) -> dict[str, Any]:
        """An `Image` body as the API answers it."""
        return {
            "id": image.id,
            "file_name": image.file_name,
            "model_id": image.model_id,
            "image_url": self.signed_url(image.blob_path),
            "prompt": image.prompt,
            "negative_prompt": image.negative_prompt,
            "upscaled": image.upscaled,
            "ratio": image.ratio,
        }

    def remix_json(self, remix: MockRemix) -> dict[str, Any]:
        """A remix body as the API answers it."""
        return {
            "id": remix.id,
            "file_name": remix.file_name,
            "status": "completed" if remix.ready_at <= self.now() else "processing",
            "created_at": iso(remix.created_at, fraction=True),
            "image_url": self.signed_url(remix.blob_path),
        }


def new_id(length: int) -> str:
    """A random lowercase hex id of `length` characters, like the API's."""
    return secrets.token_hex((length + 1) // 2)[:length]


def new_file_name() -> str:
    return f"{uuid.uuid4()}.jpeg"
