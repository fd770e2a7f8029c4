"""pytest fixtures for testing code that calls DeepMode (registered through `pytest11`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported by the fixture: pytest starts up without loading aiohttp
    from ._mock import MockDeepMode


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deepmode_mock(**options): options for the `deepmode_mock` fixture's MockDeepMode",
    )


@pytest.fixture
def deepmode_mock(request: pytest.FixtureRequest) -> Iterator[MockDeepMode]:
    """A running `MockDeepMode`, on its own thread so sync and async tests alike can call it.

    Pass constructor options with `@pytest.mark.deepmode_mock(balance=10, ...)`.
    """
    from ._mock import MockDeepMode

    marker = request.node.get_closest_marker("deepmode_mock")
    options = marker.kwargs if marker is not None else {}
    with MockDeepMode(**options) as mock:
        yield mock


@pytest.fixture
def deepmode_env(deepmode_mock: MockDeepMode, monkeypatch: pytest.MonkeyPatch) -> MockDeepMode:
    """`deepmode_mock`, with `DEEPMODE_API_KEY` and `DEEPMODE_BASE_URL` pointing clients at it."""
    monkeypatch.setenv("DEEPMODE_API_KEY", deepmode_mock.api_key)
    monkeypatch.setenv("DEEPMODE_BASE_URL", deepmode_mock.base_url)
    return deepmode_mock
