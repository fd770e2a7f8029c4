"""AsyncClient errors: the error tree from real answers, readable details from any body,
connection failures and timeouts, strict conversion of 2xx bodies, and secrets kept out of
logs, errors and other hosts."""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import json
import logging
import pathlib
import pickle
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmode_async import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Balance,
    CallbackTimeoutError,
    ConflictError,
    DeepModeError,
    DownloadError,
    Generation,
    Image,
    InsufficientCreditsError,
    InternalServerError,
    ModelExtension,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    Ratio,
    ResponseValidationError,
    Timeout,
    UnprocessableEntityError,
    ValidationError,
)
from deepmode_async._convert import structure
from deepmode_async._errors import parse_retry_after, read_detail
from deepmode_async.testing import MockDeepMode

# `dm` never retries, so every error surfaces at once.
pytestmark = [pytest.mark.anyio, pytest.mark.dm(max_retries=0, fast=False)]

DETAIL_LIMIT = 500
PROMPT_ERROR = {
    "type": "string_too_short",
    "loc": ["body", "prompt"],
    "msg": "String should have at least 1 character",
    "input": "",
}
NUM_IMAGES_ERROR = {
    "type": "range",
    "loc": ["body", "num_images"],
    "msg": "Input should be between 1 and 8",
    "input": 9,
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def assert_readable(detail: str) -> None:
    assert isinstance(detail, str)
    assert len(detail) <= DETAIL_LIMIT
    assert "\n" not in detail
    assert "\r" not in detail
    assert all(ch.isprintable() for ch in detail), repr(detail)


# ------------------------------------------------------------------ a tiny scripted server


@attrs.define
class Scripted:
    """A stand-in API on loopback: each path answers with a chosen status, body and headers."""

    answers: dict[str, tuple[int, bytes, dict[str, str]]] = attrs.Factory(dict)
    seen: list[tuple[str, str, dict[str, str]]] = attrs.Factory(list)
    base_url: str = ""

    def answer(
        self,
        path: str,
        body: Any,
        *,
        status: int = 200,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[path] = (status, raw, {"Content-Type": content_type, **(headers or {})})

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, dict(request.headers)))
        await request.read()
        status, body, headers = self.answers.get(
            request.path, (404, b'{"detail": "Not Found"}', {"Content-Type": "application/json"})
        )
        return web.Response(status=status, body=body, headers=headers)


@contextlib.asynccontextmanager
async def scripted_server() -> AsyncIterator[Scripted]:
    server = Scripted()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    async with scripted_server() as server:
        yield server


@pytest.fixture
async def sdm(scripted: Scripted) -> AsyncIterator[AsyncClient]:
    async with AsyncClient("scripted-key", base_url=scripted.base_url, max_retries=0) as client:
        yield client


def image_json(**changes: Any) -> dict[str, Any]:
    image: dict[str, Any] = {
        "id": "img_1",
        "file_name": "a.jpeg",
        "model_id": "m_1",
        "image_url": "http://127.0.0.1:1/c/a.jpeg?sig=x",
        "prompt": "a lighthouse",
        "negative_prompt": None,
        "upscaled": False,
        "ratio": "portrait",
    }
    image.update(changes)
    return image


