"""Callback mode: the parsers, `CallbackHub` and its aiohttp and ASGI adapters on real servers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import re
import socket
import threading
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import fastapi
import pytest
import requests
import uvicorn
from aiohttp import web
from conftest import eventually, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepmode_async import (
    APIConnectionError,
    AsyncClient,
    CallbackTimeoutError,
    Client,
    DeepModeError,
    Generation,
    Image,
    InsufficientCreditsError,
    Model,
    NotFoundError,
    ValidationError,
)
from deepmode_async._errors import ResponseValidationError
from deepmode_async.callbacks import (
    CallbackHub,
    PendingCallback,
    parse_generation_callback,
    parse_model_callback,
    parse_upscale_callback,
)
from deepmode_async.stores import MemoryStore
from deepmode_async.testing import MockDeepMode, sample_image

pytestmark = [pytest.mark.anyio, pytest.mark.dm(max_retries=0, fast=False)]

JPEG = sample_image("jpeg")
TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")

# The documented JSON (reference/deepmode-api.md), for the fuzzers' shapes.
DOC_IMAGE: dict[str, Any] = {
    "id": "93b5e1c7a4f2d6g8h9k1m",
    "file_name": "120e453f-3a73-4016-ad6a-5cd5e00ddd45.jpeg",
    "model_id": "b8a9f7e5d1c3a2f91e3d5",
    "image_url": "https://deepmodeimage.blob.core.windows.net/deepmode-user-image/120e.jpeg"
    "?st=2024-04-29T14%3A28%3A02Z&se=2024-04-29T15%3A28%3A02Z&sp=r&sv=2023-11-03&sr=b&sig=N%3D",
    "prompt": "A beautiful landscape with mountains and a river.",
    "negative_prompt": "rainy, foggy",
    "upscaled": True,
    "ratio": "portrait",
}
DOC_MODEL: dict[str, Any] = {
    "id": "c6b8a9f7e5d1c3a2f91e3",
    "name": "My model",
    "gender": "woman",
    "active": True,
    "created_at": "2024-04-01T12:00:00Z",
    "expire_at": "2024-05-01T12:00:00Z",
}
DOC_GENERATION: dict[str, Any] = {"images": [DOC_IMAGE, {**DOC_IMAGE, "id": "second"}]}

Parser = Callable[[Any], Any]
PARSERS: dict[str, tuple[Parser, type]] = {
    "model": (parse_model_callback, Model),
    "generation": (parse_generation_callback, Generation),
    "upscale": (parse_upscale_callback, Image),
}
DOC_BODIES: dict[str, dict[str, Any]] = {
    "model": DOC_MODEL,
    "generation": DOC_GENERATION,
    "upscale": DOC_IMAGE,
}


# --------------------------------------------------------------------------- real bodies


@pytest.fixture(scope="module")
def delivered() -> dict[str, Any]:
    """What the mock really POSTs for each kind of callback (to a URL nobody listens on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{sock.getsockname()[1]}/cb"
    with (
        MockDeepMode(callback_retries=0) as mock,
        Client(mock.api_key, base_url=mock.base_url) as dm,
    ):
        model = mock.add_model()
        dm.images.generate(model_id=model.id, prompt="a lighthouse", num_images=2, callback=nowhere)
        image = dm.images.generate(model_id=model.id, prompt="a harbour").images[0]
        dm.images.upscale(image.id, callback=nowhere)
        dm.models.create(images=[JPEG], gender="man", model_type="amateur", callback=nowhere)
        wait_until(
            lambda: len(mock.callbacks) >= 3 and all(c.finished for c in mock.callbacks),
            describe=lambda: mock.callbacks,
        )
        bodies: dict[str, Any] = {delivery.kind: delivery.body for delivery in mock.callbacks}
    assert set(bodies) == {"model", "generation", "upscale"}
    return bodies


def as_bytes(body: Any) -> bytes:
    return json.dumps(body).encode()


def image_body(image_id: str = "img-1", **changes: Any) -> dict[str, Any]:
    return {**DOC_IMAGE, "id": image_id, **changes}


# --------------------------------------------------------------------------- 1. parsers


BODY_FORMS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "bytes": as_bytes,
    "str": json.dumps,
    "bytearray": lambda body: bytearray(as_bytes(body)),
    "memoryview": lambda body: memoryview(as_bytes(body)),
    "dict": lambda body: body,
    "mappingproxy": types.MappingProxyType,
}


@pytest.mark.parametrize("form", BODY_FORMS)
def test_model_callback_parses_in_every_form(delivered: dict[str, Any], form: str) -> None:
    body = delivered["model"]
    model = parse_model_callback(BODY_FORMS[form](body))
    assert isinstance(model, Model)
    assert model.id == body["id"]
    assert model.gender == "man"
    assert model.active is True
    assert model.created_at.tzinfo is not None
    assert model.expire_at.tzinfo is not None
    assert model.created_at.utcoffset() == dt.timedelta(0)
    assert model.expire_at - model.created_at > dt.timedelta(days=29)


@pytest.mark.parametrize("form", BODY_FORMS)
def test_generation_callback_parses_in_every_form(delivered: dict[str, Any], form: str) -> None:
    body = delivered["generation"]
    generation = parse_generation_callback(BODY_FORMS[form](body))
    assert isinstance(generation, Generation)
    assert [image.id for image in generation.images] == [i["id"] for i in body["images"]]
    assert len(generation.images) == 2
    assert all(isinstance(image, Image) for image in generation.images)
    assert generation.images[0].prompt == "a lighthouse"
    assert generation.images[0].image_url == body["images"][0]["image_url"]


