"""The mock's API host over loopback, with raw aiohttp: shapes, callbacks, rules, ledger."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import attrs
import pytest
from conftest import Receiver, eventually
from yarl import URL

from deepmode_async.testing import (
    ENDPOINTS,
    CallbackDelivery,
    Charge,
    Endpoint,
    MockDeepMode,
    UploadedFile,
    sample_image,
)

pytestmark = pytest.mark.anyio

MODELS = "/api/models"
GENERATE = "/api/images/generate"
UPSCALE = "/api/images/upscale"
BALANCE = "/api/check-balance"
REMIX = "/api/remix/generate"
FACE_ID = "/api/face-id-remix"
REMIX_PATHS = {"remix": REMIX, "face_id_remix": FACE_ID}
REMIX_IMAGES = {
    "remix": ("artwork_image", "mask_image"),
    "face_id_remix": ("identity_image", "artwork_image", "mask_image"),
}
REMIX_CONTAINERS = {"remix": "remix-generation", "face_id_remix": "face-id-remix-generation"}

HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(40)
GIF = b"GIF89a" + bytes(30)
NOISE = random.Random(0).randbytes(100)
IMAGES = {
    "jpeg": sample_image("jpeg"),
    "png": sample_image("png"),
    "webp": sample_image("webp"),
    "heic": HEIC,
}
JPEG = IMAGES["jpeg"]
TRAINING = {"gender": "woman", "model_type": "professional"}
IMAGE_URL = "https://example.com/face.jpg"

API: tuple[Endpoint, ...] = tuple(endpoint for endpoint in ENDPOINTS if endpoint != "download")
DOCUMENTED_COSTS: dict[Endpoint, int] = {
    "create_model": 50,
    "extend_model": 20,
    "generate": 1,
    "upscale": 3,
    "remix": 1,
    "face_id_remix": 1,
}
JSON = {"Content-Type": "application/json"}
MULTIPART = {"Content-Type": "multipart/form-data; boundary=xyz"}
IMAGE_KEYS = {
    "id",
    "file_name",
    "model_id",
    "image_url",
    "prompt",
    "negative_prompt",
    "upscaled",
    "ratio",
}
REMIX_KEYS = {"id", "file_name", "status", "created_at", "image_url"}
FILE_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.jpeg")
ISO_SECONDS = "%Y-%m-%dT%H:%M:%SZ"

Call = tuple[str, str, dict[str, Any]]  # method, path (or URL), aiohttp keyword arguments
File = tuple[str, str, bytes]  # form field, filename, content


# --------------------------------------------------------------------------- helpers


def post(path: str, **kwargs: Any) -> Call:
    return "POST", path, kwargs


def get(path: str) -> Call:
    return "GET", path, {}


def form(*files: File, **fields: str) -> aiohttp.FormData:
    """A multipart body (even without files) of text `fields` and `files`."""
    data = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        data.add_field(name, value)
    for name, filename, content in files:
        data.add_field(name, content, filename=filename, content_type="application/octet-stream")
    return data


def raw_part(name: str, value: bytes, *, header: bytes = b"") -> bytes:
    """One hand-made part of a multipart body with boundary `xyz` (see MULTIPART)."""
    disposition = f'Content-Disposition: form-data; name="{name}"'.encode()
    return b"--xyz\r\n" + disposition + header + b"\r\n\r\n" + value + b"\r\n"


async def stream(data: bytes) -> AsyncIterator[bytes]:
    """`data` as a chunked body, without Content-Length."""
    for start in range(0, len(data), 512):
        yield data[start : start + 512]


@attrs.frozen
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]

    @property
    def request_id(self) -> str:
        return self.headers["x-request-id"]

    @property
    def detail(self) -> Any:
        return self.body["detail"]


async def send(http: aiohttp.ClientSession, call: Call) -> Reply:
    """Make `call`; every answer must be JSON, below 500 and carry an x-request-id."""
    method, path, kwargs = call
    async with http.request(method, path, **kwargs) as response:
        text = await response.text()
        assert response.status < 500, f"{method} {path}: {response.status} {text}"
        assert response.content_type == "application/json", text
        assert response.headers.get("x-request-id"), "no x-request-id"
        return Reply(response.status, json.loads(text), response.headers)


async def ok(http: aiohttp.ClientSession, call: Call) -> Any:
    reply = await send(http, call)
    assert reply.status == 200, reply.body
    return reply.body


async def rejected(
    mock: MockDeepMode, http: aiohttp.ClientSession, call: Call, status: int
) -> Reply:
    """Make `call`, which must fail with `status` and `{"detail": ...}` and change nothing."""

    def state() -> tuple[int, ...]:
        counts = (mock.ledger, mock.models, mock.images, mock.remixes, mock.callbacks)
        return (mock.balance, *map(len, counts))

    before = state()
    reply = await send(http, call)
    assert reply.status == status, reply.body
    assert list(reply.body) == ["detail"]
    assert state() == before
    [record] = [r for r in mock.requests if r.request_id == reply.request_id]
    assert record.status == status
    return reply


def problems(detail: Any) -> dict[str, str]:
    """A FastAPI 422 detail list as {"field" or "field.index": error type}."""
    assert isinstance(detail, list)
    found = {}
    for item in detail:
        assert set(item) == {"type", "loc", "msg", "input"}
        assert item["loc"][0] == "body"
        assert isinstance(item["msg"], str)
        found[".".join(map(str, item["loc"][1:]))] = item["type"]
    return found


@asynccontextmanager
async def serve(**options: Any) -> AsyncIterator[tuple[MockDeepMode, aiohttp.ClientSession]]:
    """A mock with `options` and an authenticated session for it."""
    async with MockDeepMode(callback_backoff=0.01, **options) as mock:
        headers = {"Authorization": f"Bearer {mock.api_key}"}
        async with aiohttp.ClientSession(mock.base_url, headers=headers) as http:
            yield mock, http


async def generated(http: aiohttp.ClientSession, model_id: str, **options: Any) -> Any:
    """The first image of a sync generation."""
    body = {"model_id": model_id, "prompt": "a portrait", **options}
    return (await ok(http, post(GENERATE, json=body)))["images"][0]


async def valid_call(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    endpoint: Endpoint,
    *,
    model: str | None = None,
    **changes: Any,
) -> Call:
    """A call of `endpoint` that succeeds, its body fields changed by `changes`.

    A change to None drops the field (or file); a change naming a file field sends it
    as a text field instead. The model used is `model`, or a fresh trained one.
    """
    model_id = model or mock.add_model().id
    files: list[File] = []
    fields: dict[str, Any]
    match endpoint:
        case "create_model":
            fields, files = dict(TRAINING), [("images", "face.jpg", JPEG)]
        case "extend_model":
            return post(f"/api/models/{model_id}/extend")
        case "generate":
            fields = {"model_id": model_id, "prompt": "a portrait"}
        case "retrieve_image":
            return get(f"/api/images/{(await generated(http, model_id))['id']}")
        case "upscale":
            fields = {"image_id": (await generated(http, model_id))["id"]}
        case "remix" | "face_id_remix":
            fields = {"model_id": model_id} if endpoint == "remix" else {}
            files = [(name, f"{name}.png", IMAGES["png"]) for name in REMIX_IMAGES[endpoint]]
        case _:
            return get(BALANCE)
    fields = {name: value for name, value in {**fields, **changes}.items() if value is not None}
    files = [file for file in files if file[0] not in changes]
    if endpoint in ("generate", "upscale"):
        return post(GENERATE if endpoint == "generate" else UPSCALE, json=fields)
    path = MODELS if endpoint == "create_model" else REMIX_PATHS[endpoint]
    return post(path, data=form(*files, **fields))


def check_image(mock: MockDeepMode, image: Any, **expected: Any) -> None:
    """`image` is a documented Image, stored by the mock, served by its image host."""
    assert set(image) == IMAGE_KEYS
    assert re.fullmatch(r"[0-9a-f]{21}", image["id"])
    assert FILE_NAME.fullmatch(image["file_name"])
    blob = f"{mock.blob_base_url}/deepmode-user-image/{image['file_name']}?st="
    assert image["image_url"].startswith(blob)
    assert image["id"] in mock.images
    assert {key: image[key] for key in expected} == expected


def check_remix(mock: MockDeepMode, remix: Any, endpoint: str, status: str) -> None:
    assert set(remix) == REMIX_KEYS
    assert re.fullmatch(r"[0-9a-f]{24}", remix["id"])
    assert FILE_NAME.fullmatch(remix["file_name"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", remix["created_at"])
    blob = f"{mock.blob_base_url}/{REMIX_CONTAINERS[endpoint]}/{remix['file_name']}?st="
    assert remix["image_url"].startswith(blob)
    assert remix["status"] == status
    assert mock.remixes[remix["id"]].kind == endpoint


async def download(plain: aiohttp.ClientSession, url: str) -> int:
    """The image host's status for `url`, sent byte for byte as signed."""
    async with plain.get(URL(url, encoded=True)) as response:
        await response.read()
        return response.status


