"""The service's work: how long calls take, training, and what the mock sends out itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

import aiohttp
from yarl import URL

from .._formats import SNIFF_BYTES, sniff_image_format
from ._http import Problem
from ._records import ENDPOINTS, CallbackDelivery, CallbackKind, Endpoint, MockModel, check_endpoint


class Work:
    """Latency, training and callback delivery, with the tasks and the session they use.

    Work a call starts after its answer (training, callbacks) runs as a task of its
    own, cancelled by `close`; outgoing requests (callbacks, training image URLs) share
    one client session, open between `open` and `close`.
    """

    def __init__(
        self,
        *,
        latency: float | Mapping[Endpoint, float],
        training_delay: float,
        callback_retries: int,
        callback_backoff: float,
    ) -> None:
        self.latency: dict[Endpoint, float] = (
            {check_endpoint(name): seconds for name, seconds in latency.items()}
            if isinstance(latency, Mapping)
            else dict.fromkeys(ENDPOINTS, float(latency))
        )
        self.training_delay = training_delay
        self.callback_retries = callback_retries
        self.callback_backoff = callback_backoff
        self.callbacks: list[CallbackDelivery] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self._stopping = False

    def set_latency(self, endpoint: Endpoint, seconds: float) -> None:
        """How long each call of `endpoint` takes on the server from now on."""
        self.latency[check_endpoint(endpoint)] = seconds

    async def open(self) -> None:
        """Ready to start work and send requests (on the running event loop)."""
        self._stopping = False
        self._http = aiohttp.ClientSession()

    def stop_starting(self) -> None:
        """Calls finishing from now on (the mock is stopping) start no new work."""
        self._stopping = True

    async def close(self) -> None:
        """Cancel training and callbacks still under way, then close the session."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self._http = None

    async def simulate(self, endpoint: Endpoint) -> None:
        """The time the real service would take to do the work of one call."""
        if seconds := self.latency.get(endpoint, 0.0):
            await asyncio.sleep(seconds)

    def train(self, model: MockModel, callback: str | None) -> None:
        """Finish training `model` after `training_delay`, then POST it to `callback`."""
        self._spawn(self._train(model, callback))

    def deliver_later(
        self, endpoint: Endpoint, kind: CallbackKind, url: str, result: Callable[[], Any]
    ) -> None:
        """Do the work of a callback-mode call of `endpoint`, then POST `result()` to `url`."""
        self._spawn(self._work_then_deliver(endpoint, kind, url, result))

    async def fetch_training_urls(self, urls: Iterable[str]) -> None:
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

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._stopping:
            coroutine.close()
            return
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _train(self, model: MockModel, callback: str | None) -> None:
        await asyncio.sleep(self.training_delay)
        model.active = True
        if callback is not None:
            await self._deliver("model", callback, model.to_json())

    async def _work_then_deliver(
        self, endpoint: Endpoint, kind: CallbackKind, url: str, result: Callable[[], Any]
    ) -> None:
        await self.simulate(endpoint)
        await self._deliver(kind, url, result())

    async def _deliver(self, kind: CallbackKind, url: str, body: Any) -> None:
        """POST `body` to `url`, retrying with backoff; the outcome goes to `callbacks`."""
        delivery = CallbackDelivery(kind, url, body)
        self.callbacks.append(delivery)
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