@pytest.mark.parametrize("form", BODY_FORMS)
def test_upscale_callback_parses_in_every_form(delivered: dict[str, Any], form: str) -> None:
    body = delivered["upscale"]
    image = parse_upscale_callback(BODY_FORMS[form](body))
    assert isinstance(image, Image)
    assert image.id == body["id"]
    assert image.upscaled is True
    assert image.prompt == "a harbour"


def test_documented_bodies_parse_and_unknown_keys_are_ignored() -> None:
    model = parse_model_callback({**DOC_MODEL, "future_field": {"x": [1, 2]}, "extra": None})
    assert model.id == DOC_MODEL["id"]
    assert model.name == "My model"
    assert model.created_at == dt.datetime(2024, 4, 1, 12, tzinfo=dt.UTC)
    image = parse_upscale_callback(json.dumps({**DOC_IMAGE, "seed": 42}))
    assert image.negative_prompt == "rainy, foggy"
    generation = parse_generation_callback(
        {"images": [{**DOC_IMAGE, "nsfw": False}], "credits_left": 3}
    )
    assert generation.images[0].id == DOC_IMAGE["id"]


def test_a_time_without_offset_is_taken_as_utc() -> None:
    model = parse_model_callback({**DOC_MODEL, "created_at": "2024-04-01T12:00:00"})
    assert model.created_at == dt.datetime(2024, 4, 1, 12, tzinfo=dt.UTC)


def errors_of(parser: Parser, body: Any) -> ResponseValidationError:
    with pytest.raises(ResponseValidationError) as caught:
        parser(body)
    return caught.value


@pytest.mark.parametrize(
    ("parser", "body", "path"),
    [
        (parse_model_callback, {**DOC_MODEL, "id": 5}, "$.id"),
        (parse_model_callback, {**DOC_MODEL, "active": "yes"}, "$.active"),
        (parse_model_callback, {**DOC_MODEL, "created_at": "last tuesday"}, "$.created_at"),
        (parse_model_callback, {**DOC_MODEL, "expire_at": 1714564800}, "$.expire_at"),
        (parse_model_callback, {k: v for k, v in DOC_MODEL.items() if k != "gender"}, "$.gender"),
        (
            parse_generation_callback,
            {"images": [image_body(upscaled="yes")]},
            "$.images[0].upscaled",
        ),
        (parse_generation_callback, {"images": [DOC_IMAGE, image_body(id=7)]}, "$.images[1].id"),
        (parse_generation_callback, {"images": "abc"}, "$.images"),
        (parse_generation_callback, {"images": {"id": "x"}}, "$.images"),
        (parse_generation_callback, {}, "$.images"),
        (parse_generation_callback, {"images": [1]}, "$.images[0]"),
        (parse_upscale_callback, {**DOC_IMAGE, "prompt": None}, "$.prompt"),
        (parse_upscale_callback, {**DOC_IMAGE, "upscaled": 1}, "$.upscaled"),
        (parse_upscale_callback, {k: v for k, v in DOC_IMAGE.items() if k != "id"}, "$.id"),
    ],
)
def test_a_misfit_names_the_field(parser: Parser, body: dict[str, Any], path: str) -> None:
    for form in (body, as_bytes(body), json.dumps(body), types.MappingProxyType(body)):
        error = errors_of(parser, form)
        assert any(message.endswith(f"@ {path}") for message in error.errors), error.errors
        assert path in str(error)
        assert isinstance(error, DeepModeError)


def test_a_missing_field_says_so() -> None:
    body = {k: v for k, v in DOC_MODEL.items() if k not in ("created_at", "active")}
    error = errors_of(parse_model_callback, body)
    assert set(error.errors) == {
        "required field missing @ $.created_at",
        "required field missing @ $.active",
    }


@pytest.mark.parametrize("parser", [p for p, _ in PARSERS.values()])
def test_bodies_that_are_not_objects_are_refused(parser: Parser) -> None:
    for body in (b"[1, 2]", "[]", bytearray(b"[{}]")):
        assert errors_of(parser, body).errors == ("expected an object, got array @ $",)
    assert errors_of(parser, b'"text"').errors == ("expected an object, got string @ $",)
    assert errors_of(parser, "null").errors == ("expected an object, got null @ $",)
    assert errors_of(parser, b"12").errors == ("expected an object, got integer @ $",)


@pytest.mark.parametrize("parser", [p for p, _ in PARSERS.values()])
def test_bodies_that_are_not_json_are_refused(parser: Parser) -> None:
    for body in (b"", b"not json", "{'id': 1}", b'{"id": "x"', b"<html>502</html>"):
        error = errors_of(parser, body)
        assert "not JSON" in str(error)
        assert error.errors == ("the body is not JSON @ $",)
    non_utf8 = b'{"id": "\xff\xfe\xfd"}'
    assert "not JSON" in str(errors_of(parser, non_utf8))
    assert "not JSON" in str(errors_of(parser, b"[" * 100_000))  # deeper than json goes


@pytest.mark.parametrize("parser", [p for p, _ in PARSERS.values()])
def test_bodies_of_other_python_types_are_refused(parser: Parser) -> None:
    for body, name in ((5, "int"), (None, "NoneType"), (1.5, "float"), ([1], "list")):
        error = errors_of(parser, body)
        problem = f"expected bytes, str or a mapping, got {name} @ $"
        assert str(error).endswith(problem)
        assert error.errors == (problem,)