# --------------------------------------------------------------------------- 1. shapes


@pytest.mark.parametrize(
    "formats",
    [["jpeg"], ["png"], ["webp"], ["heic"], ["jpeg", "png", "webp", "heic"] * 7 + ["png", "heic"]],
    ids=["jpeg", "png", "webp", "heic", "30-mixed"],
)
async def test_create_model_from_uploads(
    mock: MockDeepMode, http: aiohttp.ClientSession, formats: list[str]
) -> None:
    files = [("images", f"{index}.{fmt}", IMAGES[fmt]) for index, fmt in enumerate(formats)]
    body = await ok(http, post(MODELS, data=form(*files, name="Ann", **TRAINING)))
    assert body == {"message": "Created model successfully"}
    [model] = mock.models.values()
    assert (model.name, model.gender, model.model_type) == ("Ann", "woman", "professional")
    assert model.image_count == len(formats)
    assert [upload.format for upload in mock.requests[-1].files] == formats
    await eventually(lambda: model.active)


@pytest.mark.parametrize("count", [1, 30])
async def test_create_model_from_image_urls(
    mock: MockDeepMode, http: aiohttp.ClientSession, count: int
) -> None:
    body = {"image_urls": [f"https://example.com/{i}.jpg" for i in range(count)], **TRAINING}
    assert await ok(http, post(MODELS, json=body)) == {"message": "Created model successfully"}
    [model] = mock.models.values()
    assert (model.name, model.image_count) == (None, count)
    await eventually(lambda: model.active)