# ------------------------------------------------------------------ the error tree


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (402, InsufficientCreditsError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, PayloadTooLargeError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (502, InternalServerError),
        (503, InternalServerError),
        (504, InternalServerError),
        (418, APIStatusError),
    ],
)
async def test_each_status_raises_its_class_with_everything_known(
    mock: MockDeepMode, dm: AsyncClient, status: int, cls: type[APIStatusError]
) -> None:
    model = mock.add_model()
    detail = f"Injected problem number {status}"
    mock.fail("generate", status, detail=detail)
    with pytest.raises(APIStatusError) as caught:
        await dm.images.generate(model_id=model.id, prompt="a lighthouse")
    error = caught.value
    assert type(error) is cls
    assert isinstance(error, DeepModeError)
    assert isinstance(error, APIError)
    assert error.status_code == status
    assert error.detail == detail
    assert json.loads(error.body) == {"detail": detail}
    # Headers are case-insensitive and carry the mock's request id.
    (record,) = [r for r in mock.requests if r.endpoint == "generate"]
    assert error.request_id == record.request_id
    assert error.headers["X-Request-ID"] == record.request_id
    assert error.headers["x-request-id"] == record.request_id
    assert error.headers["CONTENT-TYPE"].startswith("application/json")
    assert error.request.method == "POST"
    assert error.request.url == f"{mock.base_url}/api/images/generate"
    assert str(error.request) == f"POST {mock.base_url}/api/images/generate"
    message = str(error)
    for part in ("POST", "/api/images/generate", str(status), detail):
        assert part in message
    assert mock.ledger == []


async def test_a_wrong_key_is_an_authentication_error(mock: MockDeepMode) -> None:
    async with AsyncClient("wrong-key-4711", base_url=mock.base_url, max_retries=0) as dm:
        with pytest.raises(AuthenticationError) as caught:
            await dm.account.balance()
    error = caught.value
    assert error.status_code == 401
    assert error.detail == "Invalid API key"
    assert error.headers["www-authenticate"] == "Bearer"
    assert str(error.request) == f"GET {mock.base_url}/api/check-balance"
    assert "wrong-key-4711" not in str(error)
    assert "wrong-key-4711" not in repr(error)


async def test_an_empty_balance_is_insufficient_credits() -> None:
    async with MockDeepMode(balance=0) as mock:
        model = mock.add_model()
        async with AsyncClient(mock.api_key, base_url=mock.base_url, max_retries=0) as dm:
            with pytest.raises(InsufficientCreditsError) as caught:
                await dm.images.generate(model_id=model.id, prompt="a lighthouse")
        assert caught.value.status_code == 402
        assert "Insufficient credits" in caught.value.detail
        assert mock.ledger == []


@pytest.mark.parametrize(
    "detail",
    ["Not enough credits for this request", "Insufficient BALANCE", "1 credit is needed"],
)
async def test_a_400_about_credits_is_insufficient_credits(
    mock: MockDeepMode, dm: AsyncClient, detail: str
) -> None:
    mock.fail("generate", 400, detail=detail)
    with pytest.raises(InsufficientCreditsError) as caught:
        await dm.images.generate(model_id=mock.add_model().id, prompt="a lighthouse")
    assert caught.value.status_code == 400
    assert caught.value.detail == detail


async def test_a_400_about_something_else_stays_a_bad_request(
    mock: MockDeepMode, dm: AsyncClient
) -> None:
    mock.fail("generate", 400, detail="credentials header is malformed; balanced quotes needed")
    with pytest.raises(BadRequestError) as caught:
        await dm.images.generate(model_id=mock.add_model().id, prompt="a lighthouse")
    assert type(caught.value) is BadRequestError


async def test_an_expired_model_is_permission_denied(mock: MockDeepMode, dm: AsyncClient) -> None:
    model = mock.add_model()
    mock.advance_clock((model.expire_at - mock.now()).total_seconds() + 60)
    with pytest.raises(PermissionDeniedError) as caught:
        await dm.images.generate(model_id=model.id, prompt="a lighthouse")
    assert caught.value.status_code == 403
    assert "expired" in caught.value.detail
    assert mock.ledger == []


async def test_a_model_still_training_is_a_conflict(mock: MockDeepMode, dm: AsyncClient) -> None:
    model = mock.add_model(active=False)
    with pytest.raises(ConflictError) as caught:
        await dm.images.generate(model_id=model.id, prompt="a lighthouse")
    assert caught.value.status_code == 409
    assert "still training" in caught.value.detail


