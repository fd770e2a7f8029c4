"""`MockDeepMode`: the whole DeepMode API on loopback, for demos and tests."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import math
import random
import secrets
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
import anyio.from_thread
import attrs
from aiohttp import web
from yarl import URL

from .._formats import SNIFF_BYTES, sniff_image_format
from ._api import DeepModeApi, new_file_name, new_id
from ._blob import BlobHost, UrlSigner
from ._http import Fault, Problem, format_retry_after
from ._records import (
    COSTS,
    ENDPOINTS,
    MODEL_LIFETIME,
    CallbackDelivery,
    CallbackKind,
    Charge,
    Endpoint,
    MockImage,
    MockModel,
    MockRemix,
    RecordedRequest,
    check_endpoint,
    iso,
)
from ._samples import sample_image

_REDACTED: Final = "[redacted]"
_SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})
_SHUTDOWN_TIMEOUT: Final = 0.25  # a mock need not let stalled handlers finish


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
        api_key: str = "mock-key",
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
        self.api_key = api_key
        self.balance = balance
        self.training_delay = training_delay
        self.latency: dict[Endpoint, float] = (
            {check_endpoint(name): seconds for name, seconds in latency.items()}
            if isinstance(latency, Mapping)
            else dict.fromkeys(ENDPOINTS, float(latency))
        )
        self._image_bytes = sample_image("jpeg", size=image_size)
        self.costs: dict[Endpoint, int] = {
            **COSTS,
            **{check_endpoint(name): cost for name, cost in (costs or {}).items()},
        }
        self.callback_retries = callback_retries
        self.callback_backoff = callback_backoff
        self.fetch_image_urls = fetch_image_urls
        self.max_upload_size = max_upload_size
        self.max_json_size = max_json_size
        self._signer = UrlSigner(self.now, url_ttl)
        self._listen = (host, port, blob_port)

        self._models: dict[str, MockModel] = {}
        self._images: dict[str, MockImage] = {}
        self._remixes: dict[str, MockRemix] = {}
        self._ledger: list[Charge] = []
        self._callbacks: list[CallbackDelivery] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=max_recorded_requests
        )
        self._blobs: dict[str, dt.datetime] = {}  # blob path -> when it can be downloaded
        self._faults: dict[Endpoint, collections.deque[Fault]] = collections.defaultdict(
            collections.deque
        )
        self._rate_limit: tuple[int, str | None] | None = None
        self._chaos: _Chaos | None = None
        self._clock_offset = dt.timedelta()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runners: list[web.AppRunner] = []
        self._http: aiohttp.ClientSession | None = None
        self._urls: tuple[str, str] | None = None
        self._portal: contextlib.ExitStack | None = None
        self._stopping = False

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
        self._stopping = False
        self._http = aiohttp.ClientSession()
        host, port, blob_port = self._listen
        urls = []
        try:
            for app, wanted_port in (
                (DeepModeApi(self).app(), port),
                (BlobHost(self).app(), blob_port),
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

    async def stop(self) -> None:
        """Stop serving, then cancel training and callbacks still under way."""
        self._stopping = True  # calls finishing during shutdown start no new work
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self._urls = None
        self._http = None

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
            self._portal = stack.pop_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._portal is not None:
            self._portal.close()
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
        return list(self._requests)

    @property
    def image_bytes(self) -> bytes:
        """What the image host serves for every image: a real JPEG of `image_size` bytes."""
        return self._image_bytes

    @property
    def models(self) -> dict[str, MockModel]:
        """Models by id, trained or training (the records themselves: edit them to test)."""
        return dict(self._models)

    @property
    def images(self) -> dict[str, MockImage]:
        """Generated and upscaled images by id."""
        return dict(self._images)

    @property
    def remixes(self) -> dict[str, MockRemix]:
        """Remix and face-id remix results by id."""
        return dict(self._remixes)

    @property
    def ledger(self) -> list[Charge]:
        """Every charge, oldest first."""
        return list(self._ledger)

    @property
    def callbacks(self) -> list[CallbackDelivery]:
        """Every callback delivery, finished or under way, oldest first."""
        return list(self._callbacks)

    def now(self) -> dt.datetime:
        """The mock's clock: the real time plus whatever `advance_clock` added."""
        return dt.datetime.now(dt.UTC) + self._clock_offset

    def advance_clock(self, seconds: float) -> None:
        """Move the mock's clock forward, to expire image URLs or models without waiting."""
        self._clock_offset += dt.timedelta(seconds=seconds)

    def add_model(
        self,
        *,
        name: str | None = "Test model",
        gender: str = "woman",
        model_type: str = "amateur",
        active: bool = True,
    ) -> MockModel:
        """A model ready to use, without the training call (whose id only a callback tells)."""
        now = self.now()
        model = MockModel(
            id=new_id(21),
            name=name,
            gender=gender,
            model_type=model_type,
            created_at=now,
            expire_at=now + MODEL_LIFETIME,
            active=active,
        )
        self._models[model.id] = model
        return model

    # ------------------------------------------------------------------ faults

    def fail(
        self,
        endpoint: Endpoint,
        status: int = 500,
        *,
        times: int = 1,
        detail: Any = None,
        retry_after: float | str | None = None,
        body: bytes | str | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Answer the next `times` calls of `endpoint` with `status` before doing anything.

        The answer is `{"detail": detail}`, or `body` as given (an HTML page from a
        proxy, plain text, nothing) with `content_type`. `retry_after` (seconds or an
        HTTP date) is sent as `Retry-After`. A failed call costs nothing.
        """
        raw = body.encode() if isinstance(body, str) else body
        retry = format_retry_after(retry_after)
        self._queue(endpoint, times, Fault("status", status, detail, raw, content_type, retry))

    def drop(self, endpoint: Endpoint, *, times: int = 1, after_processing: bool = False) -> None:
        """Close the connection instead of answering the next `times` calls of `endpoint`.

        With `after_processing`, each call is carried out (and charged) first: the
        ambiguous failure after which a client must not send a paid call again. Such a
        fault waits for a call that is accepted: a rejected one (401, 422...) leaves it.
        """
        if after_processing and endpoint == "download":
            raise ValueError("after_processing does not apply to downloads; see truncate()")
        self._queue(endpoint, times, Fault("drop", after_processing=after_processing))

    def stall(
        self,
        endpoint: Endpoint,
        *,
        seconds: float = 3600.0,
        times: int = 1,
        after_processing: bool = False,
        after_bytes: int | None = None,
    ) -> None:
        """Hold the next `times` calls of `endpoint` for `seconds`, then answer normally.

        By default a call is held before anything happens (nothing is charged). With
        `after_processing` it is carried out first and its answer held: a client that
        times out cannot know it was charged. For `download`, `after_bytes` sends that
        much of the image first and stalls mid-body. A client that gives up shows as
        `disconnected` in `requests`.
        """
        if after_bytes is not None and endpoint != "download":
            raise ValueError("after_bytes applies to the `download` endpoint only")
        if after_processing and endpoint == "download":
            raise ValueError("after_processing does not apply to downloads; see after_bytes")
        fault = Fault(
            "stall", seconds=seconds, after_processing=after_processing, after_bytes=after_bytes
        )
        self._queue(endpoint, times, fault)

    def truncate(self, *, times: int = 1) -> None:
        """Send only half of the next `times` downloaded images, then close the connection."""
        self._queue("download", times, Fault("truncate"))

    def limit_concurrency(self, max_in_flight: int | None, *, retry_after: float | str = 1) -> None:
        """Answer 429 with `Retry-After` while more than `max_in_flight` API calls are open.

        `None` lifts the limit.
        """
        limit = None if max_in_flight is None else (max_in_flight, format_retry_after(retry_after))
        self._rate_limit = limit

    def set_latency(self, endpoint: Endpoint, seconds: float) -> None:
        """How long each call of `endpoint` takes on the server from now on."""
        self.latency[check_endpoint(endpoint)] = seconds

    def chaos(
        self,
        endpoints: Endpoint | Iterable[Endpoint] | None = None,
        *,
        rate_limited: float = 0.0,
        unavailable: float = 0.0,
        dropped: float = 0.0,
        server_error: float = 0.0,
        latency: tuple[float, float] = (0.0, 0.0),
        retry_after: float | str = 0.01,
        seed: int | None = None,
    ) -> None:
        """Misbehave at random on every call of `endpoints` from now on.

        Each call independently gets, with these probabilities (at most 1 in all): a 429
        (`rate_limited`) or a 503 (`unavailable`), both with `retry_after` as
        `Retry-After` and charging nothing; its connection closed after the call was
        carried out and charged (`dropped`: the ambiguous failure of
        `drop(after_processing=True)`; a download is cut half-way as by `truncate`); or
        a 500 charging nothing (`server_error`). Every call, faulty or not, first waits
        a uniformly random time within `latency` (min, max seconds).

        `endpoints` defaults to the API's endpoints; the image host misbehaves only
        when `"download"` is named. Queued faults (`fail` & co) come first. Draws come
        from `random.Random(seed)`: a seed repeats the same faults for the same sequence
        of calls. Calling `chaos` again replaces the settings; `clear_faults` ends it.
        """
        chosen: frozenset[Endpoint]
        if endpoints is None:
            chosen = frozenset(name for name in ENDPOINTS if name != "download")
        elif isinstance(endpoints, str):
            chosen = frozenset({check_endpoint(endpoints)})
        else:
            chosen = frozenset(check_endpoint(name) for name in endpoints)
        odds = {
            "rate_limited": rate_limited,
            "unavailable": unavailable,
            "dropped": dropped,
            "server_error": server_error,
        }
        for name, value in odds.items():
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability between 0 and 1, not {value!r}")
        if math.fsum(odds.values()) > 1.0 + 1e-9:
            raise ValueError(f"the probabilities add up to more than 1: {odds}")
        if (
            not isinstance(latency, tuple)
            or len(latency) != 2
            or not all(_is_number(value) and value >= 0 for value in latency)
            or latency[0] > latency[1]
        ):
            raise ValueError(f"latency must be (min, max) seconds with 0 <= min <= max: {latency}")
        retry = format_retry_after(retry_after)
        assert retry is not None
        faults = (
            (rate_limited, Fault("status", 429, retry_after=retry, dealt=True)),
            (unavailable, Fault("status", 503, retry_after=retry, dealt=True)),
            (dropped, Fault("drop", after_processing=True, dealt=True)),
            (server_error, Fault("status", 500, dealt=True)),
        )
        self._chaos = _Chaos(chosen, faults, latency, random.Random(seed))

    def clear_faults(self) -> None:
        """Forget every queued fault, the concurrency limit and `chaos`."""
        self._faults.clear()
        self._rate_limit = None
        self._chaos = None

    def _queue(self, endpoint: Endpoint, times: int, fault: Fault) -> None:
        self._faults[check_endpoint(endpoint)].extend([fault] * times)

    def _requeue_fault(self, endpoint: Endpoint, fault: Fault) -> None:
        if not fault.dealt:  # one dealt by chaos was meant for this call only
            self._faults[endpoint].appendleft(fault)

    def _take_fault(self, endpoint: Endpoint | None) -> Fault | None:
        if endpoint is None:
            return None
        if queue := self._faults.get(endpoint):
            return queue.popleft()
        chaos = self._chaos
        return chaos.deal(endpoint) if chaos is not None else None

    # ------------------------------------------------------------------ used by the hosts

    def _record(self, request: web.Request) -> RecordedRequest:
        headers = {
            name: _REDACTED if name.lower() in _SECRET_HEADERS else value
            for name, value in request.headers.items()
        }
        route = request.match_info.route.name
        record = RecordedRequest(
            endpoint=route if route in ENDPOINTS else None,
            method=request.method,
            path=request.path,
            query=request.rel_url.raw_query_string,
            headers=headers,
            request_id=f"req_{secrets.token_hex(8)}",
        )
        self._requests.append(record)
        return record

    def _enter(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _leave(self) -> None:
        self.in_flight -= 1

    def _check_rate_limit(self) -> None:
        if self._rate_limit is not None and self.in_flight > self._rate_limit[0]:
            retry_after = self._rate_limit[1]
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            raise Problem(429, "Too many concurrent requests", headers=headers)

    def _charge(self, endpoint: Endpoint, record: RecordedRequest) -> None:
        cost = self.costs.get(endpoint, 0)
        if cost > self.balance:
            message = f"Insufficient credits: this call costs {cost}, the balance is {self.balance}"
            raise Problem(402, message)
        self.balance -= cost
        self._ledger.append(Charge(endpoint, cost, self.balance, record.request_id))

    async def _simulate_work(self, endpoint: Endpoint) -> None:
        """The time the real service would take to do the work of one call."""
        if seconds := self.latency.get(endpoint, 0.0):
            await asyncio.sleep(seconds)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._stopping:
            coroutine.close()
            return
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _add_image(
        self, model_id: str, prompt: str, negative_prompt: str | None, *, upscaled: bool, ratio: str
    ) -> MockImage:
        file_name = new_file_name()
        image = MockImage(
            id=new_id(21),
            file_name=file_name,
            model_id=model_id,
            prompt=prompt,
            negative_prompt=negative_prompt,
            upscaled=upscaled,
            ratio=ratio,
            blob_path=f"/deepmode-user-image/{file_name}",
        )
        self._images[image.id] = image
        self._blobs[image.blob_path] = self.now()
        return image

    def _add_remix(self, kind: Endpoint, model_id: str | None, *, ready_in: float) -> MockRemix:
        assert kind in ("remix", "face_id_remix")
        file_name = new_file_name()
        container = "remix-generation" if kind == "remix" else "face-id-remix-generation"
        now = self.now()
        remix = MockRemix(
            id=new_id(24),
            file_name=file_name,
            kind=kind,
            model_id=model_id,
            created_at=now,
            ready_at=now + dt.timedelta(seconds=ready_in),
            blob_path=f"/{container}/{file_name}",
        )
        self._remixes[remix.id] = remix
        self._blobs[remix.blob_path] = remix.ready_at
        return remix

    def _signed_url(self, blob_path: str) -> str:
        return f"{self.blob_base_url}{blob_path}?{self._signer.sign(blob_path)}"

    def _image_json(self, image: MockImage) -> dict[str, Any]:
        return {
            "id": image.id,
            "file_name": image.file_name,
            "model_id": image.model_id,
            "image_url": self._signed_url(image.blob_path),
            "prompt": image.prompt,
            "negative_prompt": image.negative_prompt,
            "upscaled": image.upscaled,
            "ratio": image.ratio,
        }

    def _remix_json(self, remix: MockRemix) -> dict[str, Any]:
        return {
            "id": remix.id,
            "file_name": remix.file_name,
            "status": "completed" if remix.ready_at <= self.now() else "processing",
            "created_at": iso(remix.created_at, fraction=True),
            "image_url": self._signed_url(remix.blob_path),
        }

    async def _train(self, model: MockModel, callback: str | None) -> None:
        await asyncio.sleep(self.training_delay)
        model.active = True
        if callback is not None:
            await self._deliver("model", callback, model.to_json())

    async def _work_then_deliver(
        self, endpoint: Endpoint, kind: CallbackKind, url: str, result: Callable[[], Any]
    ) -> None:
        await self._simulate_work(endpoint)
        await self._deliver(kind, url, result())

    async def _deliver(self, kind: CallbackKind, url: str, body: Any) -> None:
        """POST `body` to `url`, retrying with backoff; the outcome goes to `callbacks`."""
        delivery = CallbackDelivery(kind, url, body)
        self._callbacks.append(delivery)
        assert self._http is not None
        for attempt in range(self.callback_retries + 1):
            if attempt:
                await asyncio.sleep(self.callback_backoff * 2 ** (attempt - 1))
            try:
                async with self._http.post(
                    url, json=body, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=30)
                ) as response:
                    delivery.attempts.append(str(response.status))
                    if response.status < 300:
                        delivery.delivered = True
                        break
            except Exception as exc:  # a receiver's failure must never hurt the server
                delivery.attempts.append(f"{type(exc).__name__}: {exc}")
        delivery.finished = True

    async def _fetch_training_urls(self, urls: Iterable[str]) -> None:
        """Reject training URLs that do not answer with an image, as the real API does."""
        assert self._http is not None
        for index, url in enumerate(urls, 1):
            try:
                # Signed URLs must go out byte for byte: yarl would re-encode their queries.
                target = URL(url, encoded=True)
                async with self._http.get(
                    target, timeout=aiohttp.ClientTimeout(total=30)
                ) as response:
                    head = b""
                    while response.ok and len(head) < SNIFF_BYTES:
                        chunk = await response.content.read(SNIFF_BYTES - len(head))
                        if not chunk:
                            break
                        head += chunk
            except Exception as exc:
                raise Problem(400, f"Image URL {index} could not be fetched: {exc}") from None
            if sniff_image_format(head) is None:
                raise Problem(400, f"Image URL {index} ({url}) is not a valid image")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Chaos:
    """The settings of `MockDeepMode.chaos`, dealing a fault (or none) per call."""

    def __init__(
        self,
        endpoints: frozenset[Endpoint],
        faults: Iterable[tuple[float, Fault]],
        latency: tuple[float, float],
        rng: random.Random,
    ) -> None:
        self.endpoints = endpoints
        self.faults = [(odds, fault) for odds, fault in faults if odds > 0]
        self.latency = latency
        self.rng = rng

    def deal(self, endpoint: Endpoint) -> Fault | None:
        """This call's fault, with its latency; None for a call left alone."""
        if endpoint not in self.endpoints:
            return None
        # Two draws per call whatever they give, so a seed repeats the same sequence.
        roll = self.rng.random()
        delay = self.rng.uniform(*self.latency)
        chosen: Fault | None = None
        for odds, fault in self.faults:
            if roll < odds:
                chosen = fault
                break
            roll -= odds
        if chosen is not None and endpoint == "download" and chosen.kind == "drop":
            chosen = Fault("truncate", dealt=True)  # a download was served: cut it short
        if chosen is None:
            return Fault("stall", seconds=0.0, delay=delay, dealt=True) if delay > 0 else None
        return attrs.evolve(chosen, delay=delay) if delay > 0 else chosen
