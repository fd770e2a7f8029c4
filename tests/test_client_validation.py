"""Client-side validation: every bad argument raises `ValidationError` naming it, before any
request is sent and before anything is charged."""

from __future__ import annotations

import io
import pathlib
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from deepmode_async import AsyncClient, DeepModeError, Image, ValidationError
from deepmode_async.testing import MockDeepMode
from deepmode_async.testing._samples import sample_image

pytestmark = [pytest.mark.anyio, pytest.mark.dm(max_retries=0, fast=False)]

JPEG = sample_image("jpeg")
PNG = sample_image("png")
GIF = b"GIF89a" + bytes(40)
TEXT = b"just some notes, not an image\n"
TRAINING: dict[str, Any] = {"gender": "woman", "model_type": "amateur"}
URL = "https://example.com/face.jpg"


@pytest.fixture
def files(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory with a real image, a text file named .jpg, a GIF and a sub-directory."""
    (tmp_path / "face.jpg").write_bytes(JPEG)
    (tmp_path / "notes.jpg").write_bytes(TEXT)
    (tmp_path / "anim.gif").write_bytes(GIF)
    (tmp_path / "folder.jpg").mkdir()
    return tmp_path


async def rejected(mock: MockDeepMode, call: Awaitable[Any], argument: str) -> ValidationError:
    """`call` raises a ValidationError naming `argument`, and the server saw nothing."""
    with pytest.raises(ValidationError) as caught:
        await call
    error = caught.value
    assert isinstance(error, ValueError)
    assert isinstance(error, DeepModeError)
    assert re.search(rf"(?<![\w]){re.escape(argument)}(?![\w])", str(error)), str(error)
    assert mock.requests == []
    assert mock.ledger == []
    assert mock.balance == 10_000
    return error


# --------------------------------------------------------------------------- models.create

# (id, arguments of models.create besides the valid gender/model_type, the argument named)
CREATE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("neither-images-nor-urls", {}, "images"),
    ("both-images-and-urls", {"images": [JPEG], "image_urls": [URL]}, "image_urls"),
    ("0-images", {"images": []}, "images"),
    ("31-images", {"images": [JPEG] * 31}, "images"),
    ("0-urls", {"image_urls": []}, "image_urls"),
    ("31-urls", {"image_urls": [URL] * 31}, "image_urls"),
    ("images-a-lone-bytes", {"images": JPEG}, "images"),
    ("urls-a-lone-str", {"image_urls": URL}, "image_urls"),
    ("empty-bytes", {"images": [b""]}, "images"),
    ("gif-bytes", {"images": [GIF]}, "images"),
    ("text-bytes", {"images": [TEXT]}, "images"),
    ("second-of-two-bad", {"images": [JPEG, GIF]}, "images[1]"),
    ("none-item", {"images": [None]}, "images"),
    ("int-item", {"images": [5]}, "images"),
    ("tuple-of-one", {"images": [("a.jpg",)]}, "images"),
    ("tuple-of-four", {"images": [("a.jpg", JPEG, "image/jpeg", "x")]}, "images"),
    ("tuple-name-not-str", {"images": [(b"a.jpg", JPEG)]}, "images"),
    ("tuple-content-type-not-str", {"images": [("a.jpg", JPEG, 5)]}, "images"),
    ("tuple-holding-a-path", {"images": [("a.jpg", pathlib.Path("a.jpg"))]}, "images"),
    ("tuple-of-gif", {"images": [("a.jpg", GIF)]}, "images"),
    ("closed-file", {"images": ["CLOSED"]}, "images"),
    ("url-ftp", {"image_urls": ["ftp://example.com/a.jpg"]}, "image_urls[0]"),
    ("url-relative", {"image_urls": ["photos/a.jpg"]}, "image_urls[0]"),
    ("url-empty", {"image_urls": [""]}, "image_urls[0]"),
    ("url-space", {"image_urls": ["https://example.com/my face.jpg"]}, "image_urls[0]"),
    ("url-no-host", {"image_urls": ["https:///a.jpg"]}, "image_urls[0]"),
    ("url-second-bad", {"image_urls": [URL, "mailto:a@b.c"]}, "image_urls[1]"),
    ("url-not-str", {"image_urls": [5]}, "image_urls[0]"),
    ("gender-unknown", {"images": [JPEG], "gender": "other"}, "gender"),
    ("gender-member-name", {"images": [JPEG], "gender": "WOMAN"}, "gender"),
    ("gender-int", {"images": [JPEG], "gender": 1}, "gender"),
    ("gender-none", {"images": [JPEG], "gender": None}, "gender"),
    ("model-type-unknown", {"images": [JPEG], "model_type": "pro"}, "model_type"),
    ("model-type-wrong-enum", {"images": [JPEG], "model_type": "woman"}, "model_type"),
    ("model-type-list", {"images": [JPEG], "model_type": ["amateur"]}, "model_type"),
    ("name-int", {"images": [JPEG], "name": 5}, "name"),
    ("name-bytes", {"image_urls": [URL], "name": b"Ann"}, "name"),
    ("callback-relative", {"images": [JPEG], "callback": "/callback"}, "callback"),
    ("callback-no-scheme", {"images": [JPEG], "callback": "example.com/cb"}, "callback"),
    ("callback-ftp", {"image_urls": [URL], "callback": "ftp://example.com/cb"}, "callback"),
    ("callback-int", {"images": [JPEG], "callback": 5}, "callback"),
    ("timeout-str", {"images": [JPEG], "timeout": "10"}, "timeout"),
    ("timeout-negative", {"image_urls": [URL], "timeout": -1}, "read"),
]


@pytest.mark.parametrize(
    ("arguments", "argument"), [case[1:] for case in CREATE_CASES], ids=[c[0] for c in CREATE_CASES]
)
async def test_create_model_rejects(
    dm: AsyncClient, mock: MockDeepMode, arguments: dict[str, Any], argument: str
) -> None:
    if arguments.get("images") == ["CLOSED"]:
        closed = io.BytesIO(JPEG)
        closed.close()
        arguments = {**arguments, "images": [closed]}
    await rejected(mock, dm.models.create(**{**TRAINING, **arguments}), argument)


# Inputs on disk: (id, a path under the `files` fixture or a factory, what the error says)
PATH_CASES = [
    ("text-renamed-jpg", "notes.jpg", "notes.jpg"),
    ("missing", "missing.jpg", "does not exist"),
    ("directory", "folder.jpg", "is a directory"),
    ("gif", "anim.gif", "anim.gif"),
]


@pytest.mark.parametrize(
    ("name", "says"), [c[1:] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES]
)
@pytest.mark.parametrize("kind", [str, pathlib.Path])
async def test_create_model_rejects_bad_paths(
    dm: AsyncClient,
    mock: MockDeepMode,
    files: pathlib.Path,
    name: str,
    says: str,
    kind: Callable[[pathlib.Path], Any],
) -> None:
    good = files / "face.jpg"
    error = await rejected(
        mock, dm.models.create(images=[good, kind(files / name)], **TRAINING), "images[1]"
    )
    assert says in str(error)


async def test_create_model_rejects_non_images_in_open_files(
    dm: AsyncClient, mock: MockDeepMode, files: pathlib.Path
) -> None:
    with (files / "notes.jpg").open("rb") as file:
        error = await rejected(mock, dm.models.create(images=[file], **TRAINING), "images")
        assert "notes.jpg" in str(error)
        assert not file.closed
        assert file.tell() == 0  # inspecting put it back where it was


async def test_create_model_rejects_a_text_mode_file(
    dm: AsyncClient, mock: MockDeepMode, files: pathlib.Path
) -> None:
    with (files / "notes.jpg").open("r", encoding="utf-8") as file:
        text_file: list[Any] = [file]
        error = await rejected(mock, dm.models.create(images=text_file, **TRAINING), "images")
        assert "binary" in str(error)
    with (files / "face.jpg").open("r", encoding="utf-8") as file:  # JPEG bytes are not UTF-8
        text_file = [file]
        error = await rejected(mock, dm.models.create(images=text_file, **TRAINING), "images")
        assert "binary" in str(error)


# --------------------------------------------------------------------------- images


GENERATE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("prompt-empty", {"prompt": ""}, "prompt"),
    ("prompt-whitespace", {"prompt": " \t\n "}, "prompt"),
    ("prompt-int", {"prompt": 5}, "prompt"),
    ("prompt-none", {"prompt": None}, "prompt"),
    ("model-id-empty", {"model_id": ""}, "model_id"),
    ("model-id-int", {"model_id": 5}, "model_id"),
    ("num-images-0", {"num_images": 0}, "num_images"),
    ("num-images-9", {"num_images": 9}, "num_images"),
    ("num-images-negative", {"num_images": -1}, "num_images"),
    ("num-images-true", {"num_images": True}, "num_images"),
    ("num-images-str", {"num_images": "2"}, "num_images"),
    ("num-images-float", {"num_images": 2.0}, "num_images"),
    ("upscale-1", {"upscale": 1}, "upscale"),
    ("upscale-str", {"upscale": "true"}, "upscale"),
    ("upscale-none", {"upscale": None}, "upscale"),
    ("ratio-landscape", {"ratio": "landscape"}, "ratio"),
    ("ratio-member-name", {"ratio": "SQUARE"}, "ratio"),
    ("ratio-none", {"ratio": None}, "ratio"),
    ("negative-prompt-int", {"negative_prompt": 5}, "negative_prompt"),
    ("callback-not-a-url", {"callback": "not a url"}, "callback"),
    ("callback-empty", {"callback": ""}, "callback"),
    ("callback-javascript", {"callback": "javascript:alert(1)"}, "callback"),
    ("timeout-zero", {"timeout": 0}, "read"),
    ("timeout-bool", {"timeout": True}, "timeout"),
]


@pytest.mark.parametrize(
    ("arguments", "argument"),
    [case[1:] for case in GENERATE_CASES],
    ids=[c[0] for c in GENERATE_CASES],
)
async def test_generate_rejects(
    dm: AsyncClient, mock: MockDeepMode, arguments: dict[str, Any], argument: str
) -> None:
    valid = {"model_id": mock.add_model().id, "prompt": "a lighthouse"}
    await rejected(mock, dm.images.generate(**{**valid, **arguments}), argument)


IdCall = Callable[[AsyncClient, Any], Awaitable[Any]]


def _retrieve(dm: AsyncClient, value: Any) -> Awaitable[Any]:
    return dm.images.retrieve(value)


def _upscale(dm: AsyncClient, value: Any) -> Awaitable[Any]:
    return dm.images.upscale(value)


def _upscale_callback(dm: AsyncClient, value: Any) -> Awaitable[Any]:
    return dm.images.upscale(value, callback="https://example.com/cb")


def _extend(dm: AsyncClient, value: Any) -> Awaitable[Any]:
    return dm.models.extend(value)


ID_CALLS: dict[str, tuple[IdCall, str]] = {
    "retrieve": (_retrieve, "image_id"),
    "upscale": (_upscale, "image_id"),
    "upscale-callback": (_upscale_callback, "image_id"),
    "extend": (_extend, "model_id"),
}


@pytest.mark.parametrize("value", ["", "   ", None, 5, b"abc"], ids=repr)
@pytest.mark.parametrize("call", ID_CALLS)
async def test_identifier_arguments_are_checked(
    dm: AsyncClient, mock: MockDeepMode, call: str, value: Any
) -> None:
    make, argument = ID_CALLS[call]
    await rejected(mock, make(dm, value), argument)


@pytest.mark.parametrize("callback", ["not a url", "ftp://example.com/cb", "//example.com/cb", 5])
async def test_upscale_rejects_a_bad_callback(
    dm: AsyncClient, mock: MockDeepMode, callback: Any
) -> None:
    await rejected(mock, dm.images.upscale("0123456789abcdef01234", callback=callback), "callback")


REMIX_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("artwork-text", {"artwork_image": TEXT}, "artwork_image"),
    ("artwork-gif", {"artwork_image": ("art.jpg", GIF)}, "artwork_image"),
    ("artwork-empty", {"artwork_image": b""}, "artwork_image"),
    ("artwork-missing-path", {"artwork_image": "/nonexistent/art.jpg"}, "artwork_image"),
    ("artwork-list", {"artwork_image": [JPEG]}, "artwork_image"),
    ("mask-text", {"mask_image": TEXT}, "mask_image"),
    ("mode-later", {"mode": "later"}, "mode"),
    ("mode-member-name", {"mode": "ASYNC"}, "mode"),
    ("mode-bool", {"mode": True}, "mode"),
    ("prompt-int", {"prompt": 5}, "prompt"),
    ("prompt-none", {"prompt": None}, "prompt"),
    ("negative-prompt-int", {"negative_prompt": 5}, "negative_prompt"),
]


@pytest.mark.parametrize(
    ("arguments", "argument"), [c[1:] for c in REMIX_CASES], ids=[c[0] for c in REMIX_CASES]
)
async def test_remix_rejects(
    dm: AsyncClient, mock: MockDeepMode, arguments: dict[str, Any], argument: str
) -> None:
    valid = {"model_id": mock.add_model().id, "artwork_image": JPEG, "mask_image": PNG}
    await rejected(mock, dm.images.remix(**{**valid, **arguments}), argument)


@pytest.mark.parametrize("bad_model_id", ["", " ", None, 5])
async def test_remix_rejects_a_bad_model_id(
    dm: AsyncClient, mock: MockDeepMode, bad_model_id: Any
) -> None:
    call = dm.images.remix(model_id=bad_model_id, artwork_image=JPEG, mask_image=PNG)
    await rejected(mock, call, "model_id")


@pytest.mark.parametrize(
    ("arguments", "argument"),
    [
        *((c[1], c[2]) for c in REMIX_CASES),
        ({"identity_image": TEXT}, "identity_image"),
        ({"identity_image": GIF}, "identity_image"),
    ],
    ids=[*(c[0] for c in REMIX_CASES), "identity-text", "identity-gif"],
)
async def test_face_id_remix_rejects(
    dm: AsyncClient, mock: MockDeepMode, arguments: dict[str, Any], argument: str
) -> None:
    valid = {"identity_image": JPEG, "artwork_image": JPEG, "mask_image": PNG}
    await rejected(mock, dm.images.face_id_remix(**{**valid, **arguments}), argument)


# --------------------------------------------------------------------------- download


def an_image(mock: MockDeepMode) -> Image:
    return Image(
        id="0123456789abcdef01234",
        file_name="a.jpeg",
        model_id="m",
        image_url=f"{mock.blob_base_url}/deepmode-user-image/a.jpeg?sig=x",
        prompt="p",
    )


@pytest.mark.parametrize(
    ("arguments", "argument"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -3}, "concurrency"),
        ({"concurrency": 1.5}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"overwrite": "yes"}, "overwrite"),
        ({"progress": 5}, "progress"),
        ({"progress": "print"}, "progress"),
        ({"items": "abc"}, "items"),
        ({"items": ["abc"]}, "items"),
        ({"items": 5}, "items"),
        ({"items": [None]}, "items"),
        ({"items": {"id": "x", "image_url": "http://x"}}, "items"),
        ({"dest": 5}, "dest"),
        ({"dest": "FILE"}, "dest"),
        ({"dest": "UNDER-FILE"}, "dest"),
        ({"timeout": "soon"}, "timeout"),
    ],
    ids=lambda value: repr(value) if not isinstance(value, dict) else "-".join(map(str, value)),
)
async def test_download_rejects(
    dm: AsyncClient,
    mock: MockDeepMode,
    tmp_path: pathlib.Path,
    arguments: dict[str, Any],
    argument: str,
) -> None:
    existing = tmp_path / "already-a-file.jpeg"
    existing.write_bytes(JPEG)
    special = {"FILE": existing, "UNDER-FILE": existing / "sub"}
    options: dict[str, Any] = {"items": [an_image(mock)], "dest": tmp_path / "out", **arguments}
    options["dest"] = special.get(options["dest"], options["dest"])
    items, dest = options.pop("items"), options.pop("dest")
    await rejected(mock, dm.images.download(items, dest, **options), argument)
    assert existing.read_bytes() == JPEG
    assert [path for path in tmp_path.rglob("*") if not path.is_dir()] == [existing]


# --------------------------------------------------------------------------- construction


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("DEEPMODE_API_KEY", "DEEPMODE_BASE_URL", "DEEPMODE_LOG"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("key", [None, ""], ids=["absent", "empty"])
def test_no_api_key_says_how_to_set_it(clean_env: pytest.MonkeyPatch, key: str | None) -> None:
    with pytest.raises(DeepModeError, match="DEEPMODE_API_KEY"):
        AsyncClient(key)
    clean_env.setenv("DEEPMODE_API_KEY", "")
    with pytest.raises(DeepModeError, match="DEEPMODE_API_KEY"):
        AsyncClient()


def test_api_key_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEEPMODE_API_KEY", "env-key-123")
    clean_env.setenv("DEEPMODE_BASE_URL", "http://127.0.0.1:9/")
    client = AsyncClient()
    assert client.base_url == "http://127.0.0.1:9/"


BAD_KEYS = [
    "sk live 1234",
    "sk-live-1234\n",
    "sk-live\n1234",
    "sk-live-1234 ",
    "\tsk-live-1234",
    "sk-live-\x001234",
    "sk-live-é1234",
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
@pytest.mark.parametrize("source", ["argument", "environment"])
def test_malformed_api_key_is_rejected_without_echoing_it(
    clean_env: pytest.MonkeyPatch, key: str, source: str
) -> None:
    if source == "environment":
        if "\x00" in key:
            key = key.replace("\x00", "\x01")  # an environment variable cannot hold NUL
        clean_env.setenv("DEEPMODE_API_KEY", key)
        make: Callable[[], AsyncClient] = AsyncClient
    else:

        def make() -> AsyncClient:
            return AsyncClient(key)

    with pytest.raises(ValidationError) as caught:
        make()
    message = f"{caught.value} {caught.value!r} {caught.value.args!r}"
    assert "api_key" in message
    assert key not in message
    assert key.strip() not in message
    assert "1234" not in message


@pytest.mark.parametrize(
    ("options", "argument"),
    [
        ({"base_url": "ftp://x"}, "base_url"),
        ({"base_url": "not a url"}, "base_url"),
        ({"base_url": "https://"}, "base_url"),
        ({"base_url": "api.deepmode.ai"}, "base_url"),
        ({"base_url": "https://api.deepmode.ai/?a=1"}, "base_url"),
        ({"base_url": 5}, "base_url"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"max_retries": "2"}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections": -5}, "max_connections"),
        ({"max_connections": None}, "max_connections"),
        ({"default_headers": {"Authorization": "Bearer other"}}, "Authorization"),
        ({"default_headers": {"authorization": "Bearer other"}}, "Authorization"),
        ({"default_headers": {"X-Trace": 5}}, "default_headers"),
        ({"default_headers": [("X-Trace", "1")]}, "default_headers"),
        ({"timeout": -1}, "read"),
        ({"timeout": "fast"}, "timeout"),
        ({"session": "a session"}, "session"),
    ],
    ids=lambda value: repr(value) if not isinstance(value, dict) else "-".join(map(str, value)),
)
def test_client_options_are_checked(
    clean_env: pytest.MonkeyPatch, options: dict[str, Any], argument: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(argument)):
        AsyncClient("mock-key", **options)


@pytest.mark.parametrize("level", ["verbose", "DEBUGGING", "2"])
def test_unknown_log_level_is_rejected(clean_env: pytest.MonkeyPatch, level: str) -> None:
    clean_env.setenv("DEEPMODE_LOG", level)
    with pytest.raises(ValidationError, match="DEEPMODE_LOG") as caught:
        AsyncClient("mock-key")
    assert level in str(caught.value)