async def test_unknown_ids_are_not_found(mock: MockDeepMode, dm: AsyncClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await dm.images.retrieve("no-such-image")
    assert caught.value.status_code == 404
    assert str(caught.value.request) == f"GET {mock.base_url}/api/images/no-such-image"
    with pytest.raises(NotFoundError):
        await dm.images.generate(model_id="no-such-model", prompt="a lighthouse")


async def test_a_fastapi_422_reads_as_field_messages(mock: MockDeepMode, dm: AsyncClient) -> None:
    mock.fail("generate", 422, detail=[PROMPT_ERROR, NUM_IMAGES_ERROR])
    with pytest.raises(UnprocessableEntityError) as caught:
        await dm.images.generate(model_id=mock.add_model().id, prompt="a lighthouse")
    assert caught.value.detail == (
        "prompt: String should have at least 1 character; "
        "num_images: Input should be between 1 and 8"
    )
    assert "prompt: String should have at least 1 character" in str(caught.value)


async def test_retry_after_in_seconds_is_parsed(mock: MockDeepMode, dm: AsyncClient) -> None:
    mock.fail("balance", 429, retry_after=7)
    with pytest.raises(RateLimitError) as caught:
        await dm.account.balance()
    assert caught.value.retry_after == 7.0
    assert caught.value.headers["retry-after"] == "7"


async def test_retry_after_as_an_http_date_is_parsed(mock: MockDeepMode, dm: AsyncClient) -> None:
    when = int(time.time()) + 30
    mock.fail("balance", 429, retry_after=email.utils.formatdate(when, usegmt=True))
    with pytest.raises(RateLimitError) as caught:
        await dm.account.balance()
    assert caught.value.retry_after is not None
    assert when - time.time() - 1 <= caught.value.retry_after <= 30


async def test_a_429_without_retry_after_has_none(mock: MockDeepMode, dm: AsyncClient) -> None:
    mock.fail("balance", 429)
    with pytest.raises(RateLimitError) as caught:
        await dm.account.balance()
    assert caught.value.retry_after is None


# ------------------------------------------------------------------ details from any body

HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>\n"
    "<title>502 Bad   Gateway &amp; friends</title></head>\n"
    "<body><h1>nginx</h1><p>The upstream server is gone.</p></body></html>"
)


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b'{"detail": "Model is   busy\\nnow"}', "application/json", "Model is busy now"),
        (
            json.dumps({"detail": [PROMPT_ERROR]}).encode(),
            "application/json",
            "prompt: String should have at least 1 character",
        ),
        (b'{"detail": {"message": "nested message"}}', "application/json", "nested message"),
        (b'{"message": "a message"}', "application/json", "a message"),
        (b'{"error": "an error"}', "application/json", "an error"),
        (
            b"upstream connect error\r\nor disconnect",
            "text/plain",
            "upstream connect error or disconnect",
        ),
        (HTML_PAGE.encode(), "text/html", "502 Bad Gateway & friends"),
        (b"", "application/json", "HTTP 502"),
        (b"", "text/plain", "HTTP 502"),
    ],
    ids=[
        "detail",
        "fastapi-list",
        "detail-object",
        "message",
        "error",
        "text",
        "html",
        "empty",
        "empty-text",
    ],
)
async def test_detail_from_every_body_shape(
    mock: MockDeepMode, dm: AsyncClient, body: bytes, content_type: str, expected: str
) -> None:
    mock.fail("balance", 502, body=body, content_type=content_type)
    with pytest.raises(InternalServerError) as caught:
        await dm.account.balance()
    assert caught.value.detail == expected
    assert caught.value.body == body
    assert expected in str(caught.value)


async def test_a_huge_body_gives_a_clipped_detail(mock: MockDeepMode, dm: AsyncClient) -> None:
    body = "overloaded " * 100_000  # about 1 MB
    mock.fail("balance", 503, body=body, content_type="text/plain")
    with pytest.raises(InternalServerError) as caught:
        await dm.account.balance()
    detail = caught.value.detail
    assert_readable(detail)
    assert detail.startswith("overloaded overloaded")
    assert len(str(caught.value)) < 1000


