"""Every endpoint through `AsyncClient` against the mock: results, wire format, charges, uploads."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import pathlib
import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import aiohttp
import attrs
import pytest
from conftest import Receiver, eventually
from yarl import URL

from deepmode_async import (
    Accepted,
    AsyncClient,
    Balance,
    Gender,
    Generation,
    Image,
    ModelCreated,
    ModelExtension,
    ModelType,
    NotFoundError,
    Ratio,
    RemixMode,
    RemixResult,
    _uploads,
)
from deepmode_async._uploads import ImageInput
from deepmode_async.testing import MockDeepMode, RecordedRequest, UploadedFile
from deepmode_async.testing._samples import sample_image

pytestmark = [pytest.mark.anyio, pytest.mark.dm(max_retries=0, fast=False)]

JPEG = sample_image("jpeg")
PNG = sample_image("png")
WEBP = sample_image("webp")
TRAINING: dict[str, Any] = {"gender": "woman", "model_type": "amateur"}


# --------------------------------------------------------------------------- helpers


def header(record: RecordedRequest, name: str) -> str | None:
    """A recorded request's header, looked up regardless of case."""
    found = [value for key, value in record.headers.items() if key.lower() == name.lower()]
    return found[0] if found else None


def assert_sized_body(record: RecordedRequest) -> None:
    """The request had a Content-Length and was not sent with chunked encoding."""
    length = header(record, "Content-Length")
    assert length is not None, record.headers
    assert int(length) > 0
    assert header(record, "Transfer-Encoding") is None, record.headers


def charged(mock: MockDeepMode) -> list[str]:
    return [charge.endpoint for charge in mock.ledger]


def last(mock: MockDeepMode) -> RecordedRequest:
    return mock.requests[-1]


async def fetch(plain: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    """GET a signed URL byte for byte, without credentials."""
    async with plain.get(URL(url, encoded=True)) as response:
        return response.status, await response.read()


async def one_image(dm: AsyncClient, mock: MockDeepMode, **options: Any) -> Image:
    model = mock.add_model()
    generation: Generation = await dm.images.generate(
        model_id=model.id, prompt="a lighthouse", **options
    )
    return generation.images[0]


def write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- account


async def test_balance(dm: AsyncClient, mock: MockDeepMode) -> None:
    assert await dm.account.balance() == Balance(remaining_balance=10_000)
    record = last(mock)
    assert (record.endpoint, record.method, record.path) == ("balance", "GET", "/api/check-balance")
    assert record.headers["Authorization"] == "[redacted]"
    await one_image(dm, mock)
    assert await dm.account.balance() == Balance(remaining_balance=9_999)
    assert charged(mock) == ["generate"]


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("gender", "model_type"),
    [(Gender.MAN, ModelType.PROFESSIONAL), ("man", "professional")],
    ids=["enums", "strings"],
)
async def test_create_model_from_files(
    dm: AsyncClient,
    mock: MockDeepMode,
    receiver: Receiver,
    tmp_path: pathlib.Path,
    gender: Gender | str,
    model_type: ModelType | str,
) -> None:
    path = write(tmp_path / "face.jpg", JPEG)
    result = await dm.models.create(
        images=[path, PNG, ("side.webp", WEBP)],
        gender=gender,
        model_type=model_type,
        name="Ann",
        callback=receiver.url,
    )
    assert result == ModelCreated(message="Created model successfully")
    record = last(mock)
    assert (record.endpoint, record.method, record.status) == ("create_model", "POST", 200)
    assert (header(record, "Content-Type") or "").startswith("multipart/form-data; boundary=")
    assert record.json is None
    assert record.form == {
        "gender": "man",
        "model_type": "professional",
        "name": "Ann",
        "callback": receiver.url,
    }
    assert record.files == [
        UploadedFile("images", "face.jpg", "image/jpeg", len(JPEG), "jpeg"),
        UploadedFile("images", "image.png", "image/png", len(PNG), "png"),
        UploadedFile("images", "side.webp", "image/webp", len(WEBP), "webp"),
    ]
    assert_sized_body(record)
    assert charged(mock) == ["create_model"]
    [model] = mock.models.values()
    assert (model.name, model.gender, model.model_type, model.image_count) == (
        "Ann",
        "man",
        "professional",
        3,
    )
    body = await receiver.next_body()
    assert body == {**model.to_json(), "active": True}
    assert body["id"] == model.id


