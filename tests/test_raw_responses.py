"""`with_raw_response`: every resource method that makes one HTTP request returns an
`APIResponse` (status, headers, request id, timing, retries) whose `parse()` is the result.

mypy --strict checks the `assert_type`s: the raw forms are typed exactly, async and
blocking.
"""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, assert_type

import pytest
from conftest import make_client

from deepmode_async import (
    Accepted,
    APIResponse,
    AsyncClient,
    Balance,
    Client,
    ConflictError,
    Generation,
    Image,
    InternalServerError,
    ModelCreated,
    ModelExtension,
    NotFoundError,
    RemixResult,
    ResponseValidationError,
    ValidationError,
)
from deepmode_async.callbacks import CallbackHub
from deepmode_async.testing import Endpoint, MockDeepMode, sample_image

pytestmark = pytest.mark.anyio

JPEG = sample_image("jpeg")

Call = Callable[[AsyncClient, MockDeepMode], Awaitable[APIResponse[Any]]]


async def _generate(dm: AsyncClient, mock: MockDeepMode) -> APIResponse[Any]:
    response = await dm.images.with_raw_response.generate(
        model_id=mock.add_model().id, prompt="a lighthouse"
    )
    assert_type(response, APIResponse[Generation])
    return response


async def _generate_later(dm: AsyncClient, mock: MockDeepMode) -> APIResponse[Any]:
    response = await dm.images.with_raw_response.generate(
        model_id=mock.add_model().id, prompt="a lighthouse", callback="https://example.com/cb"
    )
    assert_type(response, APIResponse[Accepted])
    return response


async def _retrieve(dm: AsyncClient, mock: MockDeepMode) -> APIResponse[Any]:
    image = (await dm.images.generate(model_id=mock.add_model().id, prompt="x")).images[0]
    response = await dm.images.with_raw_response.retrieve(image.id)
    assert_type(response, APIResponse[Image])
    return response


async def _upscale(dm: AsyncClient, mock: MockDeepMode) -> APIResponse[Any]:
    image = (await dm.images.generate(model_id=mock.add_model().id, prompt="x")).images[0]
    response = await dm.images.with_raw_response.upscale(image.id)
    assert_type(response, APIResponse[Image])
    return response


async def _remix(dm: AsyncClient, mock: MockDeepMode) -> APIResponse[Any]:
    response = await dm.images.with_raw_response.remix(
        model_id=mock.add_model().id, artwork_image=JPEG, mask_image=sample_image("png")
    )
    assert_type(response, APIResponse[RemixResult])
    return response


async def _face_id_remix(dm: AsyncClient, mock: MockDeepMode) -> APIResponse[Any]:
    response = await dm.images.with_raw_response.face_id_remix(
        identity_image=JPEG, artwork_image=JPEG, mask_image=sample_image("png")
    )
    assert_type(response, APIResponse[RemixResult])
    return response


async def _create(dm: AsyncClient, mock: MockDeepMode) -> APIResponse[Any]:
    response = await dm.models.with_raw_response.create(
        images=[JPEG], gender="woman", model_type="amateur"
    )
    assert_type(response, APIResponse[ModelCreated])
    return response


async def _extend(dm: AsyncClient, mock: MockDeepMode) -> APIResponse[Any]:
    response = await dm.models.with_raw_response.extend(mock.add_model().id)
    assert_type(response, APIResponse[ModelExtension])
    return response


async def _balance(dm: AsyncClient, mock: MockDeepMode) -> APIResponse[Any]:
    response = await dm.account.with_raw_response.balance()
    assert_type(response, APIResponse[Balance])
    return response


CALLS: dict[str, tuple[Call, type]] = {
    "generate": (_generate, Generation),
    "generate_later": (_generate_later, Accepted),
    "retrieve": (_retrieve, Image),
    "upscale": (_upscale, Image),
    "remix": (_remix, RemixResult),
    "face_id_remix": (_face_id_remix, RemixResult),
    "create": (_create, ModelCreated),
    "extend": (_extend, ModelExtension),
    "balance": (_balance, Balance),
}


@pytest.mark.parametrize("name", CALLS)
async def test_every_method_answers_with_its_response(
    dm: AsyncClient, mock: MockDeepMode, name: str
) -> None:
    call, result = CALLS[name]
    response = await call(dm, mock)
    record = mock.requests[-1]
    assert response.status_code == 200
    assert response.request_id == record.request_id
    assert response.headers["x-request-id"] == record.request_id
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.elapsed, datetime.timedelta)
    assert datetime.timedelta(0) < response.elapsed < datetime.timedelta(seconds=10)
    assert response.retries_taken == 0
    assert response.http_request.method == record.method
    assert response.http_request.url == f"{mock.base_url.rstrip('/')}{record.path}"
    assert isinstance(response.parse(), result)
    assert mock.api_key not in repr(response) + str(response.http_request)


