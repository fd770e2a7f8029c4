"""Odd inputs, odd servers, odd timing: each gives a typed error or works, never leaks."""

from __future__ import annotations

import gzip
import logging
import os
import pathlib
import re
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import anyio
import attrs
import pytest
from aiohttp import web
from conftest import eventually, make_client
from yarl import URL

from deepmode_async import (
    AsyncClient,
    DeepModeError,
    DownloadError,
    Image,
    NotFoundError,
    ProgressCallbackError,
    ValidationError,
)
from deepmode_async._downloads import safe_file_name
from deepmode_async._transport import Request
from deepmode_async.callbacks import CallbackHub
from deepmode_async.testing import MockDeepMode, sample_image

pytestmark = [pytest.mark.anyio, pytest.mark.dm(fast=False)]

JPEG = sample_image("jpeg")


@pytest.fixture
async def image_host() -> AsyncIterator[str]:
    """A loopback image host: /gzip (encoded), /empty (204), /image (plain)."""

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(JPEG), headers={"Content-Encoding": "gzip"})

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def plain(request: web.Request) -> web.Response:
        return web.Response(body=JPEG)

    async def encoded(request: web.Request) -> web.Response:
        status, encoding, body = ENCODED[request.match_info["case"]]
        return web.Response(status=status, body=body, headers={"Content-Encoding": encoding})

    app = web.Application()
    app.router.add_get("/encoded/{case}", encoded)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/empty", empty)
    app.router.add_get("/image", plain)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def image_at(url: str, name: str = "photo.jpeg") -> Image:
    return Image(
        id="i1", file_name=name, model_id="m", image_url=url, prompt="p", negative_prompt=None
    )


class BytesPath:
    def __fspath__(self) -> bytes:
        return b"/tmp/photo.jpg"


@pytest.mark.parametrize(
    "images",
    [
        ["a\x00b.jpg"],
        [BytesPath()],
        [("a\ud800.jpg", JPEG)],
        [("a.jpg", JPEG, "image/jpeg\r\nX-Injected: 1")],
    ],
    ids=["nul-in-path", "bytes-fspath", "surrogate-filename", "crlf-content-type"],
)
async def test_odd_image_inputs_are_validation_errors(
    dm: AsyncClient, mock: MockDeepMode, images: list[object]
) -> None:
    with pytest.raises(ValidationError):
        await dm.models.create(images=images, gender="woman", model_type="amateur")  # type: ignore[arg-type]
    assert mock.requests == []


async def test_lone_surrogates_in_text_are_validation_errors(
    dm: AsyncClient, mock: MockDeepMode
) -> None:
    with pytest.raises(ValidationError, match="prompt"):
        await dm.images.generate(model_id="m", prompt="a\ud800")
    with pytest.raises(ValidationError, match="image_id"):
        await dm.images.retrieve("a\ud800")
    assert mock.requests == []


async def test_a_dest_with_a_nul_byte_is_a_validation_error(dm: AsyncClient) -> None:
    with pytest.raises(ValidationError, match="NUL"):
        await dm.images.download([], "out\x00dir")


async def test_a_closed_session_of_yours_gives_a_typed_error(mock: MockDeepMode) -> None:
    session = aiohttp.ClientSession()
    await session.close()
    async with AsyncClient(mock.api_key, base_url=mock.base_url, session=session) as dm:
        with pytest.raises(DeepModeError, match="closed"):
            await dm.account.balance()


async def test_closing_the_client_during_a_backoff_ends_the_call(
    dm: AsyncClient, mock: MockDeepMode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="deepmode_async")
    mock.fail("balance", 503, retry_after=30)
    async with anyio.create_task_group() as group:

        async def close_soon() -> None:
            await eventually(lambda: "retry 1 of" in caplog.text)  # now in its backoff
            await dm.aclose()

        group.start_soon(close_soon)
        with pytest.raises(DeepModeError, match="closed"):
            await dm.account.balance()


async def test_a_session_that_raises_for_status_still_gives_typed_errors(
    mock: MockDeepMode,
) -> None:
    async with (
        aiohttp.ClientSession(raise_for_status=True) as session,
        AsyncClient(mock.api_key, base_url=mock.base_url, session=session) as dm,
    ):
        with pytest.raises(NotFoundError):
            await dm.images.retrieve("missing")


