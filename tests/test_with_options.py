"""`with_options`: a client with some options changed, on the same session and pool."""

from __future__ import annotations

import inspect
import typing

import pytest
from conftest import make_client

from deepmode_async import (
    AsyncClient,
    Balance,
    Client,
    DeepModeError,
    NotFoundError,
    RetryPolicy,
    Timeout,
    ValidationError,
)
from deepmode_async.testing import MockDeepMode

pytestmark = pytest.mark.anyio


def _sent(mock: MockDeepMode, endpoint: str) -> int:
    return sum(1 for record in mock.requests if record.endpoint == endpoint)


async def test_options_change_only_for_the_derived_client(mock: MockDeepMode) -> None:
    async with make_client(mock, default_headers={"X-Team": "a"}) as dm:
        derived = dm.with_options(
            timeout=Timeout(read=5.0), max_retries=0, default_headers={"X-Team": "b"}
        )
        assert derived.timeout == Timeout(read=5.0)
        assert derived.max_retries == 0
        assert dm.max_retries == 2
        assert dm.timeout == Timeout()
        assert derived.base_url == dm.base_url
        # Left out: unchanged.
        assert dm.with_options().retry_policy == dm.retry_policy
        assert dm.with_options(max_retries=RetryPolicy(7)).max_retries == 7
        assert dm.with_options(timeout=3).timeout == Timeout(read=3)

        await dm.account.balance()
        await derived.account.balance()
        teams = [r.headers.get("X-Team") for r in mock.requests if r.endpoint == "balance"]
        assert teams == ["a", "b"]


async def test_the_derived_client_retries_as_told(mock: MockDeepMode) -> None:
    async with make_client(mock) as dm:
        mock.drop("balance", times=5)
        with pytest.raises(DeepModeError):
            await dm.with_options(max_retries=0).account.balance()
        assert _sent(mock, "balance") == 1
        mock.clear_faults()
        mock.drop("balance", times=1)
        assert await dm.account.balance() == Balance(remaining_balance=mock.balance)
        assert _sent(mock, "balance") == 3


async def test_it_shares_the_session_and_its_connections(mock: MockDeepMode) -> None:
    async with make_client(mock) as dm:
        derived = dm.with_options(max_retries=1)
        await derived.account.balance()  # the session is created by the derived client
        session = dm._transport._pool._session
        assert session is not None
        assert derived._transport._pool._session is session
        await dm.account.balance()
        assert dm._transport._pool._session is session


async def test_closing_the_derived_client_leaves_the_original_open(mock: MockDeepMode) -> None:
    async with make_client(mock) as dm:
        derived = dm.with_options(max_retries=0)
        await derived.account.balance()
        await derived.aclose()
        assert derived.closed
        assert not dm.closed
        with pytest.raises(DeepModeError, match="closed"):
            await derived.account.balance()
        await dm.account.balance()
    assert dm.closed
    assert dm.with_options().closed


async def test_closing_the_original_closes_its_derived_clients(mock: MockDeepMode) -> None:
    dm = make_client(mock)
    derived = dm.with_options(max_retries=0)
    await derived.account.balance()
    await dm.aclose()
    assert derived.closed
    with pytest.raises(DeepModeError, match="closed"):
        await derived.account.balance()


async def test_errors_come_through_the_derived_client_as_they_are(mock: MockDeepMode) -> None:
    async with make_client(mock) as dm:
        with pytest.raises(NotFoundError):
            await dm.with_options(max_retries=0).images.retrieve("nope")


async def test_bad_options_are_refused_as_the_constructor_refuses_them(
    mock: MockDeepMode,
) -> None:
    async with make_client(mock) as dm:
        with pytest.raises(DeepModeError):
            dm.with_options(max_retries=-1)
        with pytest.raises(DeepModeError):
            dm.with_options(default_headers={"Authorization": "x"})
        with pytest.raises(DeepModeError):
            dm.with_options(timeout="soon")  # type: ignore[arg-type]
        # Another account or host is a new client, never a silently ignored option.
        with pytest.raises(ValidationError, match="api_key, base_url: for another key"):
            dm.with_options(api_key="key-b", base_url="http://127.0.0.1:9")  # type: ignore[call-arg]
        with pytest.raises(ValidationError, match="not retries"):
            dm.with_options(retries=3)  # type: ignore[call-arg]


def test_the_blocking_client_has_it_too() -> None:
    assert inspect.signature(Client.with_options) == inspect.signature(AsyncClient.with_options)
    with (
        MockDeepMode() as served,
        Client(served.api_key, base_url=served.base_url) as dm,
    ):
        derived = dm.with_options(max_retries=0, default_headers={"X-Team": "b"})
        typing.assert_type(derived, Client)
        assert derived.max_retries == 0
        assert derived.account.balance() == dm.account.balance()
        derived.close()
        assert derived.closed
        assert not dm.closed
        with pytest.raises(DeepModeError, match="closed"):
            derived.account.balance()
        dm.account.balance()
        other = dm.with_options(max_retries=1)
    assert other.closed