async def test_the_covered_methods_are_all_that_make_one_request(dm: AsyncClient) -> None:
    offered = {
        resource: set(dir(getattr(dm, resource).with_raw_response))
        for resource in ("models", "images", "account")
    }
    assert offered == {
        "models": {"create", "extend"},
        "images": {"generate", "retrieve", "upscale", "remix", "face_id_remix"},
        "account": {"balance"},
    }
    # Not one HTTP answer: not offered.
    for name in ("download", "generate_many"):
        with pytest.raises(AttributeError, match=name):
            getattr(dm.images.with_raw_response, name)


async def test_elapsed_is_the_final_attempts(dm: AsyncClient, mock: MockDeepMode) -> None:
    mock.set_latency("balance", 0.15)
    response = await dm.account.with_raw_response.balance()
    assert datetime.timedelta(seconds=0.15) <= response.elapsed < datetime.timedelta(seconds=5)


async def test_a_retried_call_counts_its_retries(dm: AsyncClient, mock: MockDeepMode) -> None:
    mock.fail("balance", 503, times=2)
    response = await dm.account.with_raw_response.balance()
    assert response.retries_taken == 2
    assert response.status_code == 200
    assert len([r for r in mock.requests if r.endpoint == "balance"]) == 3
    assert response.request_id == mock.requests[-1].request_id


@pytest.mark.parametrize("name", CALLS)
async def test_every_method_raises_the_same_typed_errors(
    dm: AsyncClient, mock: MockDeepMode, name: str
) -> None:
    mock.fail(ENDPOINTS[name], 409)
    with pytest.raises(ConflictError):
        await CALLS[name][0](dm, mock)


async def test_errors_are_the_same_typed_errors(dm: AsyncClient, mock: MockDeepMode) -> None:
    with pytest.raises(NotFoundError):
        await dm.images.with_raw_response.retrieve("no-such-image")
    mock.fail("generate", 500)
    with pytest.raises(InternalServerError):
        await dm.images.with_raw_response.generate(model_id=mock.add_model().id, prompt="x")
    with pytest.raises(ValidationError):
        await dm.images.with_raw_response.generate(model_id="m", prompt="x", num_images=9)


async def test_a_body_that_does_not_fit_raises_at_parse(
    dm: AsyncClient, mock: MockDeepMode
) -> None:
    mock.fail("balance", 200, body='{"remaining_balance": "lots"}')
    response = await dm.account.with_raw_response.balance()
    assert response.status_code == 200
    with pytest.raises(ResponseValidationError):
        response.parse()
    mock.fail("balance", 200, body='{"remaining_balance": "lots"}')
    with pytest.raises(ResponseValidationError):  # the plain form raises at once
        await dm.account.balance()


async def test_a_hub_wait_is_refused_before_anything_is_sent(
    dm: AsyncClient, mock: MockDeepMode
) -> None:
    hub = CallbackHub("https://example.com/hooks")
    sent = len(mock.requests)
    with pytest.raises(ValidationError, match="CallbackHub"):
        await dm.images.with_raw_response.generate(
            model_id=mock.add_model().id, prompt="x", callback=hub
        )
    with pytest.raises(ValidationError, match="CallbackHub"):
        await dm.models.with_raw_response.create(
            images=[JPEG], gender="woman", model_type="amateur", callback=hub
        )
    assert len(mock.requests) == sent
    assert await hub.outstanding() == []


async def test_a_derived_client_has_them_too(mock: MockDeepMode) -> None:
    async with make_client(mock) as dm:
        derived = dm.with_options(default_headers={"X-Team": "a"})
        response = await derived.account.with_raw_response.balance()
        assert response.parse() == await dm.account.balance()
        assert mock.requests[-2].headers.get("X-Team") == "a"


@pytest.fixture(scope="module")
def served() -> Iterator[MockDeepMode]:
    with MockDeepMode() as mock:
        yield mock


@pytest.fixture(scope="module")
def blocking(served: MockDeepMode) -> Iterator[Client]:
    with Client(served.api_key, base_url=served.base_url) as dm:
        yield dm


Arguments = Callable[[Client, MockDeepMode], tuple[tuple[Any, ...], dict[str, Any]]]


def _image_id(dm: Client, mock: MockDeepMode) -> str:
    return dm.images.generate(model_id=mock.add_model().id, prompt="x").images[0].id