@pytest.mark.parametrize(
    ("gender", "model_type"),
    [(Gender.WOMAN, ModelType.AMATEUR), ("woman", "amateur")],
    ids=["enums", "strings"],
)
async def test_create_model_from_image_urls(
    dm: AsyncClient,
    mock: MockDeepMode,
    receiver: Receiver,
    gender: Gender | str,
    model_type: ModelType | str,
) -> None:
    urls = [f"https://example.com/photos/{index}.jpg?size=large" for index in range(3)]
    result = await dm.models.create(
        image_urls=iter(urls),  # any iterable will do
        gender=gender,
        model_type=model_type,
        name="Bo",
        callback=receiver.url,
    )
    assert result == ModelCreated(message="Created model successfully")
    record = last(mock)
    assert (record.endpoint, record.status) == ("create_model", 200)
    assert header(record, "Content-Type") == "application/json"
    assert record.json == {
        "gender": "woman",
        "model_type": "amateur",
        "name": "Bo",
        "callback": receiver.url,
        "image_urls": urls,
    }
    assert record.files == []
    assert record.form == {}
    assert charged(mock) == ["create_model"]
    [model] = mock.models.values()
    assert (model.name, model.image_count) == ("Bo", 3)
    body = await receiver.next_body()
    assert (body["id"], body["name"], body["gender"], body["active"]) == (
        model.id,
        "Bo",
        "woman",
        True,
    )


async def test_create_model_without_name_or_callback(dm: AsyncClient, mock: MockDeepMode) -> None:
    await dm.models.create(images=[JPEG], **TRAINING)
    assert last(mock).form == {"gender": "woman", "model_type": "amateur"}
    await dm.models.create(image_urls=["http://example.com/a.png"], **TRAINING)
    assert last(mock).json == {
        "gender": "woman",
        "model_type": "amateur",
        "image_urls": ["http://example.com/a.png"],
    }
    assert [model.name for model in mock.models.values()] == [None, None]
    assert charged(mock) == ["create_model", "create_model"]
    await asyncio.sleep(0.05)  # training has had time to finish: nothing was POSTed anywhere
    assert mock.callbacks == []