async def test_non_utf8_bytes_give_a_readable_detail(mock: MockDeepMode, dm: AsyncClient) -> None:
    mock.fail(
        "balance", 500, body=b"\xff\xfe bad gateway \x80\x00\x1b[31m", content_type="text/plain"
    )
    with pytest.raises(InternalServerError) as caught:
        await dm.account.balance()
    assert_readable(caught.value.detail)
    assert "bad gateway" in caught.value.detail


async def test_a_deeply_nested_json_error_body_still_gives_a_status_error(
    mock: MockDeepMode, dm: AsyncClient
) -> None:
    mock.fail("balance", 500, body=b"[" * 100_000, content_type="application/json")
    with pytest.raises(InternalServerError) as caught:
        await dm.account.balance()
    assert_readable(caught.value.detail)


@given(body=st.binary(max_size=2000), content_type=st.text(max_size=30))
def test_read_detail_of_any_bytes_is_one_readable_line(body: bytes, content_type: str) -> None:
    assert_readable(read_detail(body, content_type))


@given(
    value=json_values,
    wrap=st.sampled_from(["", "detail", "message", "error"]),
    content_type=st.sampled_from(["application/json", "text/html", "text/plain", ""]),
)
def test_read_detail_of_any_json_is_one_readable_line(
    value: Any, wrap: str, content_type: str
) -> None:
    payload = {wrap: value} if wrap else value
    assert_readable(read_detail(json.dumps(payload).encode(), content_type))


@given(title=st.text(max_size=100), rest=st.text(max_size=200))
def test_read_detail_of_any_html_is_one_readable_line(title: str, rest: str) -> None:
    page = f"<html><head><title>{title}</title></head><body>{rest}</body></html>"
    assert_readable(read_detail(page.encode(), "text/html"))


@pytest.mark.parametrize("depth", [100_000, 5_000])
def test_read_detail_of_absurdly_nested_json_does_not_raise(depth: int) -> None:
    assert_readable(read_detail(b"[" * depth + b"]" * depth, "application/json"))


dates = st.builds(
    lambda seconds: email.utils.formatdate(seconds, usegmt=True),
    st.floats(min_value=0, max_value=4e9),
)


@given(value=st.text(max_size=60) | dates | st.floats().map(str) | st.integers().map(str))
def test_parse_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value)
    assert result is None or (isinstance(result, float) and 0 <= result < float("inf"))


def test_parse_retry_after_known_values() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after(" 12 ") == 12.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("nan") is None
    assert parse_retry_after("inf") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    ahead = parse_retry_after(email.utils.formatdate(time.time() + 100, usegmt=True))
    assert ahead is not None
    assert 98 <= ahead <= 100


# ------------------------------------------------------------------ connections and timeouts


@pytest.mark.parametrize("call", ["balance", "generate"])
async def test_a_closed_port_is_a_connection_error(closed_port: int, call: str) -> None:
    base_url = f"http://127.0.0.1:{closed_port}"
    async with AsyncClient("key", base_url=base_url, max_retries=0) as dm:
        call_it = (
            dm.account.balance()
            if call == "balance"
            else dm.images.generate(model_id="m", prompt="a lighthouse")
        )
        with pytest.raises(DeepModeError) as caught:
            await call_it
    error = caught.value
    assert isinstance(error, APIConnectionError)
    assert not isinstance(error, APITimeoutError)
    assert not isinstance(error, aiohttp.ClientError)
    method, path = (
        ("GET", "/api/check-balance") if call == "balance" else ("POST", "/api/images/generate")
    )
    assert str(error.request) == f"{method} {base_url}{path}"
    assert f"{method} {base_url}{path}" in str(error)
    assert str(closed_port) in str(error)