def _model(dm: Client, mock: MockDeepMode) -> dict[str, Any]:
    return {"model_id": mock.add_model().id}


PNG = sample_image("png")
BLOCKING_CALLS: dict[str, tuple[str, str, Arguments, type]] = {
    "generate": (
        "images",
        "generate",
        lambda dm, mock: ((), {**_model(dm, mock), "prompt": "x"}),
        Generation,
    ),
    "generate_later": (
        "images",
        "generate",
        lambda dm, mock: ((), {**_model(dm, mock), "prompt": "x", "callback": "https://e.com"}),
        Accepted,
    ),
    "retrieve": ("images", "retrieve", lambda dm, mock: ((_image_id(dm, mock),), {}), Image),
    "upscale": ("images", "upscale", lambda dm, mock: ((_image_id(dm, mock),), {}), Image),
    "remix": (
        "images",
        "remix",
        lambda dm, mock: ((), {**_model(dm, mock), "artwork_image": JPEG, "mask_image": PNG}),
        RemixResult,
    ),
    "face_id_remix": (
        "images",
        "face_id_remix",
        lambda dm, mock: ((), {"identity_image": JPEG, "artwork_image": JPEG, "mask_image": PNG}),
        RemixResult,
    ),
    "create": (
        "models",
        "create",
        lambda dm, mock: ((), {"images": [JPEG], "gender": "man", "model_type": "amateur"}),
        ModelCreated,
    ),
    "extend": ("models", "extend", lambda dm, mock: ((mock.add_model().id,), {}), ModelExtension),
    "balance": ("account", "balance", lambda dm, mock: ((), {}), Balance),
}


ENDPOINTS: dict[str, Endpoint] = {
    "generate": "generate",
    "generate_later": "generate",
    "retrieve": "retrieve_image",
    "upscale": "upscale",
    "remix": "remix",
    "face_id_remix": "face_id_remix",
    "create": "create_model",
    "extend": "extend_model",
    "balance": "balance",
}


def test_the_blocking_tables_cover_the_same_calls() -> None:
    assert BLOCKING_CALLS.keys() == CALLS.keys() == ENDPOINTS.keys()


@pytest.mark.parametrize("name", BLOCKING_CALLS)
def test_every_blocking_method_answers_with_its_response(
    blocking: Client, served: MockDeepMode, name: str
) -> None:
    resource, method, arguments, result = BLOCKING_CALLS[name]
    args, kwargs = arguments(blocking, served)
    response = getattr(getattr(blocking, resource).with_raw_response, method)(*args, **kwargs)
    assert isinstance(response, APIResponse)
    record = served.requests[-1]
    assert response.status_code == 200
    assert response.request_id == record.request_id
    assert response.retries_taken == 0
    assert response.http_request.url == f"{served.base_url.rstrip('/')}{record.path}"
    assert isinstance(response.parse(), result)


@pytest.mark.parametrize("name", BLOCKING_CALLS)
def test_blocking_errors_are_the_same_typed_errors(
    blocking: Client, served: MockDeepMode, name: str
) -> None:
    resource, method, arguments, _ = BLOCKING_CALLS[name]
    args, kwargs = arguments(blocking, served)
    served.fail(ENDPOINTS[name], 409)
    with pytest.raises(ConflictError):
        getattr(getattr(blocking, resource).with_raw_response, method)(*args, **kwargs)


def test_the_blocking_client_has_them_too(served: MockDeepMode, tmp_path: pathlib.Path) -> None:
    with Client(served.api_key, base_url=served.base_url) as dm:
        model_id = served.add_model().id
        response = dm.images.with_raw_response.generate(model_id=model_id, prompt="x")
        assert_type(response, APIResponse[Generation])
        assert response.status_code == 200
        assert response.request_id == served.requests[-1].request_id
        generation = response.parse()
        assert isinstance(generation, Generation)
        accepted = dm.images.with_raw_response.generate(
            model_id=model_id, prompt="x", callback="https://example.com/cb"
        )
        assert_type(accepted, APIResponse[Accepted])
        balance = dm.account.with_raw_response.balance()
        assert_type(balance, APIResponse[Balance])
        assert isinstance(balance.parse(), Balance)
        extension = dm.models.with_raw_response.extend(model_id)
        assert_type(extension, APIResponse[ModelExtension])
        with pytest.raises(NotFoundError):
            dm.images.with_raw_response.retrieve("no-such-image")
        download = "download"  # not in its static type either
        with pytest.raises(AttributeError):
            getattr(dm.images.with_raw_response, download)
