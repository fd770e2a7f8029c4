"""The requests a call makes are exactly its attempts: for every endpoint and every kind
of failure in the retry table, the mock sees what the SDK logs, at most max_retries + 1
(aiohttp re-sends nothing behind the SDK's back)."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

import pytest
from conftest import make_client

from deepmode_async import APIError, AsyncClient
from deepmode_async.testing import Endpoint, MockDeepMode, sample_image

pytestmark = pytest.mark.anyio

MAX_RETRIES = 2
Call = Callable[[AsyncClient, str, str], Awaitable[object]]


async def _create_model(dm: AsyncClient, model_id: str, image_id: str) -> object:
    return await dm.models.create(images=[sample_image("jpeg")], gender="man", model_type="amateur")


async def _extend_model(dm: AsyncClient, model_id: str, image_id: str) -> object:
    return await dm.models.extend(model_id)


async def _generate(dm: AsyncClient, model_id: str, image_id: str) -> object:
    return await dm.images.generate(model_id=model_id, prompt="a lighthouse")


async def _upscale(dm: AsyncClient, model_id: str, image_id: str) -> object:
    return await dm.images.upscale(image_id)


async def _remix(dm: AsyncClient, model_id: str, image_id: str) -> object:
    png = sample_image("png")
    return await dm.images.remix(model_id=model_id, artwork_image=png, mask_image=png)


async def _face_id_remix(dm: AsyncClient, model_id: str, image_id: str) -> object:
    png = sample_image("png")
    return await dm.images.face_id_remix(
        identity_image=sample_image("jpeg"), artwork_image=png, mask_image=png
    )


async def _retrieve(dm: AsyncClient, model_id: str, image_id: str) -> object:
    return await dm.images.retrieve(image_id)


async def _balance(dm: AsyncClient, model_id: str, image_id: str) -> object:
    return await dm.account.balance()


PAID: dict[Endpoint, Call] = {
    "create_model": _create_model,
    "extend_model": _extend_model,
    "generate": _generate,
    "upscale": _upscale,
    "remix": _remix,
    "face_id_remix": _face_id_remix,
}
READS: dict[Endpoint, Call] = {"retrieve_image": _retrieve, "balance": _balance}

Fault = Callable[[MockDeepMode, Endpoint], None]
#: Every failure kind of the retry table, and whether a paid call may be sent again
#: after it (the server certainly did not act). Every one may be retried for a read.
FAULTS: dict[str, tuple[Fault, bool]] = {
    "dropped": (lambda mock, e: mock.drop(e, times=9), False),
    "dropped after processing": (
        lambda mock, e: mock.drop(e, times=9, after_processing=True),
        False,
    ),
    "stalled": (lambda mock, e: mock.stall(e, seconds=5, times=9), False),
    "500": (lambda mock, e: mock.fail(e, 500, times=9), False),
    "502": (lambda mock, e: mock.fail(e, 502, times=9), False),
    "504": (lambda mock, e: mock.fail(e, 504, times=9), False),
    "503": (lambda mock, e: mock.fail(e, 503, times=9), False),
    "503 with Retry-After": (lambda mock, e: mock.fail(e, 503, times=9, retry_after=0), True),
    "429": (lambda mock, e: mock.fail(e, 429, times=9, retry_after=0), True),
    "408": (lambda mock, e: mock.fail(e, 408, times=9), False),
}


def _sent(mock: MockDeepMode, endpoint: Endpoint) -> int:
    return sum(1 for record in mock.requests if record.endpoint == endpoint)


def _logged_attempts(caplog: pytest.LogCaptureFixture, path_part: str) -> int:
    return sum(
        1
        for record in caplog.records
        if record.levelno == logging.DEBUG and "(attempt " in record.getMessage()
        if re.search(path_part, record.getMessage())
    )


_PATHS: dict[Endpoint, str] = {
    "create_model": r"^POST \S+/api/models ",
    "extend_model": r"^POST \S+/api/models/\S+/extend ",
    "generate": r"^POST \S+/api/images/generate ",
    "upscale": r"^POST \S+/api/images/upscale ",
    "remix": r"^POST \S+/api/remix/generate ",
    "face_id_remix": r"^POST \S+/api/face-id-remix ",
    "retrieve_image": r"^GET \S+/api/images/\w+ ",
    "balance": r"^GET \S+/api/check-balance ",
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("endpoint", [*PAID, *READS])
async def test_the_server_sees_exactly_the_attempts_the_sdk_logs(
    mock: MockDeepMode, caplog: pytest.LogCaptureFixture, endpoint: Endpoint, fault: str
) -> None:
    model_id = mock.add_model().id
    async with make_client(mock, max_retries=MAX_RETRIES, timeout=0.3) as dm:
        image_id = (await _generate(dm, model_id, "")).images[0].id  # type: ignore[attr-defined]
        inject, paid_may_retry = FAULTS[fault]
        before = _sent(mock, endpoint)
        caplog.clear()
        caplog.set_level(logging.DEBUG, logger="deepmode_async")
        inject(mock, endpoint)
        with pytest.raises(APIError):
            await (PAID | READS)[endpoint](dm, model_id, image_id)
        mock.clear_faults()

    sent = _sent(mock, endpoint) - before
    assert sent == _logged_attempts(caplog, _PATHS[endpoint])
    retried = endpoint in READS or paid_may_retry
    assert sent == (MAX_RETRIES + 1 if retried else 1)


@pytest.mark.parametrize("endpoint", ["balance", "generate"])
async def test_no_retries_means_one_request(mock: MockDeepMode, endpoint: Endpoint) -> None:
    model_id = mock.add_model().id
    mock.drop(endpoint, times=5)
    async with make_client(mock, max_retries=0) as dm:
        with pytest.raises(APIError):
            await (PAID | READS)[endpoint](dm, model_id, "")
    assert _sent(mock, endpoint) == 1