# --------------------------------------------------------------------------- 2. fuzzing


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["2024-04-01T12:00:00Z", "portrait", "woman", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


_DROP: Any = object()


def field(value: Any) -> st.SearchStrategy[Any]:
    """A field's value kept, dropped (`_DROP`) or replaced by any JSON value."""
    return st.just(value) | st.just(_DROP) | json_values


def shaped(template: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """`template` with any field dropped, kept, or replaced by any JSON value, plus extras."""
    fields = {key: field(value) for key, value in template.items()}
    return st.fixed_dictionaries(fields, optional={"unknown": json_values}).map(
        lambda drawn: {k: v for k, v in drawn.items() if v is not _DROP}
    )


shaped_bodies: dict[str, st.SearchStrategy[Any]] = {
    "model": shaped(DOC_MODEL),
    "upscale": shaped(DOC_IMAGE),
    "generation": st.fixed_dictionaries(
        {"images": st.lists(shaped(DOC_IMAGE), max_size=3) | json_values}
    )
    | shaped(DOC_GENERATION),
}
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parses_or_refuses(kind: str, body: Any) -> None:
    """The parser returns its class or raises ResponseValidationError, nothing else."""
    parser, cls = PARSERS[kind]
    try:
        result = parser(body)
    except ResponseValidationError as error:
        errors = error.errors
    else:
        check_result(result, cls)
        return
    assert all(" @ $" in message for message in errors), errors


def check_result(result: Any, cls: type) -> None:
    assert isinstance(result, cls)
    if isinstance(result, Model):
        assert result.created_at.tzinfo is not None
        assert result.expire_at.tzinfo is not None
    if isinstance(result, Generation):
        assert all(isinstance(image, Image) for image in result.images)


@FUZZ
@given(kind=st.sampled_from(list(PARSERS)), body=st.binary(max_size=300))
def test_fuzz_any_bytes(kind: str, body: bytes) -> None:
    parses_or_refuses(kind, body)
    parses_or_refuses(kind, bytearray(body))


@FUZZ
@given(kind=st.sampled_from(list(PARSERS)), body=st.text(max_size=300))
def test_fuzz_any_text(kind: str, body: str) -> None:
    parses_or_refuses(kind, body)


@FUZZ
@given(kind=st.sampled_from(list(PARSERS)), value=json_values)
def test_fuzz_any_json_value(kind: str, value: Any) -> None:
    parses_or_refuses(kind, value)
    parses_or_refuses(kind, json.dumps(value))
    parses_or_refuses(kind, json.dumps(value).encode())


@FUZZ
@given(data=st.data(), kind=st.sampled_from(list(PARSERS)))
def test_fuzz_bodies_shaped_like_the_real_ones(data: st.DataObject, kind: str) -> None:
    body = data.draw(shaped_bodies[kind])
    parses_or_refuses(kind, body)
    parses_or_refuses(kind, types.MappingProxyType(body))
    parses_or_refuses(kind, json.dumps(body).encode())


# --------------------------------------------------------------------------- 3. hub basics


def token_of(pending: PendingCallback[Any]) -> str:
    return pending.url.rsplit("/", 1)[1]


@pytest.mark.parametrize(
    "base", ["https://app.example.com/hooks", "https://app.example.com/hooks/"]
)
def test_urls_are_under_the_public_base(base: str) -> None:
    hub = CallbackHub(base)
    assert hub.public_base_url == "https://app.example.com/hooks"
    for kind in ("model", "generation", "upscale"):
        pending = hub.expect(kind)
        assert pending.kind == kind
        assert pending.url.startswith("https://app.example.com/hooks/")
        assert "//" not in pending.url.removeprefix("https://")
        assert TOKEN.fullmatch(token_of(pending)), pending.url


def test_tokens_are_unique_and_long() -> None:
    hub = CallbackHub("http://127.0.0.1:1/cb", max_pending=2000)
    tokens = {token_of(hub.expect("upscale")) for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(TOKEN.fullmatch(token) for token in tokens)
    assert all(len(token) == 43 for token in tokens)  # token_urlsafe(32): 256 bits
    assert len(hub._state.pending) == 1000


def test_reprs_leave_the_token_out() -> None:
    hub = CallbackHub("http://127.0.0.1:1/cb")
    pending = hub.expect("generation")
    token = token_of(pending)
    assert token not in repr(pending)
    assert token not in str(pending)
    assert token not in repr(hub)
    assert repr(pending) == "<PendingCallback kind='generation' done=False>"
    assert repr(hub) == "CallbackHub('http://127.0.0.1:1/cb', pending=1)"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"public_base_url": "ftp://x"},
        {"public_base_url": "http://app.example.com/cb?a=1"},
        {"public_base_url": "http://app.example.com/cb#frag"},
        {"public_base_url": "/relative/cb"},
        {"public_base_url": ""},
        {"ttl": 0},
        {"ttl": -1},
        {"ttl": math.nan},
        {"ttl": math.inf},
        {"ttl": True},
        {"max_pending": 0},
        {"max_pending": -3},
        {"max_body_size": 0},
    ],
)
def test_bad_hub_arguments(kwargs: dict[str, Any]) -> None:
    arguments = {"public_base_url": "http://app.example.com/cb", **kwargs}
    with pytest.raises(ValidationError):
        CallbackHub(**arguments)


def test_bad_expect_arguments() -> None:
    hub = CallbackHub("http://app.example.com/cb")
    with pytest.raises(ValidationError, match="kind"):
        hub.expect("foo")  # type: ignore[call-overload]
    for ttl in (0, -1, math.nan):
        with pytest.raises(ValidationError, match="ttl"):
            hub.expect("model", ttl=ttl)
    assert len(hub._state.pending) == 0


# --------------------------------------------------------------------------- servers


ADAPTERS = ["aiohttp", "asgi"]


class StartHub(Protocol):
    def __call__(
        self, *, ttl: float = ..., max_pending: int = ..., max_body_size: int = ...
    ) -> Awaitable[CallbackHub]: ...


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serve_aiohttp(hub: CallbackHub, sock: socket.socket) -> AsyncIterator[None]:
    app = web.Application()
    app.add_subapp("/cb", hub.aiohttp_app())
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield
    finally:
        await runner.cleanup()
        sock.close()