async def test_a_failing_progress_callback_leaves_no_temporary_file(
    dm: AsyncClient, mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    model = mock.add_model()
    generation = await dm.images.generate(model_id=model.id, prompt="a lighthouse", num_images=2)

    def boom(progress: object) -> None:
        raise RuntimeError("progress bar broke")

    with pytest.raises(ProgressCallbackError, match=r"the download stopped: .* broke") as caught:
        await dm.images.download(generation, tmp_path, progress=boom)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


async def test_a_gzip_encoded_image_downloads_whole(
    dm: AsyncClient, image_host: str, tmp_path: pathlib.Path
) -> None:
    (path,) = await dm.images.download(image_at(f"{image_host}/gzip"), tmp_path)
    assert path.read_bytes() == JPEG


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


HALF = len(JPEG) // 2
ENCODED: dict[str, tuple[int, str, bytes]] = {
    "zlib-deflate": (200, "deflate", zlib.compress(JPEG)),
    "raw-deflate": (200, "deflate", _raw_deflate(JPEG)),
    "gzip-members": (200, "gzip", gzip.compress(JPEG[:HALF]) + gzip.compress(JPEG[HALF:])),
    "gzip-cut": (200, "gzip", gzip.compress(JPEG)[:-12]),
    "gzip-empty": (200, "gzip", b""),
    "gzip-junk": (200, "gzip", b"\x1f\x8b not gzip at all"),
    "deflate-trailing": (200, "deflate", zlib.compress(JPEG) + b"junk"),
    "brotli": (200, "br", JPEG),
    "gzip-404": (404, "gzip", gzip.compress(b"BlobNotFound: The specified blob does not exist.")),
}


@pytest.mark.parametrize("case", ["zlib-deflate", "raw-deflate", "gzip-members"])
async def test_deflate_and_multi_member_gzip_images_download_whole(
    dm: AsyncClient, image_host: str, tmp_path: pathlib.Path, case: str
) -> None:
    (path,) = await dm.images.download(image_at(f"{image_host}/encoded/{case}"), tmp_path)
    assert path.read_bytes() == JPEG


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("gzip-cut", "cut off before its end"),  # aiohttp alone saved it as complete
        ("gzip-empty", "cut off before its end"),
        ("gzip-junk", "its gzip encoding is broken"),
        ("deflate-trailing", "data after the end of the deflate stream"),
        ("brotli", "'br'-encoded, which is unsupported"),
        ("gzip-404", "404: BlobNotFound: The specified blob does not exist."),
    ],
)
async def test_a_badly_encoded_image_is_a_download_error_and_leaves_nothing(
    mock: MockDeepMode, image_host: str, tmp_path: pathlib.Path, case: str, message: str
) -> None:
    async with make_client(mock) as dm:
        with pytest.raises(DownloadError, match=re.escape(message)) as caught:
            await dm.images.download(image_at(f"{image_host}/encoded/{case}"), tmp_path)
    assert caught.value.image_id == "i1"
    assert list(tmp_path.iterdir()) == []


async def test_a_204_from_the_image_host_is_not_saved_as_the_image(
    dm: AsyncClient, image_host: str, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(DownloadError, match="204") as caught:
        await dm.images.download(image_at(f"{image_host}/empty"), tmp_path)
    assert caught.value.image_id == "i1"
    assert list(tmp_path.iterdir()) == []


async def test_downloaded_files_get_the_usual_permissions(
    dm: AsyncClient, image_host: str, tmp_path: pathlib.Path
) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    (path,) = await dm.images.download(image_at(f"{image_host}/image"), tmp_path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:65536/x", "http://xn--/x", f"http://{'a' * 64}.com/x", "/relative"]
)
async def test_an_unusable_image_url_is_a_download_error(
    dm: AsyncClient, url: str, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(DownloadError, match=r"not an absolute|UnicodeError"):
        await dm.images.download(image_at(url), tmp_path)


def test_sanitizing_a_huge_name_is_quick() -> None:
    started = time.perf_counter()
    name = safe_file_name("x" * 1_000_000 + ".jpeg")
    assert time.perf_counter() - started < 0.5
    assert name.endswith(".jpeg")
    assert len(name.encode()) <= 200


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"default_headers": {"X-Bad": "a\r\nb"}}, "printable"),
        ({"default_headers": {"Bad Name": "v"}}, "header name"),
        ({"default_headers": {"content-type": "text/plain"}}, "Content-Type"),
        ({"base_url": "https://user:hunter2@api.example.com"}, "credentials"),
        ({"base_url": "https://api.example.com/#frag"}, "fragment"),
        ({"timeout": float("nan")}, "positive"),
        ({"timeout": 10**400}, "positive number of seconds"),
        ({"timeout": 10**5000}, "more than 4300 digits"),
        ({"max_retries": -(10**5000)}, "more than 4300 digits"),
        ({"base_url": ""}, "absolute"),  # not the production API in silence
        ({"base_url": 0}, "must be a str"),
        ({"base_url": b""}, "must be a str"),
    ],
)
def test_odd_client_options_are_validation_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        AsyncClient("k", **options)  # type: ignore[arg-type]
    assert "hunter2" not in str(caught.value)


def test_a_request_never_shows_its_key() -> None:
    request = Request("GET", URL("http://x/"), True, {"Authorization": "Bearer sk-secret"})
    assert "sk-secret" not in repr(request)
    assert "sk-secret" not in repr(attrs.evolve(request))


@pytest.mark.parametrize(
    "options",
    [{"num_images": 10**5000}, {"timeout": 10**400}, {"ratio": "x" * 100_000}],
)
async def test_huge_and_long_values_give_short_validation_errors(
    dm: AsyncClient, options: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError) as caught:
        await dm.images.generate(model_id="m", prompt="p", **options)
    assert len(str(caught.value)) < 300


def test_a_long_callback_kind_gives_a_short_validation_error() -> None:
    hub = CallbackHub("https://hooks.example/cb")
    with pytest.raises(ValidationError) as caught:
        hub.expect(cast(Any, "k" * 100_000))
    assert len(str(caught.value)) < 300