async def test_a_stalled_answer_is_a_timeout(mock: MockDeepMode) -> None:
    mock.stall("balance", seconds=5)
    async with AsyncClient(mock.api_key, base_url=mock.base_url, timeout=0.2, max_retries=0) as dm:
        started = time.monotonic()
        with pytest.raises(APITimeoutError) as caught:
            await dm.account.balance()
        elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 2
    error = caught.value
    assert isinstance(error, APIConnectionError)
    assert not isinstance(error, aiohttp.ClientError)
    assert str(error.request) == f"GET {mock.base_url}/api/check-balance"
    assert "timed out" in str(error)
    assert f"GET {mock.base_url}/api/check-balance" in str(error)


async def test_a_per_call_timeout_overrides_the_clients(mock: MockDeepMode) -> None:
    mock.set_latency("balance", 0.3)
    async with AsyncClient(
        mock.api_key, base_url=mock.base_url, timeout=Timeout(read=0.1), max_retries=0
    ) as dm:
        with pytest.raises(APITimeoutError):
            await dm.account.balance()
        balance = await dm.account.balance(timeout=5)
        assert balance == Balance(remaining_balance=mock.balance)
        balance = await dm.account.balance(timeout=Timeout(read=5))
        assert balance.remaining_balance == mock.balance


# ------------------------------------------------------------------ strict conversion


@pytest.mark.parametrize("value", ["5", 5.0, True, None, [5], {"n": 5}])
async def test_a_balance_of_the_wrong_type_is_a_response_validation_error(
    scripted: Scripted, sdm: AsyncClient, value: Any
) -> None:
    scripted.answer("/api/check-balance", {"remaining_balance": value})
    with pytest.raises(ResponseValidationError) as caught:
        await sdm.account.balance()
    assert "$.remaining_balance" in str(caught.value)
    assert any("$.remaining_balance" in error for error in caught.value.errors)
    assert "/api/check-balance" in str(caught.value)


async def test_a_balance_answer_is_converted(scripted: Scripted, sdm: AsyncClient) -> None:
    scripted.answer("/api/check-balance", {"remaining_balance": 42, "currency": "credits"})
    assert await sdm.account.balance() == Balance(remaining_balance=42)


@pytest.mark.parametrize("images", ["img_1", {"0": "img_1"}, 5, None])
async def test_images_not_a_list_is_a_response_validation_error(
    scripted: Scripted, sdm: AsyncClient, images: Any
) -> None:
    scripted.answer("/api/images/generate", {"images": images})
    with pytest.raises(ResponseValidationError) as caught:
        await sdm.images.generate(model_id="m", prompt="a lighthouse")
    assert "$.images" in str(caught.value)


async def test_a_bad_field_is_named_by_its_path(scripted: Scripted, sdm: AsyncClient) -> None:
    scripted.answer("/api/images/generate", {"images": [image_json(id=5)]})
    with pytest.raises(ResponseValidationError) as caught:
        await sdm.images.generate(model_id="m", prompt="a lighthouse")
    assert "$.images[0].id" in str(caught.value)
    assert "POST /api/images/generate" in str(caught.value)
    assert caught.value.body == {"images": [image_json(id=5)]}


async def test_a_missing_field_is_named_by_its_path(scripted: Scripted, sdm: AsyncClient) -> None:
    second = image_json(id="img_2")
    del second["image_url"]
    scripted.answer("/api/images/generate", {"images": [image_json(), second]})
    with pytest.raises(ResponseValidationError) as caught:
        await sdm.images.generate(model_id="m", prompt="a lighthouse")
    assert "$.images[1].image_url" in str(caught.value)