async def test_extend_adds_30_days(mock: MockDeepMode, http: aiohttp.ClientSession) -> None:
    model = mock.add_model()
    expected = model.expire_at + dt.timedelta(days=30)
    body = await ok(http, post(f"/api/models/{model.id}/extend"))
    assert body == {"updated_expire_at": expected.strftime(ISO_SECONDS)}
    assert model.expire_at == expected


@pytest.mark.parametrize(
    ("options", "count", "echoed"),
    [
        ({}, 1, {"negative_prompt": None, "upscaled": False, "ratio": "portrait"}),
        (
            {"negative_prompt": "blurry", "num_images": 8, "upscale": True, "ratio": "square"},
            8,
            {"negative_prompt": "blurry", "upscaled": True, "ratio": "square"},
        ),
    ],
    ids=["defaults", "all-options"],
)
async def test_generate_sync(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    options: dict[str, Any],
    count: int,
    echoed: dict[str, Any],
) -> None:
    model = mock.add_model()
    body = await ok(http, post(GENERATE, json={"model_id": model.id, "prompt": "a cat", **options}))
    assert list(body) == ["images"]
    assert len(body["images"]) == count
    assert len({image["id"] for image in body["images"]}) == count
    for image in body["images"]:
        check_image(mock, image, model_id=model.id, prompt="a cat", **echoed)


async def test_retrieve_signs_a_fresh_url(
    mock: MockDeepMode, http: aiohttp.ClientSession, plain: aiohttp.ClientSession
) -> None:
    image = await generated(http, mock.add_model().id)
    assert await download(plain, image["image_url"]) == 200
    mock.advance_clock(3601)
    assert await download(plain, image["image_url"]) == 403
    fresh = await ok(http, get(f"/api/images/{image['id']}"))
    assert fresh["image_url"] != image["image_url"]
    assert fresh == {**image, "image_url": fresh["image_url"]}
    assert await download(plain, fresh["image_url"]) == 200


async def test_upscale_sync(mock: MockDeepMode, http: aiohttp.ClientSession) -> None:
    source = await generated(http, mock.add_model().id, ratio="square", negative_prompt="dark")
    body = await ok(http, post(UPSCALE, json={"image_id": source["id"]}))
    same = {key: source[key] for key in ("model_id", "prompt", "negative_prompt", "ratio")}
    check_image(mock, body, upscaled=True, **same)
    assert body["id"] != source["id"]


@pytest.mark.parametrize("endpoint", ["remix", "face_id_remix"])
async def test_remix_sync(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    plain: aiohttp.ClientSession,
    endpoint: Endpoint,
) -> None:
    remix = await ok(http, await valid_call(mock, http, endpoint, prompt="oil", mode="sync"))
    check_remix(mock, remix, endpoint, "completed")
    assert await download(plain, remix["image_url"]) == 200


@pytest.mark.parametrize("endpoint", ["remix", "face_id_remix"])
async def test_remix_async_answers_before_the_image_exists(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    plain: aiohttp.ClientSession,
    endpoint: Endpoint,
) -> None:
    mock.set_latency(endpoint, 30)
    method, path, kwargs = await valid_call(mock, http, endpoint, mode="async")
    kwargs["timeout"] = aiohttp.ClientTimeout(total=3)  # far less than the latency
    remix = await ok(http, (method, path, kwargs))
    check_remix(mock, remix, endpoint, "processing")
    assert await download(plain, remix["image_url"]) == 404
    mock.advance_clock(31)
    assert await download(plain, remix["image_url"]) == 200