async def test_extend_adds_30_days(dm: AsyncClient, mock: MockDeepMode) -> None:
    model = mock.add_model()
    before = model.expire_at
    result = await dm.models.extend(model.id)
    assert isinstance(result, ModelExtension)
    expire = result.updated_expire_at
    assert expire.tzinfo is not None
    assert expire.utcoffset() == dt.timedelta(0)
    assert expire == (before + dt.timedelta(days=30)).replace(microsecond=0)
    assert mock.models[model.id].expire_at == before + dt.timedelta(days=30)
    record = last(mock)
    assert (record.endpoint, record.method, record.path, record.status) == (
        "extend_model",
        "POST",
        f"/api/models/{model.id}/extend",
        200,
    )
    assert charged(mock) == ["extend_model"]
    assert mock.ledger[0].cost == 20


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize(
    ("options", "sent", "expected"),
    [
        (
            {},
            {"num_images": 1, "upscale": False, "ratio": "portrait"},
            {"negative_prompt": None, "upscaled": False, "ratio": Ratio.PORTRAIT},
        ),
        (
            {"negative_prompt": "blurry", "num_images": 8, "upscale": True, "ratio": Ratio.SQUARE},
            {"negative_prompt": "blurry", "num_images": 8, "upscale": True, "ratio": "square"},
            {"negative_prompt": "blurry", "upscaled": True, "ratio": Ratio.SQUARE},
        ),
        (
            {"num_images": 3, "ratio": "square", "negative_prompt": ""},
            {"negative_prompt": "", "num_images": 3, "upscale": False, "ratio": "square"},
            {"negative_prompt": "", "upscaled": False, "ratio": Ratio.SQUARE},
        ),
        (
            {"ratio": "portrait", "num_images": 2},
            {"num_images": 2, "upscale": False, "ratio": "portrait"},
            {"negative_prompt": None, "upscaled": False, "ratio": Ratio.PORTRAIT},
        ),
    ],
    ids=["defaults", "all-options-enum", "ratio-string", "portrait-string"],
)
async def test_generate_sync(
    dm: AsyncClient,
    mock: MockDeepMode,
    plain: aiohttp.ClientSession,
    options: dict[str, Any],
    sent: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    model = mock.add_model()
    generation = await dm.images.generate(model_id=model.id, prompt="a lighthouse", **options)
    assert isinstance(generation, Generation)
    assert isinstance(generation.images, tuple)
    assert len(generation.images) == sent["num_images"]
    assert len({image.id for image in generation.images}) == sent["num_images"]
    for image in generation.images:
        assert isinstance(image, Image)
        assert (image.model_id, image.prompt) == (model.id, "a lighthouse")
        got = {"negative_prompt": image.negative_prompt, "upscaled": image.upscaled}
        assert {**got, "ratio": image.ratio} == expected
        assert isinstance(image.ratio, Ratio)
        assert image.id in mock.images
        assert image.file_name == mock.images[image.id].file_name
        assert image.image_url.startswith(f"{mock.blob_base_url}/deepmode-user-image/")
    record = last(mock)
    assert (record.endpoint, record.status) == ("generate", 200)
    assert header(record, "Content-Type") == "application/json"
    assert record.json == {"model_id": model.id, "prompt": "a lighthouse", **sent}
    assert charged(mock) == ["generate"]  # one charge, however many images
    status, data = await fetch(plain, generation.images[0].image_url)
    assert (status, data) == (200, mock.image_bytes)


async def test_generate_callback_mode(
    dm: AsyncClient, mock: MockDeepMode, receiver: Receiver
) -> None:
    model = mock.add_model()
    accepted = await dm.images.generate(
        model_id=model.id, prompt="a fox", num_images=2, ratio=Ratio.SQUARE, callback=receiver.url
    )
    assert accepted == Accepted(message="Generating images...")
    assert last(mock).json == {
        "model_id": model.id,
        "prompt": "a fox",
        "num_images": 2,
        "upscale": False,
        "ratio": "square",
        "callback": receiver.url,
    }
    body = await receiver.next_body()
    assert list(body) == ["images"]
    assert len(body["images"]) == 2
    for image in body["images"]:
        assert (image["model_id"], image["prompt"], image["ratio"]) == (model.id, "a fox", "square")
        assert image["id"] in mock.images
    assert charged(mock) == ["generate"]


# --------------------------------------------------------------------------- retrieve


async def test_retrieve_gives_a_fresh_signed_url(
    dm: AsyncClient, mock: MockDeepMode, plain: aiohttp.ClientSession
) -> None:
    image = await one_image(dm, mock, negative_prompt="dark")
    mock.advance_clock(5)  # a later signature
    fresh = await dm.images.retrieve(image.id)
    assert isinstance(fresh, Image)
    assert fresh.image_url != image.image_url
    assert attrs.evolve(fresh, image_url=image.image_url) == image
    assert fresh.image_url.split("?")[0] == image.image_url.split("?")[0]
    record = last(mock)
    assert (record.endpoint, record.method, record.path) == (
        "retrieve_image",
        "GET",
        f"/api/images/{image.id}",
    )
    assert (await fetch(plain, fresh.image_url)) == (200, mock.image_bytes)
    assert charged(mock) == ["generate"]  # retrieving is free


# --------------------------------------------------------------------------- upscale


async def test_upscale_sync(dm: AsyncClient, mock: MockDeepMode) -> None:
    source = await one_image(dm, mock, ratio="square")
    upscaled = await dm.images.upscale(source.id)
    assert isinstance(upscaled, Image)
    assert upscaled.upscaled is True
    assert upscaled.id != source.id
    assert upscaled.id in mock.images
    assert (upscaled.model_id, upscaled.prompt, upscaled.ratio) == (
        source.model_id,
        source.prompt,
        Ratio.SQUARE,
    )
    record = last(mock)
    assert (record.endpoint, record.status) == ("upscale", 200)
    assert record.json == {"image_id": source.id}
    assert charged(mock) == ["generate", "upscale"]
    assert mock.ledger[-1].cost == 3


async def test_upscale_callback_mode(
    dm: AsyncClient, mock: MockDeepMode, receiver: Receiver
) -> None:
    source = await one_image(dm, mock)
    accepted = await dm.images.upscale(source.id, callback=receiver.url)
    assert accepted == Accepted(message="Upscaling images...")
    assert last(mock).json == {"image_id": source.id, "callback": receiver.url}
    body = await receiver.next_body()
    assert body["upscaled"] is True
    assert body["id"] != source.id
    assert body["id"] in mock.images
    assert body["prompt"] == source.prompt
    assert charged(mock) == ["generate", "upscale"]


# --------------------------------------------------------------------------- remix

MODES = [
    pytest.param(RemixMode.SYNC, "completed", id="sync-enum"),
    pytest.param("sync", "completed", id="sync-string"),
    pytest.param(RemixMode.ASYNC, "processing", id="async-enum"),
    pytest.param("async", "processing", id="async-string"),
]


@pytest.mark.parametrize(("mode", "status"), MODES)
async def test_remix(
    dm: AsyncClient,
    mock: MockDeepMode,
    tmp_path: pathlib.Path,
    mode: RemixMode | str,
    status: str,
) -> None:
    if status == "processing":
        mock.set_latency("remix", 30)  # async mode answers at once, the work takes a while
    model = mock.add_model()
    mask = write(tmp_path / "mask.png", PNG)
    result = await dm.images.remix(
        model_id=model.id,
        artwork_image=("art.jpg", JPEG),
        mask_image=mask,
        prompt="in the style of a fresco",
        negative_prompt="text",
        mode=mode,
    )
    assert isinstance(result, RemixResult)
    assert result.status == status
    assert result.created_at.tzinfo is not None
    assert result.image_url.startswith(f"{mock.blob_base_url}/remix-generation/")
    assert mock.remixes[result.id].kind == "remix"
    record = last(mock)
    assert (record.endpoint, record.status) == ("remix", 200)
    assert record.form == {
        "model_id": model.id,
        "prompt": "in the style of a fresco",
        "negative_prompt": "text",
        "mode": str(mode),
    }
    assert record.files == [
        UploadedFile("artwork_image", "art.jpg", "image/jpeg", len(JPEG), "jpeg"),
        UploadedFile("mask_image", "mask.png", "image/png", len(PNG), "png"),
    ]
    assert_sized_body(record)
    assert charged(mock) == ["remix"]


async def test_remix_defaults(dm: AsyncClient, mock: MockDeepMode) -> None:
    model = mock.add_model()
    result = await dm.images.remix(model_id=model.id, artwork_image=JPEG, mask_image=PNG)
    assert result.status == "completed"
    assert last(mock).form == {
        "model_id": model.id,
        "prompt": "",
        "negative_prompt": "",
        "mode": "sync",
    }
    assert [(f.field, f.filename) for f in last(mock).files] == [
        ("artwork_image", "artwork_image.jpeg"),
        ("mask_image", "mask_image.png"),
    ]
    assert charged(mock) == ["remix"]


@pytest.mark.parametrize(("mode", "status"), MODES)
async def test_face_id_remix(
    dm: AsyncClient, mock: MockDeepMode, mode: RemixMode | str, status: str
) -> None:
    if status == "processing":
        mock.set_latency("face_id_remix", 30)
    result = await dm.images.face_id_remix(
        identity_image=io.BytesIO(JPEG),
        artwork_image=("art.webp", WEBP, "image/webp"),
        mask_image=PNG,
        prompt="a knight",
        mode=mode,
    )
    assert isinstance(result, RemixResult)
    assert result.status == status
    assert result.image_url.startswith(f"{mock.blob_base_url}/face-id-remix-generation/")
    assert mock.remixes[result.id].kind == "face_id_remix"
    record = last(mock)
    assert (record.endpoint, record.status) == ("face_id_remix", 200)
    assert record.form == {"prompt": "a knight", "negative_prompt": "", "mode": str(mode)}
    assert record.files == [
        UploadedFile("identity_image", "identity_image.jpeg", "image/jpeg", len(JPEG), "jpeg"),
        UploadedFile("artwork_image", "art.webp", "image/webp", len(WEBP), "webp"),
        UploadedFile("mask_image", "mask_image.png", "image/png", len(PNG), "png"),
    ]
    assert_sized_body(record)
    assert charged(mock) == ["face_id_remix"]


# --------------------------------------------------------------------------- upload inputs

# Each case makes one input in tmp_path (closing what it opens through the ExitStack) and
# says what the server must receive for it.
InputCase = Callable[[pathlib.Path, ExitStack], tuple[ImageInput, UploadedFile]]


def _file(name: str, content_type: str, data: bytes, fmt: str) -> UploadedFile:
    return UploadedFile("images", name, content_type, len(data), fmt)


def _str_path(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    return str(write(tmp / "face.jpg", JPEG)), _file("face.jpg", "image/jpeg", JPEG, "jpeg")


def _pathlib_path(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    return write(tmp / "face.png", PNG), _file("face.png", "image/png", PNG, "png")


def _large_path(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    big = sample_image("jpeg", size=1_500_000)  # several chunks of the streamed part
    return write(tmp / "big.jpeg", big), _file("big.jpeg", "image/jpeg", big, "jpeg")


def _bytes(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    return WEBP, _file("image.webp", "image/webp", WEBP, "webp")


def _open_file(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    file = stack.enter_context(write(tmp / "photo.jpeg", JPEG).open("rb"))
    return file, _file("photo.jpeg", "image/jpeg", JPEG, "jpeg")


def _bytes_io(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    return io.BytesIO(PNG), _file("image.png", "image/png", PNG, "png")


def _tuple_bytes(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    return ("mine.webp", WEBP), _file("mine.webp", "image/webp", WEBP, "webp")


def _tuple_file_type(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    item = ("custom.jpg", io.BytesIO(JPEG), "image/pjpeg")
    return item, _file("custom.jpg", "image/pjpeg", JPEG, "jpeg")


def _pipe(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    read_end, write_end = os.pipe()
    reader = stack.enter_context(open(read_end, "rb"))  # noqa: SIM115
    with open(write_end, "wb") as writer:
        writer.write(PNG)
    assert not reader.seekable()
    return reader, _file("image.png", "image/png", PNG, "png")


def _path_without_extension(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    return write(tmp / "selfie", JPEG), _file("selfie.jpeg", "image/jpeg", JPEG, "jpeg")


def _tuple_wrong_extension(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    return ("notes.txt", PNG), _file("notes.txt.png", "image/png", PNG, "png")


def _file_without_extension(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    file = stack.enter_context(write(tmp / "raw", WEBP).open("rb"))
    return file, _file("raw.webp", "image/webp", WEBP, "webp")


def _upper_case_extension(tmp: pathlib.Path, stack: ExitStack) -> tuple[ImageInput, UploadedFile]:
    return write(tmp / "IMG_1.JPG", JPEG), _file("IMG_1.JPG", "image/jpeg", JPEG, "jpeg")


INPUT_CASES: dict[str, InputCase] = {
    "str-path": _str_path,
    "pathlib-path": _pathlib_path,
    "large-path": _large_path,
    "bytes": _bytes,
    "open-file": _open_file,
    "bytesio": _bytes_io,
    "tuple-bytes": _tuple_bytes,
    "tuple-file-content-type": _tuple_file_type,
    "pipe": _pipe,
    "path-without-extension": _path_without_extension,
    "tuple-wrong-extension": _tuple_wrong_extension,
    "file-without-extension": _file_without_extension,
    "upper-case-extension": _upper_case_extension,
}


@pytest.mark.parametrize("case", INPUT_CASES)
async def test_upload_input_kinds(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path, case: str
) -> None:
    with ExitStack() as stack:
        item, expected = INPUT_CASES[case](tmp_path, stack)
        await dm.models.create(images=[item], **TRAINING)
    record = last(mock)
    assert record.status == 200
    assert record.files == [expected]
    assert_sized_body(record)
    assert charged(mock) == ["create_model"]


async def test_all_input_kinds_in_one_request_keep_their_order(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    with ExitStack() as stack:
        made = [make(tmp_path, stack) for make in INPUT_CASES.values()]
        await dm.models.create(images=[item for item, _ in made], **TRAINING)
    record = last(mock)
    assert record.files == [expected for _, expected in made]
    assert_sized_body(record)
    assert mock.models[next(iter(mock.models))].image_count == len(INPUT_CASES)


async def test_seekable_file_object_is_sent_from_its_position_and_left_as_it_was(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    prefix = b"not part of the image" * 3
    path = write(tmp_path / "packed.bin", prefix + JPEG)
    with path.open("rb") as file:
        file.seek(len(prefix))
        await dm.models.create(images=[file], **TRAINING)
        # The caller's file stays open, at the position it had before the call.
        assert not file.closed
        assert file.tell() == len(prefix)
    assert last(mock).files == [_file("packed.bin.jpeg", "image/jpeg", JPEG, "jpeg")]


@pytest.mark.parametrize("case", ["str-path", "open-file", "bytesio", "bytes", "large-path"])
async def test_a_retried_upload_sends_the_whole_body_again(
    mock: MockDeepMode, tmp_path: pathlib.Path, case: str
) -> None:
    mock.fail("create_model", 429, retry_after=0)  # the server did not act: safe to resend
    async with AsyncClient(mock.api_key, base_url=mock.base_url, max_retries=1) as dm:
        with ExitStack() as stack:
            item, expected = INPUT_CASES[case](tmp_path, stack)
            await dm.models.create(images=[item], **TRAINING)
    first, second = mock.requests
    assert (first.endpoint, first.status) == ("create_model", 429)
    assert (second.endpoint, second.status) == ("create_model", 200)
    assert second.files == [expected]
    assert_sized_body(second)
    assert charged(mock) == ["create_model"]


async def test_cancelled_upload_closes_the_file_it_was_opening(
    dm: AsyncClient,
    mock: MockDeepMode,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call cancelled while a path is being opened for its part leaks no open file."""
    path = write(tmp_path / "face.jpg", JPEG)
    opened: list[Any] = []
    opening, cancelled = threading.Event(), threading.Event()
    real_open = _uploads.open_regular_file

    def slow_open(source: pathlib.Path) -> Any:
        if source == path and len(opened) == 1:  # the 1st open inspects, the 2nd uploads
            opening.set()
            cancelled.wait(5)  # the open ends only after the call was cancelled
        file = real_open(source)
        if source == path:
            opened.append(file)
        return file

    monkeypatch.setattr(_uploads, "open_regular_file", slow_open)
    try:
        task = asyncio.create_task(dm.models.create(images=[path], **TRAINING))
        await eventually(opening.is_set)
        task.cancel()
        cancelled.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        # aiohttp writes the body in a task of its own, which ends a moment later.
        await eventually(lambda: len(opened) == 2 and all(file.closed for file in opened))
    finally:
        for file in opened:
            file.close()
    assert charged(mock) == []
    assert await dm.account.balance() == Balance(remaining_balance=10_000)  # still usable


# --------------------------------------------------------------------------- identifiers

IDENTIFIERS = [
    pytest.param("a/b", "a%2Fb", id="slash"),
    pytest.param("..", "%2E%2E", id="dot-dot"),
    pytest.param("x/../y", "x%2F%2E%2E%2Fy", id="traversal"),
    pytest.param("a?b#c", "a%3Fb%23c", id="query-and-fragment"),
]


@pytest.mark.parametrize(("identifier", "encoded"), IDENTIFIERS)
async def test_retrieve_identifier_stays_one_segment(
    dm: AsyncClient, mock: MockDeepMode, identifier: str, encoded: str
) -> None:
    with pytest.raises(NotFoundError) as caught:
        await dm.images.retrieve(identifier)
    record = last(mock)
    assert (record.endpoint, record.method, record.status) == ("retrieve_image", "GET", 404)
    assert record.path == f"/api/images/{identifier}"  # decoded by the server: one segment
    assert caught.value.status_code == 404
    assert caught.value.detail == f"Image {identifier!r} not found"
    assert caught.value.request.url == f"{mock.base_url}/api/images/{encoded}"
    assert len(mock.requests) == 1


@pytest.mark.parametrize(("identifier", "encoded"), IDENTIFIERS)
async def test_extend_identifier_stays_one_segment(
    dm: AsyncClient, mock: MockDeepMode, identifier: str, encoded: str
) -> None:
    mock.add_model()
    with pytest.raises(NotFoundError) as caught:
        await dm.models.extend(identifier)
    record = last(mock)
    assert (record.endpoint, record.method, record.status) == ("extend_model", "POST", 404)
    assert record.path == f"/api/models/{identifier}/extend"
    assert caught.value.detail == f"Model {identifier!r} not found"
    assert caught.value.request.url == f"{mock.base_url}/api/models/{encoded}/extend"
    assert charged(mock) == []


# --------------------------------------------------------------------------- file descriptors


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_concurrent_uploads_keep_open_files_low(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    image = sample_image("jpeg", size=200_000)
    paths = [write(tmp_path / f"face-{index:02}.jpg", image) for index in range(30)]
    baseline = _open_fds()
    peak, samples = baseline, 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak, samples
        while not done.is_set():
            peak = max(peak, _open_fds())
            samples += 1
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    try:
        results = await asyncio.gather(
            *(dm.models.create(images=paths, **TRAINING) for _ in range(8))
        )
    finally:
        done.set()
        await sampler
    assert results == [ModelCreated(message="Created model successfully")] * 8
    uploads = [r for r in mock.requests if r.endpoint == "create_model"]
    assert len(uploads) == 8
    for record in uploads:
        assert [(f.filename, f.size) for f in record.files] == [
            (path.name, len(image)) for path in paths
        ]
    assert charged(mock) == ["create_model"] * 8
    assert samples >= 5  # the sampler ran while the uploads were under way
    # Opening every path at once would hold 8 x 30 = 240 files, besides the sockets.
    assert peak - baseline < 100, (baseline, peak)