async def test_unknown_keys_are_ignored_and_optional_ones_may_be_absent(
    scripted: Scripted, sdm: AsyncClient
) -> None:
    sparse = image_json(seed=1234, nsfw=False)
    for key in ("negative_prompt", "upscaled", "ratio"):
        del sparse[key]
    scripted.answer("/api/images/generate", {"images": [sparse], "took_ms": 1200})
    generation = await sdm.images.generate(model_id="m", prompt="a lighthouse")
    assert generation == Generation(
        images=(
            Image(
                id="img_1",
                file_name="a.jpeg",
                model_id="m_1",
                image_url="http://127.0.0.1:1/c/a.jpeg?sig=x",
                prompt="a lighthouse",
            ),
        )
    )


async def test_an_unknown_ratio_stays_a_string(scripted: Scripted, sdm: AsyncClient) -> None:
    scripted.answer(
        "/api/images/generate",
        {"images": [image_json(ratio="panorama"), image_json(id="img_2", ratio="square")]},
    )
    first, second = (await sdm.images.generate(model_id="m", prompt="a lighthouse")).images
    assert first.ratio == "panorama"
    assert type(first.ratio) is str
    assert second.ratio is Ratio.SQUARE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-05-01T12:00:00Z", dt.datetime(2030, 5, 1, 12, tzinfo=dt.UTC)),
        ("2030-05-01T12:00:00.123456Z", dt.datetime(2030, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)),
        ("2030-05-01T12:00:00.5Z", dt.datetime(2030, 5, 1, 12, 0, 0, 500000, tzinfo=dt.UTC)),
        ("2030-05-01T14:00:00+02:00", dt.datetime(2030, 5, 1, 12, tzinfo=dt.UTC)),
        ("2030-05-01T12:00:00", dt.datetime(2030, 5, 1, 12, tzinfo=dt.UTC)),
    ],
)
async def test_datetimes_are_timezone_aware(
    scripted: Scripted, sdm: AsyncClient, text: str, expected: dt.datetime
) -> None:
    scripted.answer("/api/models/m_1/extend", {"updated_expire_at": text})
    extension = await sdm.models.extend("m_1")
    assert isinstance(extension, ModelExtension)
    assert extension.updated_expire_at.tzinfo is not None
    assert extension.updated_expire_at.utcoffset() is not None
    assert extension.updated_expire_at == expected


@pytest.mark.parametrize("text", ["yesterday", "2030-13-01T00:00:00Z", ""])
async def test_a_bad_datetime_is_a_response_validation_error(
    scripted: Scripted, sdm: AsyncClient, text: str
) -> None:
    scripted.answer("/api/models/m_1/extend", {"updated_expire_at": text})
    with pytest.raises(ResponseValidationError) as caught:
        await sdm.models.extend("m_1")
    assert "$.updated_expire_at" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html><body>OK</body></html>", "text/html"),
        (b"remaining_balance=5", "text/plain"),
        (b"", "application/json"),
        (b'{"remaining_balance": 5', "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b"[" * 100_000, "application/json"),
    ],
    ids=["html", "text", "empty", "cut-off", "binary", "deeply-nested"],
)
async def test_a_non_json_2xx_is_a_response_validation_error(
    scripted: Scripted, sdm: AsyncClient, body: bytes, content_type: str
) -> None:
    scripted.answer("/api/check-balance", body, content_type=content_type)
    with pytest.raises(ResponseValidationError) as caught:
        await sdm.account.balance()
    assert "/api/check-balance" in str(caught.value)


@pytest.mark.parametrize("body", [[{"remaining_balance": 5}], "5", 5, None])
async def test_json_that_is_not_an_object_is_a_response_validation_error(
    scripted: Scripted, sdm: AsyncClient, body: Any
) -> None:
    scripted.answer("/api/check-balance", body)
    with pytest.raises(ResponseValidationError) as caught:
        await sdm.account.balance()
    assert "expected an object" in str(caught.value)
    assert caught.value.errors[0].endswith("@ $")