@contextlib.asynccontextmanager
async def serve_uvicorn(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    config = uvicorn.Config(
        app=app,
        host="127.0.0.1",
        port=sock.getsockname()[1],
        log_level="warning",
        log_config=None,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started or task.done(), within=5)
        assert server.started, task.result()
        yield
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture(params=ADAPTERS)
async def serve(request: pytest.FixtureRequest) -> AsyncIterator[StartHub]:
    """Start a hub (with the given options) served on loopback by the adapter in the param."""
    adapter: str = request.param
    async with contextlib.AsyncExitStack() as stack:

        async def start(**options: Any) -> CallbackHub:
            sock = bound_socket()
            port = sock.getsockname()[1]
            hub = CallbackHub(f"http://127.0.0.1:{port}/cb", **options)
            if adapter == "aiohttp":
                await stack.enter_async_context(serve_aiohttp(hub, sock))
            elif adapter == "asgi":
                await stack.enter_async_context(serve_uvicorn(hub.asgi_app(), sock))
            else:
                assert adapter == "fastapi", adapter
                app = fastapi.FastAPI()
                app.mount("/cb", hub.asgi_app())
                await stack.enter_async_context(serve_uvicorn(app, sock))
            return hub

        yield start


async def post(
    plain: aiohttp.ClientSession, url: str, body: bytes | dict[str, Any]
) -> tuple[int, str]:
    """POST a body; the answer's status and `detail`."""
    data = body if isinstance(body, bytes) else as_bytes(body)
    headers = {"Content-Type": "application/json"}
    async with plain.post(url, data=data, headers=headers) as response:
        answer = await response.json(content_type=None)
        return response.status, str(answer["detail"])


async def waiting(pending: PendingCallback[Any], timeout: float = 2) -> asyncio.Task[Any]:
    """A task waiting for `pending`, already registered as a waiter."""
    task = asyncio.create_task(pending.wait(timeout=timeout))
    await asyncio.sleep(0.01)
    assert not task.done()
    return task


# --------------------------------------------------------------------------- 4. adapters


async def test_a_valid_delivery_resolves(
    serve: StartHub, plain: aiohttp.ClientSession, delivered: dict[str, Any]
) -> None:
    hub = await serve()
    generation = hub.expect("generation")
    model = hub.expect("model")
    upscale = hub.expect("upscale")
    waiter = await waiting(generation)
    assert await post(plain, generation.url, delivered["generation"]) == (200, "received")
    result = await waiter
    assert isinstance(result, Generation)
    assert [i.id for i in result.images] == [i["id"] for i in delivered["generation"]["images"]]
    assert generation.done
    assert repr(generation) == "<PendingCallback kind='generation' done=True>"
    # Delivered before anyone waits: the wait returns at once.
    assert await post(plain, model.url, delivered["model"]) == (200, "received")
    assert await post(plain, upscale.url, delivered["upscale"]) == (200, "received")
    trained = await model.wait(timeout=2)
    assert trained.id == delivered["model"]["id"]
    assert trained.created_at.tzinfo is not None
    assert (await upscale.wait(timeout=2)).upscaled is True


async def test_fastapi_mount(plain: aiohttp.ClientSession, delivered: dict[str, Any]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sock = bound_socket()
        hub = CallbackHub(f"http://127.0.0.1:{sock.getsockname()[1]}/cb/")
        app = fastapi.FastAPI()
        app.mount("/cb", hub.asgi_app())
        await stack.enter_async_context(serve_uvicorn(app, sock))
        pending = hub.expect("upscale")
        waiter = await waiting(pending)
        assert await post(plain, pending.url, delivered["upscale"]) == (200, "received")
        assert (await waiter).id == delivered["upscale"]["id"]
        assert (await post(plain, hub.public_base_url + "/nope", b"{}"))[0] == 404
        async with plain.get(pending.url) as response:
            assert response.status == 405
        # Outside the mount FastAPI answers, not the hub.
        outside = pending.url.replace("/cb/", "/elsewhere/")
        async with plain.post(outside, data=b"{}") as response:
            assert response.status == 404
        assert pending.done


async def test_a_delivery_with_a_trailing_slash_is_received_by_either_adapter(
    serve: StartHub, plain: aiohttp.ClientSession, delivered: dict[str, Any]
) -> None:
    hub = await serve()
    pending = hub.expect("upscale")
    assert await post(plain, pending.url + "/", delivered["upscale"]) == (200, "received")
    assert (await pending.wait(timeout=2)).id == delivered["upscale"]["id"]


async def test_a_method_other_than_post_is_405_in_json_from_either_adapter(
    serve: StartHub, plain: aiohttp.ClientSession
) -> None:
    hub = await serve()
    pending = hub.expect("upscale")
    for url in (pending.url, pending.url + "/"):
        for method in ("GET", "PUT", "DELETE", "OPTIONS", "HEAD"):
            async with plain.request(method, url) as response:
                assert response.status == 405
                assert response.headers["Allow"] == "POST"
                if method != "HEAD":
                    detail = {"detail": "callbacks are delivered with POST"}
                    assert await response.json() == detail
    assert not pending.done


async def test_unknown_token_is_404(serve: StartHub, plain: aiohttp.ClientSession) -> None:
    hub = await serve()
    pending = hub.expect("upscale")
    status, detail = await post(plain, hub.public_base_url + "/" + "A" * 43, as_bytes(DOC_IMAGE))
    assert (status, detail) == (404, "unknown or expired callback URL")
    assert not pending.done


async def test_a_discarded_callback_is_404_and_its_waiters_fail(
    serve: StartHub, plain: aiohttp.ClientSession
) -> None:
    hub = await serve()
    pending = hub.expect("upscale")
    first, second = await waiting(pending), await waiting(pending)
    pending.discard()
    for task in (first, second):
        with pytest.raises(DeepModeError, match="discarded") as caught:
            await task
        assert not isinstance(caught.value, CallbackTimeoutError)
    assert await post(plain, pending.url, DOC_IMAGE) == (404, "unknown or expired callback URL")
    with pytest.raises(DeepModeError, match="discarded"):
        await pending.wait(timeout=1)
    assert len(hub._state.pending) == 0
    pending.discard()  # twice is harmless


async def test_discarding_one_handle_fails_the_wait_on_another_of_its_token() -> None:
    hub = CallbackHub("http://127.0.0.1:9/cb")
    first = hub.expect("upscale")
    first.release()
    again = hub.resume(first.token)  # another handle of the same token, which waits
    waiter = await waiting(again)
    first.discard()
    with pytest.raises(DeepModeError, match="discarded"):
        await asyncio.wait_for(waiter, 5)
    hub.close()


async def test_an_expired_callback_is_404(serve: StartHub, plain: aiohttp.ClientSession) -> None:
    hub = await serve(ttl=0.05)
    pending = hub.expect("upscale")
    longer = hub.expect("upscale", ttl=5)
    await asyncio.sleep(0.1)
    assert await post(plain, pending.url, DOC_IMAGE) == (404, "unknown or expired callback URL")
    assert not pending.done
    assert await post(plain, longer.url, DOC_IMAGE) == (200, "received")
    assert repr(hub).endswith("pending=1)")


async def test_an_invalid_body_is_400_and_the_callback_still_waits(
    serve: StartHub, plain: aiohttp.ClientSession, delivered: dict[str, Any]
) -> None:
    hub = await serve()
    pending = hub.expect("generation")
    waiter = await waiting(pending)
    bad = {"images": [{**delivered["generation"]["images"][0], "upscaled": "yes"}]}
    status, detail = await post(plain, pending.url, bad)
    assert status == 400
    assert "$.images[0].upscaled" in detail
    status, detail = await post(plain, pending.url, b"not json at all")
    assert status == 400
    assert "not JSON" in detail
    await asyncio.sleep(0.02)
    assert not waiter.done()
    assert not pending.done
    assert await post(plain, pending.url, delivered["generation"]) == (200, "received")
    assert len((await waiter).images) == 2


async def test_a_repeated_delivery_is_acknowledged_and_ignored(
    serve: StartHub, plain: aiohttp.ClientSession
) -> None:
    hub = await serve()
    pending = hub.expect("upscale")
    assert await post(plain, pending.url, image_body("first")) == (200, "received")
    assert await post(plain, pending.url, image_body("second")) == (200, "already received")
    assert (await pending.wait(timeout=1)).id == "first"
    # Still acknowledged after the result was handed out, and still the first value.
    assert await post(plain, pending.url, b"garbage") == (200, "already received")
    assert (await pending.wait(timeout=1)).id == "first"


async def test_a_body_over_the_limit_is_413(serve: StartHub, plain: aiohttp.ClientSession) -> None:
    hub = await serve(max_body_size=1000)
    pending = hub.expect("upscale")
    big = as_bytes(image_body(prompt="x" * 5000))
    status, detail = await post(plain, pending.url, big)
    assert status == 413
    assert "1000 bytes" in detail
    assert not pending.done
    small = as_bytes(image_body("small"))
    assert len(small) < 1000
    assert await post(plain, pending.url, small) == (200, "received")
    assert (await pending.wait(timeout=1)).id == "small"


async def read_status(reader: asyncio.StreamReader) -> int:
    status_line = await asyncio.wait_for(reader.readline(), 2)
    return int(status_line.split()[1])


async def test_a_huge_body_is_refused_without_reading_it(serve: StartHub) -> None:
    hub = await serve(max_body_size=1000)
    pending = hub.expect("upscale")
    url = urlsplit(pending.url)
    assert url.hostname is not None
    assert url.port is not None
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        head = (
            f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {20 * 1024 * 1024}\r\n\r\n"
        )
        # Only 5000 of the 20 MB announced are ever sent: the answer must not wait for more.
        writer.write(head.encode() + b"x" * 5000)
        await writer.drain()
        started = time.monotonic()
        assert await read_status(reader) == 413
        assert time.monotonic() - started < 1.5
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert not pending.done


async def test_a_20mb_body_gets_413_quickly(serve: StartHub) -> None:
    hub = await serve(max_body_size=1000)
    pending = hub.expect("upscale")
    url = urlsplit(pending.url)
    assert url.hostname is not None
    assert url.port is not None
    size = 20 * 1024 * 1024
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    )

    async def pump() -> None:
        writer.write(head.encode())
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    sending = asyncio.create_task(pump())
    started = time.monotonic()
    try:
        assert await read_status(reader) == 413
        assert time.monotonic() - started < 2
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert not pending.done


async def test_get_is_405(serve: StartHub, plain: aiohttp.ClientSession) -> None:
    hub = await serve()
    pending = hub.expect("upscale")
    for method in ("GET", "PUT", "DELETE"):
        async with plain.request(method, pending.url) as response:
            assert response.status == 405, method
            assert "POST" in response.headers.get("Allow", "")
    assert not pending.done
    assert await post(plain, pending.url, DOC_IMAGE) == (200, "received")


# --------------------------------------------------------------------------- 5. waiting


async def test_a_wait_times_out_and_can_be_waited_again(
    serve: StartHub, plain: aiohttp.ClientSession
) -> None:
    hub = await serve()
    pending = hub.expect("upscale")
    started = time.monotonic()
    with pytest.raises(CallbackTimeoutError) as caught:
        await pending.wait(timeout=0.05)
    assert 0.04 < time.monotonic() - started < 1
    error = caught.value
    assert isinstance(error, TimeoutError)
    assert isinstance(error, DeepModeError)
    assert error.pending is pending
    assert "no upscale callback arrived" in str(error)
    assert "refused" not in str(error)
    assert error.refused is None
    again = await waiting(error.pending)
    assert await post(plain, pending.url, image_body("late")) == (200, "received")
    assert (await again).id == "late"


async def test_a_timeout_after_a_refused_delivery_says_why(
    serve: StartHub, plain: aiohttp.ClientSession
) -> None:
    hub = await serve()
    pending = hub.expect("generation")
    assert (await post(plain, pending.url, {"images": [{"id": 3}]}))[0] == 400
    with pytest.raises(CallbackTimeoutError) as caught:
        await pending.wait(timeout=0.05)
    message = str(caught.value)
    assert "refused" in message
    assert "$.images[0].id" in message
    assert caught.value.refused is not None
    assert "$.images[0].id" in caught.value.refused
    assert caught.value.refused in message


async def test_a_timeout_after_a_413_says_the_body_was_too_large(
    serve: StartHub, plain: aiohttp.ClientSession
) -> None:
    # SDK: a 413 refusal is not recorded in `_rejection`, so the timeout says nothing.
    hub = await serve(max_body_size=1000)
    pending = hub.expect("upscale")
    assert (await post(plain, pending.url, image_body(prompt="x" * 5000)))[0] == 413
    with pytest.raises(CallbackTimeoutError) as caught:
        await pending.wait(timeout=0.05)
    assert "refused" in str(caught.value)
    assert "1000 bytes" in str(caught.value)


async def test_a_wait_never_outlasts_the_ttl() -> None:
    hub = CallbackHub("http://127.0.0.1:1/cb", ttl=0.1)
    pending = hub.expect("model")
    started = time.monotonic()
    with pytest.raises(CallbackTimeoutError):
        await pending.wait(timeout=10)
    assert time.monotonic() - started < 1


async def test_bad_wait_timeouts() -> None:
    pending = CallbackHub("http://127.0.0.1:1/cb").expect("model")
    for timeout in (0, -1, math.nan):
        with pytest.raises(ValidationError):
            await pending.wait(timeout=timeout)


# --------------------------------------------------------------------------- 6. memory bound


async def test_max_pending_bounds_the_hub() -> None:
    hub = CallbackHub("http://127.0.0.1:1/cb", max_pending=5, ttl=0.05)
    kept = [hub.expect("upscale") for _ in range(5)]
    with pytest.raises(DeepModeError, match="max_pending") as caught:
        hub.expect("upscale")
    assert not isinstance(caught.value, ValidationError)
    kept[0].discard()
    hub.expect("upscale")  # a discarded one frees its slot
    with pytest.raises(DeepModeError):
        hub.expect("model")
    await asyncio.sleep(0.1)
    fresh = [hub.expect("model") for _ in range(5)]  # the expired ones were purged
    assert len(hub._state.pending) == 5
    assert all(hub._state.pending[token_of(p)] is p for p in fresh)
    assert repr(hub).endswith("pending=5)")


# --------------------------------------------------------------------------- 7. threads


@pytest.mark.parametrize("serve", ["aiohttp"], indirect=True)
async def test_delivery_from_other_threads(serve: StartHub) -> None:
    hub = await serve()
    pending = hub.expect("upscale")
    waiter = await waiting(pending)
    response = await asyncio.to_thread(
        requests.post, pending.url, data=as_bytes(image_body("threaded")), timeout=5
    )
    assert response.status_code == 200
    assert (await waiter).id == "threaded"
    # Straight into receive() from a thread, no HTTP.
    other = hub.expect("upscale")
    waiter = await waiting(other)
    status = await asyncio.to_thread(hub.receive, token_of(other), as_bytes(image_body("raw")))
    assert status == (200, "received")
    assert (await waiter).id == "raw"


async def test_racing_deliveries_settle_once() -> None:
    hub = CallbackHub("http://127.0.0.1:1/cb")
    pending = hub.expect("upscale")
    waiters = [await waiting(pending) for _ in range(3)]
    barrier = threading.Barrier(8)

    def deliver(index: int) -> tuple[int, str]:
        barrier.wait()
        return hub.receive(token_of(pending), as_bytes(image_body(f"racer-{index}")))

    with ThreadPoolExecutor(8) as pool:
        statuses = await asyncio.to_thread(lambda: list(pool.map(deliver, range(8))))
    assert [status for status, _ in statuses] == [200] * 8
    results = {(await waiter).id for waiter in waiters}
    assert len(results) == 1
    assert results <= {f"racer-{i}" for i in range(8)}
    assert (await pending.wait(timeout=1)).id in results


async def test_many_expects_and_receives_from_threads() -> None:
    hub = CallbackHub("http://127.0.0.1:1/cb", max_pending=100)

    def one(index: int) -> tuple[PendingCallback[Image], tuple[int, str]]:
        pending = hub.expect("upscale")
        return pending, hub.receive(token_of(pending), as_bytes(image_body(f"img-{index}")))

    with ThreadPoolExecutor(8) as pool:
        outcomes = await asyncio.to_thread(lambda: list(pool.map(one, range(50))))
    assert [status for _, status in outcomes] == [(200, "received")] * 50
    assert len(hub._state.pending) == 50
    assert len({token_of(pending) for pending, _ in outcomes}) == 50
    assert all(pending.done for pending, _ in outcomes)
    for index, (pending, _) in enumerate(outcomes):
        assert (await pending.wait(timeout=1)).id == f"img-{index}"


async def test_waiters_on_the_loop_while_threads_deliver() -> None:
    hub = CallbackHub("http://127.0.0.1:1/cb")
    pendings = [hub.expect("upscale") for _ in range(50)]
    waiters = [asyncio.create_task(p.wait(timeout=5)) for p in pendings]
    await asyncio.sleep(0.01)

    def deliver(index: int) -> tuple[int, str]:
        return hub.receive(token_of(pendings[index]), as_bytes(image_body(f"w-{index}")))

    with ThreadPoolExecutor(8) as pool:
        statuses = await asyncio.to_thread(lambda: list(pool.map(deliver, range(50))))
    assert {status for status, _ in statuses} == {200}
    assert [(await waiter).id for waiter in waiters] == [f"w-{i}" for i in range(50)]


@pytest.mark.parametrize("serve", ["aiohttp"], indirect=True)
async def test_the_blocking_client_waits_for_a_hub_on_another_loop(
    serve: StartHub, mock: MockDeepMode
) -> None:
    hub = await serve()
    model = mock.add_model()

    def blocking() -> Generation:
        with Client(mock.api_key, base_url=mock.base_url) as dm:
            return dm.images.generate(
                model_id=model.id, prompt="from a thread", num_images=3, callback=hub
            )

    generation = await asyncio.wait_for(asyncio.to_thread(blocking), 10)
    assert isinstance(generation, Generation)
    assert len(generation.images) == 3
    assert all(image.id in mock.images for image in generation.images)
    assert generation.images[0].prompt == "from a thread"
    assert mock.callbacks[-1].delivered


# --------------------------------------------------------------------------- 8. the client


def sent_callback(mock: MockDeepMode, endpoint: str) -> str:
    [record] = [r for r in mock.requests if r.endpoint == endpoint]
    value = record.json["callback"] if record.json is not None else record.form["callback"]
    assert isinstance(value, str)
    return value


async def test_generate_with_a_hub(serve: StartHub, mock: MockDeepMode, dm: AsyncClient) -> None:
    hub = await serve()
    model = mock.add_model()
    generation = await dm.images.generate(
        model_id=model.id, prompt="a lighthouse", num_images=2, callback=hub
    )
    assert isinstance(generation, Generation)
    assert len(generation.images) == 2
    assert all(image.id in mock.images for image in generation.images)
    assert {image.model_id for image in generation.images} == {model.id}
    url = sent_callback(mock, "generate")
    assert url.startswith(hub.public_base_url + "/")
    assert TOKEN.fullmatch(url.rsplit("/", 1)[1])
    assert [c.url for c in mock.callbacks] == [url]
    # The hub resolves the wait before its answer reaches the mock.
    await eventually(lambda: mock.callbacks[0].finished)
    assert mock.callbacks[0].attempts == ["200"]
    assert [charge.endpoint for charge in mock.ledger] == ["generate"]


async def test_upscale_with_a_hub(serve: StartHub, mock: MockDeepMode, dm: AsyncClient) -> None:
    hub = await serve()
    model = mock.add_model()
    source = (await dm.images.generate(model_id=model.id, prompt="a harbour")).images[0]
    image = await dm.images.upscale(source.id, callback=hub)
    assert isinstance(image, Image)
    assert image.upscaled is True
    assert image.id != source.id
    assert mock.images[image.id].upscaled is True
    assert sent_callback(mock, "upscale").startswith(hub.public_base_url + "/")


async def test_create_model_with_a_hub(serve: StartHub) -> None:
    hub = await serve()
    async with (
        MockDeepMode(training_delay=0.1, callback_backoff=0.01) as mock,
        AsyncClient(mock.api_key, base_url=mock.base_url, max_retries=0) as dm,
    ):
        started = time.monotonic()
        model = await dm.models.create(
            images=[sample_image("jpeg")],
            gender="woman",
            model_type="amateur",
            name="hub model",
            callback=hub,
        )
        assert time.monotonic() - started >= 0.09  # it waited for training
        assert isinstance(model, Model)
        assert model.id in mock.models
        assert model.active is True
        assert model.name == "hub model"
        assert model.created_at.tzinfo is not None
        assert mock.models[model.id].active is True
        assert sent_callback(mock, "create_model").startswith(hub.public_base_url + "/")


@pytest.mark.parametrize("serve", ["aiohttp"], indirect=True)
async def test_failed_calls_leave_no_pending_entry(
    serve: StartHub, mock: MockDeepMode, dm: AsyncClient
) -> None:
    hub = await serve()
    model = mock.add_model()
    mock.fail("generate", 402)
    with pytest.raises(InsufficientCreditsError):
        await dm.images.generate(model_id=model.id, prompt="p", callback=hub)
    assert len(hub._state.pending) == 0
    with pytest.raises(NotFoundError):
        await dm.images.generate(model_id="no-such-model", prompt="p", callback=hub)
    assert len(hub._state.pending) == 0
    with pytest.raises(NotFoundError):
        await dm.images.upscale("no-such-image", callback=hub)
    assert len(hub._state.pending) == 0
    with pytest.raises(ValidationError):
        await dm.images.upscale("", callback=hub)
    assert len(hub._state.pending) == 0
    with pytest.raises(ValidationError):
        await dm.models.create(gender="woman", model_type="amateur", callback=hub)
    assert repr(hub).endswith("pending=0)")
    assert mock.ledger == []
    assert mock.callbacks == []


@pytest.mark.parametrize("serve", ["aiohttp"], indirect=True)
async def test_a_cancelled_call_leaves_no_pending_entry_but_keeps_its_result(
    serve: StartHub, mock: MockDeepMode, dm: AsyncClient, delivered: dict[str, Any]
) -> None:
    """Cancelled while the API may have taken the call: this process lets go of it, and
    the store keeps it, so the paid result is found by `outstanding()` when it comes."""
    hub = await serve()
    model = mock.add_model()
    mock.stall("generate", seconds=5)
    task = asyncio.create_task(dm.images.generate(model_id=model.id, prompt="p", callback=hub))
    await eventually(lambda: len(hub._state.pending) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(hub._state.pending) == 0
    [kept] = await hub.outstanding()
    assert (kept.kind, kept.done) == ("generation", False)
    body = json.dumps(delivered["generation"]).encode()
    assert await hub.areceive(kept.token, body) == (200, "received")
    [arrived] = await hub.outstanding("generation")
    assert arrived.done
    generation: Generation = await arrived.wait(timeout=0.001)
    assert generation.images
    assert await hub.outstanding() == []


async def test_a_call_refused_before_it_was_sent_discards_its_expectation(
    serve: StartHub, mock: MockDeepMode, dm: AsyncClient
) -> None:
    hub = await serve()
    mock.fail("generate", status=422, times=1)
    with pytest.raises(DeepModeError) as caught:
        await dm.images.generate(model_id="m", prompt="p", callback=hub)
    assert not any("outstanding" in note for note in getattr(caught.value, "__notes__", []))
    assert await hub.outstanding() == []


async def test_a_timed_out_callback_call_is_kept_and_says_where(
    mock: MockDeepMode, dm: AsyncClient, closed_port: int
) -> None:
    hub = CallbackHub(f"http://127.0.0.1:{closed_port}/cb", ttl=0.3, max_pending=1)
    model = mock.add_model()
    for _ in range(2):  # released each time: max_pending=1 is not filled
        with pytest.raises(CallbackTimeoutError) as caught:
            await dm.images.generate(model_id=model.id, prompt="p", callback=hub)
        assert "hub.outstanding()" in caught.value.__notes__[0]
    assert len(hub._state.pending) == 0
    assert len(mock.ledger) == 2


async def test_an_unreachable_hub_times_out(
    mock: MockDeepMode, dm: AsyncClient, closed_port: int
) -> None:
    hub = CallbackHub(f"http://127.0.0.1:{closed_port}/cb", ttl=0.3)
    model = mock.add_model()
    started = time.monotonic()
    with pytest.raises(CallbackTimeoutError) as caught:
        await dm.images.generate(model_id=model.id, prompt="p", callback=hub)
    assert time.monotonic() - started < 2
    assert isinstance(caught.value.pending, PendingCallback)
    assert caught.value.pending.url.startswith(hub.public_base_url + "/")
    await eventually(lambda: bool(mock.callbacks) and mock.callbacks[0].finished)
    assert not mock.callbacks[0].delivered


def test_delivered_fixture_shapes(delivered: dict[str, Any]) -> None:
    """The real bodies are what the documentation shows (the parsers' tests rely on them)."""
    assert set(delivered["model"]) == set(DOC_MODEL)
    assert set(delivered["upscale"]) == set(DOC_IMAGE)
    assert [set(i) for i in delivered["generation"]["images"]] == [set(DOC_IMAGE)] * 2


# --------------------------------------------------------------------------- review fixes


def test_the_expiry_heap_follows_what_is_pending_not_what_has_been() -> None:
    hub = CallbackHub("http://127.0.0.1:9/cb", max_pending=100)
    for _ in range(2000):
        pending = hub.expect("upscale")
        pending.discard()
    assert len(hub._state.pending) == 0
    assert len(hub._state.expiry) <= 2 * len(hub._state.pending) + 65


def test_unhashable_arguments_are_refused_with_a_validation_error() -> None:
    hub = CallbackHub("http://127.0.0.1:9/cb")
    with pytest.raises(ValidationError):
        hub.expect(["model"])  # type: ignore[call-overload]
    with pytest.raises(ValidationError):
        hub.receive(["token"], b"{}")  # type: ignore[arg-type]


async def test_an_ambiguous_failure_with_a_hub_says_the_result_may_still_come(
    mock: MockDeepMode,
) -> None:
    hub = CallbackHub("http://127.0.0.1:9/cb")
    model_id = mock.add_model().id
    mock.drop("generate", after_processing=True)
    async with AsyncClient(mock.api_key, base_url=mock.base_url) as dm:
        with pytest.raises(APIConnectionError) as caught:
            await dm.images.generate(model_id=model_id, prompt="x", callback=hub)
    assert any("may have acted" in note for note in caught.value.__notes__)
    assert len(mock.ledger) == 1
    assert len(hub._state.pending) == 0


async def test_outstanding_on_a_memory_store_lists_every_hub_of_the_process() -> None:
    """A MemoryStore hub writes an expectation down only when something could read it:
    `outstanding()` (of any hub sharing the store) and `release()` still find them all,
    and what a wait handed out is gone from it."""
    store = MemoryStore()
    one, other = (
        CallbackHub("https://a.example/cb", store=store),
        CallbackHub("https://b.example/cb", store=store),
    )
    held = one.expect("model")
    let_go = one.expect("generation")
    let_go.release()
    elsewhere = other.expect("upscale")
    handed = other.expect("model")
    body = json.dumps(DOC_MODEL).encode()
    status, detail = await other.areceive(handed.token, body)
    assert status == 200, detail
    await handed.wait(timeout=1)
    for hub in (one, other):
        found = {p.token: p for p in await hub.outstanding()}
        assert found.keys() == {held.token, let_go.token, elsewhere.token}
        assert not any(p.done for p in found.values())
    assert [p.token for p in await other.outstanding("generation")] == [let_go.token]
    assert (await one.areceive(handed.token, body)) == (200, "already received")
