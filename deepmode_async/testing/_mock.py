"""`MockDeepMode`: the whole DeepMode API on loopback, for demos and tests.

The class is a facade. Its parts own one thing each: `MockState` (records, credits and
the clock), `Faults` (misbehaviour on demand) and `Work` (latency, training, callbacks).
The two hosts, `DeepModeApi` and `BlobHost`, are handed the parts they use; neither
the parts nor the hosts import this module.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Concatenate, Final, Generic, ParamSpec, Self, TypeVar, overload

import anyio.from_thread
from aiohttp import web
from yarl import URL

from .._mock_options import MOCK_API_KEY
from ._api import DeepModeApi
from ._blob import BlobHost
from ._faults import Faults
from ._records import (
    CallbackDelivery,
    Charge,
    Endpoint,
    MockImage,
    MockModel,
    MockRemix,
    RecordedRequest,
)
from ._state import MockState
from ._work import Work

_SHUTDOWN_TIMEOUT: Final = 0.25  # a mock need not let stalled handlers finish

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class _Kept(Generic[T]):
    """An attribute of the facade kept by one of its parts: reads and writes go there."""

    def __init__(self, part: str, doc: str) -> None:
        self._part = part
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, mock: None, owner: type) -> Self: ...
    @overload
    def __get__(self, mock: MockDeepMode, owner: type) -> T: ...
    def __get__(self, mock: MockDeepMode | None, owner: type) -> Self | T:
        if mock is None:
            return self
        value: T = getattr(getattr(mock, self._part), self._name)
        return value

    def __set__(self, mock: MockDeepMode, value: T) -> None:
        setattr(getattr(mock, self._part), self._name, value)


def _forwarded(
    part: str, method: Callable[Concatenate[Any, P], R]
) -> Callable[Concatenate[MockDeepMode, P], R]:
    """A method of the facade calling the same method of one of its parts (whose
    signature and docstring it shows)."""
    name = method.__name__

    @functools.wraps(method)
    def forward(mock: MockDeepMode, /, *args: P.args, **kwargs: P.kwargs) -> R:
        bound: Callable[P, R] = getattr(getattr(mock, part), name)
        return bound(*args, **kwargs)

    return forward


class MockDeepMode:
    """A faithful mock of the DeepMode API and its image host, served on 127.0.0.1.

    Use it as `async with MockDeepMode() as mock:` in async code, or as
    `with MockDeepMode() as mock:` to run it on an event loop in a background thread
    for sync code. Point a client at `mock.base_url` with `mock.api_key`.

    Every documented rule is enforced with FastAPI-style `{"detail": ...}` errors,
    credits are charged as documented (a rejected call costs nothing), models finish
    training after `training_delay` seconds and callbacks are POSTed with retries.
    Faults (`fail`, `drop`, `stall`, `truncate`, `limit_concurrency`) misbehave on
    demand; `chaos` deals 429s, 503s, dropped connections, 500s and latency at random,
    for soak and chaos tests. `requests`, `ledger`, `callbacks`, `models` and `images`
    show what happened.

    Args:
        api_key: the one key accepted; any other gets 401.
        balance: starting credits.
        training_delay: seconds until a new model is trained and its callback sent.
        latency: seconds each call takes on the server, for all endpoints or per
            endpoint (see `Endpoint`); callback-mode calls answer at once and deliver
            after it.
        url_ttl: seconds an `image_url` stays valid (the real API: one hour).
        image_size: bytes of each served image (a real JPEG padded to that size).
        costs: credits per endpoint, overriding the documented `COSTS`.
        callback_retries / callback_backoff: further delivery attempts after a failed
            one, and the first pause between them (doubling each time).
        fetch_image_urls: fetch `image_urls` of create model and reject ones that do
            not answer with an image, as the real API does (off: they are only checked
            to be http(s) URLs, so tests need no network).
        max_upload_size / max_json_size: bodies above these get 413.
        max_recorded_requests: how many requests `requests` keeps (the latest).
        host, port, blob_port: where to listen (port 0 picks a free one).
    """

    def __init__(
        self,
        *,
        api_key: str = MOCK_API_KEY,
        balance: int = 10_000,
        training_delay: float = 0.0,
        latency: float | Mapping[Endpoint, float] = 0.0,
        url_ttl: float = 3600.0,
        image_size: int | None = None,
        costs: Mapping[Endpoint, int] | None = None,
        callback_retries: int = 3,
        callback_backoff: float = 0.1,
        fetch_image_urls: bool = False,
        max_upload_size: int = 1024**3,
        max_json_size: int = 1024**2,
        max_recorded_requests: int = 100_000,
        host: str = "127.0.0.1",
        port: int = 0,
        blob_port: int = 0,
    ) -> None:
        self._state = MockState(
            balance=balance,
            costs=costs,
            url_ttl=url_ttl,
            image_size=image_size,
            max_recorded_requests=max_recorded_requests,
        )
        self._faults = Faults()
        self._work = Work(
            latency=latency,
            training_delay=training_delay,
            callback_retries=callback_retries,
            callback_backoff=callback_backoff,
        )
        self._api = DeepModeApi(
            self._state,
            self._faults,
            self._work,
            api_key=api_key,
            fetch_image_urls=fetch_image_urls,
            max_upload_size=max_upload_size,
            max_json_size=max_json_size,
        )
        self._blob = BlobHost(self._state, self._faults, self._work)
        self._listen = (host, port, blob_port)
        self._runners: list[web.AppRunner] = []
        self._urls: tuple[str, str] | None = None
        self._portal: weakref.finalize[[], MockDeepMode] | None = None

    # ------------------------------------------------------------------ settings, counters

    api_key = _Kept[str]("_api", "The one key accepted; any other gets 401.")
    fetch_image_urls = _Kept[bool]("_api", "Whether create model fetches its `image_urls`.")
    max_upload_size = _Kept[int]("_api", "Multipart bodies above this many bytes get 413.")
    max_json_size = _Kept[int]("_api", "JSON bodies above this get 413 (read at `start`).")
    balance = _Kept[int]("_state", "Credits left.")
    costs = _Kept[dict[Endpoint, int]]("_state", "Credits per endpoint.")
    in_flight = _Kept[int]("_state", "API calls open now.")
    peak_in_flight = _Kept[int]("_state", "The most API calls open at once so far.")
    latency = _Kept[dict[Endpoint, float]]("_work", "Seconds each call takes, by endpoint.")
    training_delay = _Kept[float]("_work", "Seconds until a new model is trained.")
    callback_retries = _Kept[int]("_work", "Further attempts after a failed callback.")
    callback_backoff = _Kept[float]("_work", "The first pause between callback attempts.")

    # ------------------------------------------------------------------ the parts' methods

    now = _forwarded("_state", MockState.now)
    advance_clock = _forwarded("_state", MockState.advance_clock)
    add_model = _forwarded("_state", MockState.add_model)
    fail = _forwarded("_faults", Faults.fail)
    drop = _forwarded("_faults", Faults.drop)
    stall = _forwarded("_faults", Faults.stall)
    truncate = _forwarded("_faults", Faults.truncate)
    limit_concurrency = _forwarded("_faults", Faults.limit_concurrency)
    chaos = _forwarded("_faults", Faults.chaos)
    clear_faults = _forwarded("_faults", Faults.clear_faults)
    set_latency = _forwarded("_work", Work.set_latency)

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        """The API's base URL, e.g. `http://127.0.0.1:41234`."""
        return self._started()[0]

    @property
    def blob_base_url(self) -> str:
        """The image host's base URL: another origin, like the real Azure blob host."""
        return self._started()[1]

    def _started(self) -> tuple[str, str]:
        if self._urls is None:
            raise RuntimeError("MockDeepMode is not running: use `async with` or `with` first")
        return self._urls

    async def start(self) -> None:
        """Start both hosts on the running event loop."""
        if self._urls is not None or self._runners:
            raise RuntimeError("MockDeepMode is already running")
        await self._work.open()
        host, port, blob_port = self._listen
        urls = []
        try:
            for app, wanted_port in (
                (self._api.app(), port),
                (self._blob.app(), blob_port),
            ):
                runner = web.AppRunner(
                    app,
                    handler_cancellation=True,
                    access_log=None,
                    shutdown_timeout=_SHUTDOWN_TIMEOUT,
                )
                await runner.setup()
                self._runners.append(runner)
                await web.TCPSite(runner, host, wanted_port).start()
                urls.append(str(URL.build(scheme="http", host=host, port=runner.addresses[0][1])))
        except BaseException:
            await self.stop()  # e.g. a port in use: release what did start
            raise
        self._urls = (urls[0], urls[1])
        self._state.blob_base_url = urls[1]

    async def stop(self) -> None:
        """Stop serving, then cancel training and callbacks still under way."""
        self._work.stop_starting()  # calls finishing during shutdown start no new work
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        await self._work.close()
        self._urls = None
        self._state.blob_base_url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __enter__(self) -> Self:
        """Run the mock on an event loop of its own in a background thread."""
        with contextlib.ExitStack() as stack:
            portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
            portal.call(self.start)
            stack.callback(portal.call, self.stop)
            # The callback holds the mock, so a forgotten one serves until exit and is
            # stopped then, while its thread still runs: collected during shutdown, it
            # would wait forever on a portal whose thread the interpreter has frozen.
            self._portal = weakref.finalize(self, stack.pop_all().close)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._portal is not None:
            self._portal()
            self._portal = None

    def __repr__(self) -> str:
        where = self.base_url if self._urls else "not running"
        return f"<MockDeepMode {where} balance={self.balance}>"

    # ------------------------------------------------------------------ inspection

    # Each inspection property returns a copy, taken atomically: the thread-backed form
    # serves (and mutates the originals) on another thread while a test reads them.

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request seen so far (both hosts), oldest first."""
        return list(self._state.requests)

    @property
    def image_bytes(self) -> bytes:
        """What the image host serves for every image: a real JPEG of `image_size` bytes."""
        return self._state.image_bytes

    @property
    def models(self) -> dict[str, MockModel]:
        """Models by id, trained or training (the records themselves: edit them to test)."""
        return dict(self._state.models)

    @property
    def images(self) -> dict[str, MockImage]:
        """Generated and upscaled images by id."""
        return dict(self._state.images)

    @property
    def remixes(self) -> dict[str, MockRemix]:
        """Remix and face-id remix results by id."""
        return dict(self._state.remixes)

    @property
    def ledger(self) -> list[Charge]:
        """Every charge, oldest first."""
        return list(self._state.ledger)

    @property
    def callbacks(self) -> list[CallbackDelivery]:
        """Every callback delivery, finished or under way, oldest first."""
        return list(self._work.callbacks)