async def test_check_balance(mock: MockDeepMode, http: aiohttp.ClientSession) -> None:
    assert await ok(http, get(BALANCE)) == {"remaining_balance": 10_000}
    mock.balance = 4234
    assert await ok(http, get(BALANCE)) == {"remaining_balance": 4234}


# --------------------------------------------------------------------------- 2. callbacks


async def test_create_model_callback_posts_the_trained_model(
    mock: MockDeepMode, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    mock.training_delay = 1.0  # long enough to look before it ends, on a loaded machine too
    data = form(("images", "face.jpg", JPEG), name="Ann", callback=receiver.url, **TRAINING)
    assert await ok(http, post(MODELS, data=data)) == {"message": "Created model successfully"}
    [model] = mock.models.values()
    assert not model.active
    posted = await receiver.next_body()
    assert model.active
    assert posted == {
        "id": model.id,
        "name": "Ann",
        "gender": "woman",
        "active": True,
        "created_at": model.created_at.strftime(ISO_SECONDS),
        "expire_at": (model.created_at + dt.timedelta(days=30)).strftime(ISO_SECONDS),
    }
    await eventually(lambda: mock.callbacks[0].finished)
    assert mock.callbacks == [CallbackDelivery("model", receiver.url, posted, ["200"], True, True)]


async def test_generate_callback(
    mock: MockDeepMode, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    mock.set_latency("generate", 1.0)  # the callback must not have come when we look
    call = await valid_call(mock, http, "generate", num_images=2, callback=receiver.url)
    assert await ok(http, call) == {"message": "Generating images..."}
    assert receiver.bodies == []
    posted = await receiver.next_body()
    assert list(posted) == ["images"]
    assert len(posted["images"]) == 2
    for image in posted["images"]:
        check_image(mock, image, prompt="a portrait", upscaled=False)
    await eventually(lambda: mock.callbacks[0].delivered)
    assert mock.callbacks[0].kind == "generation"


async def test_upscale_callback(
    mock: MockDeepMode, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    mock.set_latency("upscale", 1.0)
    call = await valid_call(mock, http, "upscale", callback=receiver.url)
    assert await ok(http, call) == {"message": "Upscaling images..."}
    assert receiver.bodies == []
    check_image(mock, await receiver.next_body(), prompt="a portrait", upscaled=True)
    await eventually(lambda: mock.callbacks[0].delivered)
    assert mock.callbacks[0].kind == "upscale"


async def test_callback_is_retried_until_delivered(
    mock: MockDeepMode, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses = [500, 500]
    await ok(http, await valid_call(mock, http, "generate", callback=receiver.url))
    posted = await receiver.next_body()
    await eventually(lambda: mock.callbacks[0].finished)
    [delivery] = mock.callbacks
    assert delivery.attempts == ["500", "500", "200"]
    assert delivery.delivered
    assert delivery.body == posted


@pytest.fixture
def closed_url() -> str:
    """A callback URL on a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/callback"


@pytest.mark.parametrize("target", ["failing", "unreachable"])
async def test_callback_gives_up_after_the_retries(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    closed_url: str,
    target: str,
) -> None:
    receiver.statuses = [503] * 4
    url = receiver.url if target == "failing" else closed_url
    await ok(http, await valid_call(mock, http, "generate", callback=url))
    await eventually(lambda: bool(mock.callbacks) and mock.callbacks[0].finished)
    [delivery] = mock.callbacks
    assert (delivery.url, delivery.delivered, len(delivery.attempts)) == (url, False, 4)
    if target == "failing":
        assert delivery.attempts == ["503"] * 4
    else:
        assert all(attempt.startswith("ClientConnectorError") for attempt in delivery.attempts)
    assert receiver.bodies == []
    assert await ok(http, get(BALANCE)) == {"remaining_balance": mock.balance}


# --------------------------------------------------------------------------- 3. rules


def rule(endpoint: str, changes: dict[str, Any], expected: dict[str, str]) -> Any:
    """A case of test_field_rules, named after what it changes."""
    name = ",".join(f"{field}={value!r}" for field, value in changes.items())
    return pytest.param(endpoint, changes, expected, id=f"{endpoint}:{name}")


FIELD_RULES = [
    rule("create_model", {"gender": "other"}, {"gender": "enum"}),
    rule("create_model", {"model_type": "pro"}, {"model_type": "enum"}),
    rule(
        "create_model",
        {"gender": None, "model_type": None},
        {"gender": "missing", "model_type": "missing"},
    ),
    rule("create_model", {"images": None}, {"images": "missing"}),
    rule("create_model", {"images": "face.jpg"}, {"images": "value_error"}),
    rule("create_model", {"callback": "not a url"}, {"callback": "url_parsing"}),
    rule("generate", {"ratio": "wide"}, {"ratio": "enum"}),
    rule("generate", {"num_images": 0}, {"num_images": "range"}),
    rule("generate", {"num_images": 9}, {"num_images": "range"}),
    rule("generate", {"num_images": "2"}, {"num_images": "int_type"}),
    rule("generate", {"num_images": True}, {"num_images": "int_type"}),
    rule("generate", {"upscale": "yes"}, {"upscale": "bool_type"}),
    rule("generate", {"prompt": ""}, {"prompt": "string_too_short"}),
    rule("generate", {"prompt": "  "}, {"prompt": "string_too_short"}),
    rule(
        "generate", {"model_id": None, "prompt": None}, {"model_id": "missing", "prompt": "missing"}
    ),
    rule("generate", {"callback": "ftp://example.com/cb"}, {"callback": "url_parsing"}),
    rule("upscale", {"image_id": None}, {"image_id": "missing"}),
    rule("upscale", {"callback": "http://"}, {"callback": "url_parsing"}),
    rule("remix", {"mode": "later"}, {"mode": "enum"}),
    rule(
        "remix",
        {"model_id": None, "artwork_image": None, "mask_image": None},
        {"model_id": "missing", "artwork_image": "missing", "mask_image": "missing"},
    ),
    rule("remix", {"mask_image": "mask.png"}, {"mask_image": "value_error"}),
    rule("face_id_remix", {"mode": "batch"}, {"mode": "enum"}),
    rule("face_id_remix", {"identity_image": None}, {"identity_image": "missing"}),
]


@pytest.mark.parametrize(("endpoint", "changes", "expected"), FIELD_RULES)
async def test_field_rules(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    endpoint: Endpoint,
    changes: dict[str, Any],
    expected: dict[str, str],
) -> None:
    call = await valid_call(mock, http, endpoint, **changes)
    detail = (await rejected(mock, http, call, 422)).detail
    assert problems(detail) == expected
    for item in detail:
        if item["type"] not in ("missing", "value_error"):
            assert item["input"] == changes[item["loc"][1]]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"image_urls": []}, {"image_urls": "too_short"}),
        ({"image_urls": [IMAGE_URL] * 31}, {"image_urls": "too_long"}),
        ({"image_urls": [IMAGE_URL, "face.jpg"]}, {"image_urls.1": "url_parsing"}),
        ({"image_urls": IMAGE_URL}, {"image_urls": "list_type"}),
        ({}, {"image_urls": "missing"}),
        ({"image_urls": [IMAGE_URL], "gender": "x"}, {"gender": "enum"}),
    ],
    ids=["0-urls", "31-urls", "not-a-url", "not-a-list", "no-urls", "bad-gender"],
)
async def test_create_model_json_rules(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    expected: dict[str, str],
) -> None:
    reply = await rejected(mock, http, post(MODELS, json={**TRAINING, **body}), 422)
    assert problems(reply.detail) == expected


async def test_create_model_takes_at_most_30_uploads(
    mock: MockDeepMode, http: aiohttp.ClientSession
) -> None:
    data = form(*[("images", "face.jpg", JPEG)] * 31, **TRAINING)
    reply = await rejected(mock, http, post(MODELS, data=data), 422)
    assert problems(reply.detail) == {"images": "too_long"}


@pytest.mark.parametrize(
    ("filename", "content"),
    [("anim.gif", GIF), ("noise.jpg", NOISE), ("empty.png", b"")],
    ids=["gif", "random-bytes", "empty"],
)
@pytest.mark.parametrize("endpoint", ["create_model", "remix", "face_id_remix"])
async def test_invalid_image_content_is_400_naming_it(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    endpoint: Endpoint,
    filename: str,
    content: bytes,
) -> None:
    # The bad file comes after a valid training image, or replaces the mask of a remix.
    field, number = ("images", 2) if endpoint == "create_model" else ("mask_image", 1)
    call = await valid_call(mock, http, endpoint, **({} if number == 2 else {field: None}))
    call[2]["data"].add_field(field, content, filename=filename)
    detail = (await rejected(mock, http, call, 400)).detail
    assert isinstance(detail, str)
    assert f"Image {number} ({filename!r}" in detail


@pytest.mark.parametrize(
    ("endpoint", "state", "status"),
    [
        ("generate", "unknown", 404),
        ("extend_model", "unknown", 404),
        ("remix", "unknown", 404),
        ("generate", "training", 409),
        ("remix", "training", 409),
        ("generate", "expired", 403),
        ("remix", "expired", 403),
    ],
)
async def test_model_must_exist_be_trained_and_unexpired(
    mock: MockDeepMode, http: aiohttp.ClientSession, endpoint: Endpoint, state: str, status: int
) -> None:
    model_id = "0" * 21
    if state != "unknown":
        model_id = mock.add_model(active=state != "training").id
    if state == "expired":
        mock.advance_clock(31 * 86400)
    call = await valid_call(mock, http, endpoint, model=model_id)
    detail = (await rejected(mock, http, call, status)).detail
    assert isinstance(detail, str)
    assert model_id in detail


@pytest.mark.parametrize(
    "call",
    [get("/api/images/0123456789abcdef01234"), post(UPSCALE, json={"image_id": "nope"})],
    ids=["retrieve", "upscale"],
)
async def test_unknown_image_is_404(
    mock: MockDeepMode, http: aiohttp.ClientSession, call: Call
) -> None:
    detail = (await rejected(mock, http, call, 404)).detail
    assert isinstance(detail, str)
    assert "not found" in detail


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        (None, "Not authenticated"),
        ("Basic mock-key", "Not authenticated"),
        ("Bearer nope", "Invalid API key"),
    ],
    ids=["none", "not-bearer", "wrong-key"],
)
@pytest.mark.parametrize("endpoint", API)
async def test_every_endpoint_needs_the_key(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    plain: aiohttp.ClientSession,
    endpoint: Endpoint,
    authorization: str | None,
    expected: str,
) -> None:
    method, path, kwargs = await valid_call(mock, http, endpoint)
    kwargs["headers"] = {} if authorization is None else {"Authorization": authorization}
    reply = await rejected(mock, plain, (method, mock.base_url + path, kwargs), 401)
    assert reply.detail == expected
    assert reply.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("call", "status", "allow"),
    [
        (get("/api/nope"), 404, None),
        (post("/api/models/abc/renew"), 404, None),
        (get(MODELS), 405, "POST"),
        (post(BALANCE), 405, "GET"),
        (("DELETE", "/api/images/abc", {}), 405, "GET"),
    ],
    ids=["unknown-get", "unknown-post", "get-models", "post-balance", "delete-image"],
)
async def test_unknown_path_and_wrong_method_answer_json(
    mock: MockDeepMode, http: aiohttp.ClientSession, call: Call, status: int, allow: str | None
) -> None:
    reply = await rejected(mock, http, call, status)
    assert reply.detail == {404: "Not Found", 405: "Method Not Allowed"}[status]
    assert reply.headers.get("Allow") == allow
    assert mock.requests[-1].endpoint is None


# --------------------------------------------------------------------------- 4. ledger


@pytest.mark.parametrize("endpoint", API)
async def test_each_accepted_call_is_charged_as_documented(
    mock: MockDeepMode, http: aiohttp.ClientSession, endpoint: Endpoint
) -> None:
    call = await valid_call(mock, http, endpoint)
    before, ledger = mock.balance, list(mock.ledger)
    reply = await send(http, call)
    assert reply.status == 200
    cost = DOCUMENTED_COSTS.get(endpoint, 0)
    charge = Charge(endpoint, cost, before - cost, reply.request_id)
    assert mock.ledger == ledger + ([charge] if cost else [])
    assert await ok(http, get(BALANCE)) == {"remaining_balance": before - cost}


async def test_check_balance_follows_the_ledger(
    mock: MockDeepMode, http: aiohttp.ClientSession
) -> None:
    for endpoint in DOCUMENTED_COSTS:
        await ok(http, await valid_call(mock, http, endpoint))
    balance = 10_000
    for charge in mock.ledger:
        balance -= charge.cost
        assert charge.balance_after == balance
    assert [charge.endpoint for charge in mock.ledger].count("generate") == 2  # 1 to upscale
    assert await ok(http, get(BALANCE)) == {"remaining_balance": balance}
    assert mock.balance == balance == 10_000 - sum(DOCUMENTED_COSTS.values()) - 1


@pytest.mark.parametrize("endpoint", DOCUMENTED_COSTS)
async def test_balance_short_of_the_cost_is_402(endpoint: Endpoint) -> None:
    cost = DOCUMENTED_COSTS[endpoint]
    async with serve(balance=cost - 1) as (mock, http):
        detail = (await rejected(mock, http, await valid_call(mock, http, endpoint), 402)).detail
        assert isinstance(detail, str)
        call = await valid_call(mock, http, endpoint)
        mock.balance = cost  # exactly enough
        reply = await send(http, call)
        assert reply.status == 200
        assert mock.ledger[-1] == Charge(endpoint, cost, 0, reply.request_id)


async def test_costs_can_be_overridden() -> None:
    async with serve(balance=10, costs={"generate": 4}) as (mock, http):
        model_id = mock.add_model().id
        for _ in range(2):
            await ok(http, await valid_call(mock, http, "generate", model=model_id))
        assert [(c.cost, c.balance_after) for c in mock.ledger] == [(4, 6), (4, 2)]
        await rejected(mock, http, await valid_call(mock, http, "generate"), 402)
        await rejected(mock, http, await valid_call(mock, http, "extend_model"), 402)
        assert await ok(http, get(BALANCE)) == {"remaining_balance": 2}


# --------------------------------------------------------------------------- 5. malformed


NO_BOUNDARY = {"Content-Type": "multipart/form-data"}
GZIP_JSON = {**JSON, "Content-Encoding": "gzip"}
GZIP_MULTIPART = {**MULTIPART, "Content-Encoding": "gzip"}
END = b"--xyz--\r\n"
MALFORMED = {
    "json-invalid": (post(GENERATE, data=b'{"model_id": ', headers=JSON), 422),
    "json-empty": (post(GENERATE, data=b"", headers=JSON), 422),
    "json-not-utf8": (post(GENERATE, data=b"\xff\xfe", headers=JSON), 422),
    "json-array": (post(GENERATE, json=["model_id"]), 422),
    "json-string": (post(UPSCALE, json="image_id"), 422),
    "json-null": (post(MODELS, data=b"null", headers=JSON), 422),
    "json-too-deep": (post(GENERATE, data=b"[" * 100_000, headers=JSON), 422),
    "json-bad-gzip": (post(GENERATE, data=b"{}", headers=GZIP_JSON), 400),
    "text-plain": (post(GENERATE, data=b"{}", headers={"Content-Type": "text/plain"}), 415),
    "urlencoded": (post(UPSCALE, data={"image_id": "x"}), 415),
    "urlencoded-to-models": (post(MODELS, data={"gender": "woman"}), 415),
    "json-to-remix": (post(REMIX, json={"model_id": "x"}), 415),
    "json-to-face-id": (post(FACE_ID, json={}), 415),
    "multipart-no-boundary": (post(MODELS, data=b"--x\r\n\r\n", headers=NO_BOUNDARY), 400),
    "multipart-garbage": (post(MODELS, data=b"garbage", headers=MULTIPART), 400),
    "multipart-truncated": (post(REMIX, data=raw_part("prompt", b"x"), headers=MULTIPART), 400),
    "multipart-not-utf8": (post(REMIX, data=raw_part("a", b"\xff") + END, headers=MULTIPART), 400),
    "multipart-bad-part-header": (
        post(REMIX, data=b"--xyz\r\nno colon\r\n\r\nx\r\n" + END, headers=MULTIPART),
        400,
    ),
    "multipart-long-part-header": (
        post(
            REMIX,
            data=raw_part("a", b"x", header=b"; x=" + b"x" * 100_000) + END,
            headers=MULTIPART,
        ),
        400,
    ),
    "multipart-bad-gzip": (post(MODELS, data=END, headers=GZIP_MULTIPART), 400),
    "multipart-unnamed-part": (
        post(MODELS, data=b"--xyz\r\n\r\nx\r\n" + END, headers=MULTIPART),
        422,
    ),
}


@pytest.mark.parametrize(("call", "status"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_requests_get_a_4xx_with_detail(
    mock: MockDeepMode, http: aiohttp.ClientSession, call: Call, status: int
) -> None:
    await rejected(mock, http, call, status)


@pytest.mark.parametrize(
    "build",
    ["json", "json-streamed", "upload", "upload-streamed"],
)
async def test_bodies_over_the_limits_are_413(build: str) -> None:
    async with serve(max_json_size=200, max_upload_size=2000) as (mock, http):
        model_id = mock.add_model().id
        small = {"model_id": model_id, "prompt": "x" * 100}
        await ok(http, post(GENERATE, json=small))  # within the limit
        if build.startswith("json"):
            raw = json.dumps({**small, "prompt": "x" * 200}).encode()
            call = post(GENERATE, data=raw, headers=JSON)
        else:
            await ok(http, await valid_call(mock, http, "create_model"))  # within the limit
            parts = raw_part("gender", b"woman") + raw_part("model_type", b"amateur")
            image = sample_image("jpeg", size=3000)
            raw = parts + raw_part("images", image, header=b'; filename="big.jpg"') + b"--xyz--\r\n"
            call = post(MODELS, data=raw, headers=MULTIPART)
        if build.endswith("streamed"):
            call[2]["data"] = stream(call[2]["data"])
        assert isinstance((await rejected(mock, http, call, 413)).detail, str)


@pytest.mark.parametrize(("size", "status"), [(64 * 1024, 200), (64 * 1024 + 1, 413)])
async def test_text_fields_are_limited_to_64_kib(
    mock: MockDeepMode, http: aiohttp.ClientSession, size: int, status: int
) -> None:
    call = await valid_call(mock, http, "remix", prompt="x" * size)
    if status == 200:
        await ok(http, call)
    else:
        await rejected(mock, http, call, status)


async def test_more_than_100_form_parts_is_413(
    mock: MockDeepMode, http: aiohttp.ClientSession
) -> None:
    extra = {f"extra{index}": "x" for index in range(100)}
    await rejected(mock, http, await valid_call(mock, http, "remix", **extra), 413)


# --------------------------------------------------------------------------- 6. inspection


async def test_requests_record_a_multipart_call(
    mock: MockDeepMode, http: aiohttp.ClientSession
) -> None:
    data = form(("images", "a.jpg", JPEG), ("images", "b.heic", HEIC), name="Ann", **TRAINING)
    reply = await send(http, post(MODELS, data=data))
    [record] = mock.requests
    assert (record.method, record.path, record.endpoint) == ("POST", MODELS, "create_model")
    assert (record.status, record.request_id, record.json) == (200, reply.request_id, None)
    assert record.form == {"name": "Ann", **TRAINING}
    octets = "application/octet-stream"
    assert record.files == [
        UploadedFile("images", "a.jpg", octets, len(JPEG), "jpeg"),
        UploadedFile("images", "b.heic", octets, len(HEIC), "heic"),
    ]
    assert record.headers["Authorization"] == "[redacted]"


async def test_requests_record_json_calls_and_rejections(
    mock: MockDeepMode, http: aiohttp.ClientSession, plain: aiohttp.ClientSession
) -> None:
    body = {"model_id": "nope", "prompt": "a cat"}
    replies = [
        await send(http, post(GENERATE, json=body)),
        await send(plain, get(mock.base_url + BALANCE)),
        await send(http, get(f"/api/images/{'0' * 21}")),
    ]
    seen = [(r.method, r.path, r.endpoint, r.status, r.json) for r in mock.requests]
    assert seen == [
        ("POST", GENERATE, "generate", 404, body),
        ("GET", BALANCE, "balance", 401, None),
        ("GET", f"/api/images/{'0' * 21}", "retrieve_image", 404, None),
    ]
    assert [r.request_id for r in mock.requests] == [reply.request_id for reply in replies]
    assert len({reply.request_id for reply in replies}) == 3
    assert "Authorization" not in mock.requests[1].headers


async def test_the_api_key_never_reaches_the_records() -> None:
    secret = "sk-live-0123456789abcdef"
    async with serve(api_key=secret) as (mock, http):
        await ok(http, get(BALANCE))
        await ok(http, await valid_call(mock, http, "generate"))
        assert len(mock.requests) == 2
        assert all(r.headers["Authorization"] == "[redacted]" for r in mock.requests)
        assert secret not in repr(mock.requests)
        extra = {"Cookie": f"session={secret}", "Proxy-Authorization": f"Basic {secret}"}
        async with http.get(BALANCE, headers=extra) as response:
            assert response.status == 200
        last = mock.requests[-1]
        assert last.headers["Cookie"] == last.headers["Proxy-Authorization"] == "[redacted]"
        assert secret not in repr(mock.requests)


# --------------------------------------------------------------------------- fetched URLs


async def test_fetch_image_urls_rejects_what_is_not_a_reachable_image(
    http: aiohttp.ClientSession,
) -> None:
    async with MockDeepMode(fetch_image_urls=True) as fetching:
        model = fetching.add_model()
        headers = {"Authorization": f"Bearer {fetching.api_key}"}
        async with aiohttp.ClientSession(fetching.base_url, headers=headers) as api:
            async with api.post(GENERATE, json={"model_id": model.id, "prompt": "p"}) as response:
                image_url = (await response.json())["images"][0]["image_url"]
            with socket.socket() as closed:
                closed.bind(("127.0.0.1", 0))
                unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}/face.jpg"
            cases = {
                "a real image": ([image_url], 200, None),
                "not an image": ([image_url, f"{fetching.base_url}{BALANCE}"], 400, "URL 2"),
                "unreachable": ([unreachable], 400, "could not be fetched"),
            }
            for name, (urls, status, detail) in cases.items():
                body = {**TRAINING, "image_urls": urls}
                async with api.post(MODELS, json=body) as response:
                    assert response.status == status, name
                    if detail is not None:
                        assert detail in (await response.json())["detail"], name
            assert [charge.endpoint for charge in fetching.ledger] == ["generate", "create_model"]


async def test_a_url_that_does_not_parse_is_422(http: aiohttp.ClientSession) -> None:
    body = {**TRAINING, "image_urls": ["http://[::1/face.jpg"]}
    async with http.post(MODELS, json=body) as response:
        assert response.status == 422
        assert (await response.json())["detail"][0]["type"] == "url_parsing"
