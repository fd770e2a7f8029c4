"""The mock's image host: real JPEGs behind signed, expiring URLs, to be sent byte for byte."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import re
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
import yarl
from PIL import Image

from deepmode_async.testing import MockDeepMode, sample_image

pytestmark = pytest.mark.anyio


def api_session(mock: MockDeepMode) -> aiohttp.ClientSession:
    """Raw aiohttp for a mock of the test's own making (the `http` fixture's twin)."""
    return aiohttp.ClientSession(mock.base_url, headers={"Authorization": f"Bearer {mock.api_key}"})


async def generate(
    http: aiohttp.ClientSession, mock: MockDeepMode, num_images: int = 1
) -> list[dict[str, Any]]:
    body = {"model_id": mock.add_model().id, "prompt": "a lighthouse", "num_images": num_images}
    async with http.post("/api/images/generate", json=body) as response:
        assert response.status == 200, await response.text()
        images: list[dict[str, Any]] = (await response.json())["images"]
    return images


async def fetch(
    plain: aiohttp.ClientSession, url: str | yarl.URL, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    """GET `url`; a `str` is sent byte for byte, a `yarl.URL` as yarl made it."""
    target = yarl.URL(url, encoded=True) if isinstance(url, str) else url
    async with plain.get(target, headers=headers) as response:
        return response.status, response.content_type, await response.read()


def assert_azure_error(status: int, content_type: str, body: bytes, want: int, code: str) -> None:
    assert (status, content_type) == (want, "application/xml"), body
    text = body.decode()
    assert text.startswith("<?xml"), text
    assert f"<Code>{code}</Code>" in text, text


def query_value(url: str, key: str) -> str:
    """One raw (still percent-encoded) value of the query string of `url`."""
    raw = dict(item.split("=", 1) for item in url.partition("?")[2].split("&"))
    return raw[key]


def decodes_as_jpeg(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.format == "JPEG" and image.size == (16, 16)


# ------------------------------------------------------------------ serving images


async def test_image_url_serves_a_decodable_jpeg(
    mock: MockDeepMode, http: aiohttp.ClientSession, plain: aiohttp.ClientSession
) -> None:
    (image,) = await generate(http, mock)
    url = image["image_url"]
    assert url.startswith(f"{mock.blob_base_url}/deepmode-user-image/{image['file_name']}?")
    assert yarl.URL(mock.blob_base_url).port != yarl.URL(mock.base_url).port

    status, content_type, data = await fetch(plain, url)

    assert (status, content_type) == (200, "image/jpeg")
    assert data == sample_image("jpeg") == mock.image_bytes
    assert decodes_as_jpeg(data)


async def test_image_size_serves_exactly_that_many_bytes() -> None:
    size = 5 * 1024 * 1024
    async with (
        MockDeepMode(image_size=size) as mock,
        api_session(mock) as http,
        aiohttp.ClientSession() as plain,
    ):
        (image,) = await generate(http, mock)
        async with plain.get(yarl.URL(image["image_url"], encoded=True)) as response:
            assert response.status == 200
            assert response.content_length == size
            data = await response.read()

    assert len(data) == size
    assert decodes_as_jpeg(data)


async def test_signed_query_is_percent_encoded_like_azure(
    mock: MockDeepMode, http: aiohttp.ClientSession
) -> None:
    for image in await generate(http, mock, num_images=8):
        query = image["image_url"].partition("?")[2]
        for escape in ("%3A", "%2F", "%2B", "%3D"):
            assert escape in query, (escape, query)
        assert [item.split("=")[0] for item in query.split("&")] == [
            "st", "se", "sp", "sv", "sr", "sig",
        ]  # fmt: skip
        assert "%3A" in query_value(image["image_url"], "se")
        assert query_value(image["image_url"], "sig").endswith("%3D")


# ------------------------------------------------------------------ tampering


def _other_sig(url: str) -> str:
    sig = query_value(url, "sig")
    changed = ("B" if sig[0] == "A" else "A") + sig[1:]
    return url.replace(f"sig={sig}", f"sig={changed}")


def _later_expiry(url: str) -> str:
    se = query_value(url, "se")
    later = re.sub(r"^\d{4}", lambda m: str(int(m.group()) + 1), se)
    return url.replace(f"se={se}", f"se={later}")


def _other_blob(url: str) -> str:
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{uuid.uuid4()}.jpeg?{query}"


def _other_container(url: str) -> str:
    return url.replace("/deepmode-user-image/", "/remix-generation/")


TAMPERINGS: dict[str, Callable[[str], str | yarl.URL]] = {
    "re-encoded by yarl": yarl.URL,  # plain.get(url): yarl decodes %3A and %2F
    "%2F decoded": lambda url: url.replace("%2F", "/"),
    "%3A decoded": lambda url: url.replace("%3A", ":"),
    "%2B decoded": lambda url: url.replace("%2B", "+"),
    "other sig": _other_sig,
    "later se": _later_expiry,
    "no sig": lambda url: url.rsplit("&sig=", 1)[0],
    "unknown blob, valid-looking sig": _other_blob,
    "other container": _other_container,
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
async def test_a_url_not_sent_byte_for_byte_is_refused(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    plain: aiohttp.ClientSession,
    tamper: Callable[[str], str | yarl.URL],
) -> None:
    (image,) = await generate(http, mock)
    url = image["image_url"]
    tampered = tamper(url)
    assert str(tampered) != url

    assert_azure_error(*await fetch(plain, tampered), 403, "AuthenticationFailed")
    # The untouched URL still works: the 403 is the tampering's doing.
    assert (await fetch(plain, url))[0] == 200


async def test_a_signature_is_bound_to_its_blob(
    mock: MockDeepMode, http: aiohttp.ClientSession, plain: aiohttp.ClientSession
) -> None:
    first, second = await generate(http, mock, num_images=2)
    swapped = first["image_url"].partition("?")[0] + "?" + second["image_url"].partition("?")[2]

    assert_azure_error(*await fetch(plain, swapped), 403, "AuthenticationFailed")


# ------------------------------------------------------------------ expiry


@pytest.mark.parametrize(
    ("url_ttl", "still_valid", "expired"),
    [(None, 3590, 3601), (30, 25, 31), (2, 0, 3)],
    ids=["default-1h", "ttl-30s", "ttl-2s"],
)
async def test_urls_expire_after_their_ttl_and_retrieve_issues_a_fresh_one(
    url_ttl: float | None, still_valid: float, expired: float
) -> None:
    server = MockDeepMode() if url_ttl is None else MockDeepMode(url_ttl=url_ttl)
    async with (
        server as mock,
        api_session(mock) as http,
        aiohttp.ClientSession() as plain,
    ):
        (image,) = await generate(http, mock)
        url = image["image_url"]
        se = dt.datetime.strptime(unquote(query_value(url, "se")), "%Y-%m-%dT%H:%M:%SZ")
        lifetime = se.replace(tzinfo=dt.UTC) - mock.now()
        assert abs(lifetime.total_seconds() - (url_ttl or 3600)) < 2

        mock.advance_clock(still_valid)
        assert (await fetch(plain, url))[0] == 200

        mock.advance_clock(expired - still_valid)
        assert_azure_error(*await fetch(plain, url), 403, "AuthenticationFailed")

        async with http.get(f"/api/images/{image['id']}") as response:
            assert response.status == 200
            fresh = await response.json()
        assert fresh["id"] == image["id"]
        assert fresh["image_url"] != url
        status, content_type, data = await fetch(plain, fresh["image_url"])
        assert (status, content_type, data) == (200, "image/jpeg", mock.image_bytes)


# ------------------------------------------------------------------ credentials


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Authorization", "Bearer mock-key"),
        ("Authorization", "Bearer someone-else"),
        ("Authorization", "Basic eDp5"),
        ("authorization", "Bearer mock-key"),
    ],
)
async def test_a_request_with_an_authorization_header_is_refused(
    mock: MockDeepMode,
    http: aiohttp.ClientSession,
    plain: aiohttp.ClientSession,
    header: str,
    value: str,
) -> None:
    (image,) = await generate(http, mock)
    url = image["image_url"]

    refused = await fetch(plain, url, headers={header: value})

    assert_azure_error(*refused, 400, "InvalidAuthenticationInfo")
    assert (await fetch(plain, url))[0] == 200  # the signature itself was valid
    recorded = [r for r in mock.requests if r.endpoint == "download"]
    assert [r.status for r in recorded] == [400, 200]
    # `headers` keeps the names as sent, so look them up without regard to case.
    sent = [{name.lower(): v for name, v in r.headers.items()} for r in recorded]
    assert sent[0]["authorization"] == "[redacted]"
    assert value not in str(recorded[0])
    assert "authorization" not in sent[1]


# ------------------------------------------------------------------ blobs that are not there (yet)


async def test_async_remix_blob_is_not_found_until_ready(
    mock: MockDeepMode, http: aiohttp.ClientSession, plain: aiohttp.ClientSession
) -> None:
    mock.set_latency("remix", 1.5)  # far longer than an answer and a first fetch take
    form = aiohttp.FormData()
    form.add_field("model_id", mock.add_model().id)
    form.add_field("artwork_image", sample_image("jpeg"), filename="art.jpg")
    form.add_field("mask_image", sample_image("png"), filename="mask.png")
    form.add_field("mode", "async")
    started = time.monotonic()
    async with http.post("/api/remix/generate", data=form) as response:
        assert response.status == 200, await response.text()
        remix = await response.json()
    assert time.monotonic() - started < 1  # async mode answers at once
    assert remix["status"] == "processing"
    assert "/remix-generation/" in remix["image_url"]

    assert_azure_error(*await fetch(plain, remix["image_url"]), 404, "BlobNotFound")
    while (result := await fetch(plain, remix["image_url"]))[0] == 404:
        assert time.monotonic() - started < 5, "the remix never became ready"
        await asyncio.sleep(0.02)

    assert time.monotonic() - started >= 1.49
    assert result == (200, "image/jpeg", mock.image_bytes)


# ------------------------------------------------------------------ inspection


async def test_downloads_are_recorded(
    mock: MockDeepMode, http: aiohttp.ClientSession, plain: aiohttp.ClientSession
) -> None:
    (image,) = await generate(http, mock)
    url = image["image_url"]
    await fetch(plain, url)
    await fetch(plain, _other_sig(url))

    downloads = [r for r in mock.requests if r.endpoint == "download"]
    assert [(r.method, r.status, r.disconnected) for r in downloads] == [
        ("GET", 200, False),
        ("GET", 403, False),
    ]
    base, _, query = url.partition("?")
    assert downloads[0].path == yarl.URL(base).path == f"/deepmode-user-image/{image['file_name']}"
    assert downloads[0].query == query
    assert "Authorization" not in downloads[0].headers
    # The API calls are recorded under their own names, never as downloads.
    assert [r.endpoint for r in mock.requests] == ["generate", "download", "download"]