def text_or_json(extra: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[Any]:
    base = st.text(max_size=10) | json_values
    return base if extra is None else base | extra


image_like = st.fixed_dictionaries(
    {
        "id": text_or_json(),
        "file_name": text_or_json(),
        "model_id": text_or_json(),
        "image_url": text_or_json(),
        "prompt": text_or_json(),
    },
    optional={
        "negative_prompt": text_or_json(),
        "upscaled": text_or_json(st.booleans()),
        "ratio": text_or_json(st.sampled_from(["portrait", "square", "panorama"])),
        "extra": json_values,
    },
)
answers = (
    json_values
    | st.fixed_dictionaries({"remaining_balance": text_or_json(st.integers())})
    | st.fixed_dictionaries({"images": json_values | st.lists(image_like, max_size=3)})
    | st.fixed_dictionaries({"updated_expire_at": text_or_json(st.datetimes().map(str))})
    | image_like
)


@settings(max_examples=300)
@given(data=answers)
def test_any_json_answer_converts_or_raises_response_validation_error(data: Any) -> None:
    for cls in (Balance, Generation, Image, ModelExtension):
        result: object = None
        try:
            result = structure(data, cls, "GET /api/test")
        except ResponseValidationError as error:
            result = error
        if isinstance(result, ResponseValidationError):
            assert result.errors
            assert "GET /api/test" in str(result)
        else:
            assert isinstance(result, cls)


# ------------------------------------------------------------------ secrets


SECRET_KEY = "sk-live-7f3c9a1e5b2d4c6e8f0a"


async def test_the_key_and_signatures_stay_out_of_logs_and_errors(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    sdk_logger: logging.Logger,
    tmp_path: Any,
) -> None:
    monkeypatch.setenv("DEEPMODE_LOG", "debug")
    caplog.set_level(logging.DEBUG, logger="deepmode_async")
    errors: list[DeepModeError] = []
    async with MockDeepMode(api_key=SECRET_KEY) as mock:
        model = mock.add_model()
        async with AsyncClient(SECRET_KEY, base_url=mock.base_url, max_retries=1) as dm:
            assert SECRET_KEY not in repr(dm)
            await dm.account.balance()
            generation = await dm.images.generate(model_id=model.id, prompt="a lighthouse")
            paths = await dm.images.download(generation, tmp_path / "first")
            assert paths[0].read_bytes() == mock.image_bytes
            # An expired URL: the refused download and its refresh are logged too.
            mock.advance_clock(2 * 3600)
            paths = await dm.images.download(generation, tmp_path / "second")
            assert paths[0].read_bytes() == mock.image_bytes
            mock.fail("download", 404, times=2)
            with pytest.raises(DownloadError) as download_error:
                await dm.images.download(generation, tmp_path / "third")
            errors.append(download_error.value)
            mock.fail("balance", 401)
            with pytest.raises(AuthenticationError) as unauthorized:
                await dm.account.balance()
            errors.append(unauthorized.value)
            mock.fail("generate", 500)
            with pytest.raises(InternalServerError) as server_error:
                await dm.images.generate(model_id=model.id, prompt="a lighthouse")
            errors.append(server_error.value)
            mock.fail("balance", 503)  # retried: a WARNING line
            await dm.account.balance()
        async with AsyncClient("sk-wrong-0000", base_url=mock.base_url, max_retries=0) as wrong:
            with pytest.raises(AuthenticationError) as wrong_key:
                await wrong.account.balance()
            errors.append(wrong_key.value)

        downloads = [r for r in mock.requests if r.endpoint == "download"]
        assert len(downloads) >= 4
        for record in downloads:
            assert "authorization" not in {name.lower() for name in record.headers}
        api_calls = [r for r in mock.requests if r.endpoint not in (None, "download")]
        assert all(r.headers.get("Authorization") == "[redacted]" for r in api_calls)

    messages = [record.getMessage() for record in caplog.records]
    assert any("(attempt 1)" in message for message in messages)
    assert any(record.levelno == logging.WARNING for record in caplog.records)
    assert any("?[redacted]" in message for message in messages)
    for message in messages:
        assert SECRET_KEY not in message
        assert "sk-wrong-0000" not in message
        assert "sig=" not in message
    stderr = capsys.readouterr().err
    assert "(attempt 1)" in stderr  # DEEPMODE_LOG=debug turned on the SDK's own handler
    assert SECRET_KEY not in stderr
    assert "sig=" not in stderr

    assert len(errors) == 4
    for error in errors:
        texts = [str(error), repr(error), repr(error.args)]
        if isinstance(error, APIError):
            texts += [str(error.request), repr(error.request)]
        if isinstance(error, APIStatusError):
            texts += [repr(dict(error.headers)), error.body.decode("utf-8", "replace")]
        for text in texts:
            assert SECRET_KEY not in text
            assert "sk-wrong-0000" not in text
            assert "sig=" not in text


async def test_a_redirect_is_not_followed_so_no_header_reaches_another_origin() -> None:
    async with scripted_server() as home, scripted_server() as elsewhere:
        home.answer(
            "/api/check-balance",
            b"",
            status=307,
            headers={"Location": f"{elsewhere.base_url}/api/check-balance"},
        )
        elsewhere.answer("/api/check-balance", {"remaining_balance": 7})
        headers = {"X-Tenant-Token": "tenant-secret"}
        async with AsyncClient(
            SECRET_KEY, base_url=home.base_url, max_retries=0, default_headers=headers
        ) as dm:
            with pytest.raises(APIStatusError) as caught:
                await dm.account.balance()
        assert type(caught.value) is APIStatusError
        assert caught.value.status_code == 307
        ((_, home_path, home_headers),) = home.seen
        assert home_path == "/api/check-balance"
        assert home_headers["Authorization"] == f"Bearer {SECRET_KEY}"
        assert elsewhere.seen == []  # neither the key nor the default headers went there
        assert SECRET_KEY not in str(caught.value) + repr(caught.value)


# ------------------------------------------------------------------ pickling


async def test_errors_pickle_with_their_attributes(
    mock: MockDeepMode, closed_port: int, tmp_path: pathlib.Path
) -> None:
    """Errors cross process boundaries (multiprocessing, task queues) whole."""
    mock.fail("generate", 429, retry_after=7, detail="slow down")
    errors: list[DeepModeError] = []
    async with AsyncClient(mock.api_key, base_url=mock.base_url, max_retries=0) as dm:
        for call in (
            dm.images.generate(model_id="m", prompt="a cat"),
            dm.images.retrieve("missing"),
            dm.images.generate(model_id="m", prompt=""),
        ):
            with pytest.raises(DeepModeError) as caught:
                await call
            errors.append(caught.value)
        image = attrs.evolve(
            (await dm.images.generate(model_id=mock.add_model().id, prompt="a")).images[0],
            image_url=f"http://127.0.0.1:{closed_port}/x.jpg",
        )
        with pytest.raises(DownloadError) as download:
            await dm.images.download(image, tmp_path)
        errors.append(download.value)
    errors.append(CallbackTimeoutError("no callback", pending=threading.Lock()))

    assert [type(error) for error in errors] == [
        RateLimitError,
        NotFoundError,
        ValidationError,
        DownloadError,
        CallbackTimeoutError,
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own bytes)
        assert (type(copy), str(copy), copy.args) == (type(error), str(error), error.args)
        local = {"pending"} if isinstance(error, CallbackTimeoutError) else set()
        for name, value in vars(error).items():
            assert getattr(copy, name) == (None if name in local else value), name
    rate_limited = pickle.loads(pickle.dumps(errors[0]))  # noqa: S301 (our own bytes)
    assert isinstance(rate_limited, RateLimitError)
    assert isinstance(errors[0], RateLimitError)
    assert (rate_limited.status_code, rate_limited.retry_after) == (429, 7)
    assert rate_limited.headers["retry-after"] == "7"  # still case-insensitive
    assert rate_limited.request == errors[0].request
