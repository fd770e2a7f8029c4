"""`Client`: the blocking facade. One `AsyncClient` runs on an event loop in a helper
thread (an anyio blocking portal); every method of its resources is derived from the
async one when first used, so nothing here names a single endpoint.

A call from any thread hands the coroutine to the portal and waits for it. If the
waiting thread is interrupted (Ctrl+C raises KeyboardInterrupt there), the call is
cancelled on the loop, which closes its connection. An async iterator becomes a plain
iterator fed by one task; leaving the loop early cancels that task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import aiohttp
import anyio
import anyio.from_thread
from anyio.from_thread import BlockingPortal

from ._client import AsyncClient
from ._errors import DeepModeError, ValidationError
from ._transport import Timeout
from .resources._blocking import BlockingAccount, BlockingImages, BlockingModels

T = TypeVar("T")

_SIGNALS_INTERRUPT_WAITS = os.name == "posix"
_WAKE_UP_SECONDS = 0.2


class Client:
    """The blocking DeepMode client: the resources and methods of `AsyncClient`, waiting
    for their results. For scripts, notebooks and threaded servers.

    ```python
    with Client() as dm:  # key from $DEEPMODE_API_KEY
        generation = dm.images.generate(model_id=..., prompt="a lighthouse")
        dm.images.download(generation, "out/")
    ```

    Takes the arguments of `AsyncClient`, except `session` (an aiohttp session belongs
    to one event loop; the client runs its own). Safe to share between threads, works
    inside a running event loop (Jupyter), and Ctrl+C cancels the call in flight.
    """

    models: BlockingModels
    images: BlockingImages
    account: BlockingAccount

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: Timeout | float | None = None,
        max_retries: int = 2,
        max_connections: int = 100,
        session: aiohttp.ClientSession | None = None,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        if session is not None:
            raise ValidationError(
                "Client runs its own event loop in a helper thread, so it cannot use an "
                "aiohttp session from yours: use AsyncClient(session=...) instead"
            )
        self._async = AsyncClient(
            api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            max_connections=max_connections,
            default_headers=default_headers,
        )
        self._loop = _LoopThread(self._async)
        # Closes the loop if the app forgets to: when the client is collected, or at exit.
        self._finalizer = weakref.finalize(self, self._loop.close, forgotten=repr(self))
        self.models = cast(BlockingModels, _Blocking(self._async.models, self))
        self.images = cast(BlockingImages, _Blocking(self._async.images, self))
        self.account = cast(BlockingAccount, _Blocking(self._async.account, self))

    @property
    def base_url(self) -> str:
        """The API's base URL."""
        return self._async.base_url

    @property
    def timeout(self) -> Timeout:
        """The timeout of every call that does not pass its own."""
        return self._async.timeout

    @property
    def max_retries(self) -> int:
        return self._async.max_retries

    @property
    def closed(self) -> bool:
        """True once `close()` was called; calls then raise `DeepModeError`."""
        return self._loop.closed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the connections and stop the helper thread. Closing twice is harmless."""
        self._finalizer.detach()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------- running on the loop

    def _run(self, function: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine function on the loop and wait for it; an interrupt cancels it."""
        # Straight onto the loop: a portal task (with its cancel scope) costs more per call.
        loop = self._loop.running or self._loop.event_loop()  # no lock once it runs
        if threading.get_ident() == self._loop.thread_id:
            raise DeepModeError(
                "A Client method was called from the Client's own event loop (from a "
                "callback such as progress=); it would wait for itself forever"
            )
        future = asyncio.run_coroutine_threadsafe(_coroutine(function), loop)
        try:
            return _wait(future)
        except BaseException:
            future.cancel()  # KeyboardInterrupt in this thread: stop the call on the loop
            raise

    def _iterate(self, function: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Drive an async iterator in one task on the loop, handing its items over here."""
        portal = self._loop.portal()
        send, receive = anyio.create_memory_object_stream[T]()

        async def pump() -> None:
            async with send:
                async for item in function():
                    await send.send(item)

        future = portal.start_task_soon(pump)
        try:
            while True:
                try:
                    item = _wait(portal.start_task_soon(receive.receive))
                except anyio.EndOfStream:
                    future.result()  # raises what ended the iteration early, if anything
                    return
                yield item
        finally:
            future.cancel()  # the caller stopped early (break, an error, Ctrl+C): stop the work
            with contextlib.suppress(RuntimeError):  # the client was closed meanwhile
                portal.call(receive.aclose)


def _wait(future: Future[T]) -> T:
    """The future's result. Where a signal interrupts a lock wait (POSIX), Ctrl+C reaches
    a plain wait; elsewhere the wait wakes up now and then so that it can."""
    if _SIGNALS_INTERRUPT_WAITS:
        return future.result()
    while True:
        try:
            return future.result(timeout=_WAKE_UP_SECONDS)
        except TimeoutError:
            if future.done():  # the call itself raised TimeoutError
                raise


async def _coroutine(function: Callable[[], Awaitable[T]]) -> T:
    return await function()


class _LoopThread:
    """The helper thread's event loop (an anyio blocking portal), started on first use,
    and the `AsyncClient` that lives on it."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._portal: BlockingPortal | None = None
        self._context: AbstractContextManager[BlockingPortal] | None = None
        #: The helper thread's asyncio loop while it runs.
        self.running: asyncio.AbstractEventLoop | None = None
        self.thread_id: int | None = None
        self.closed = False

    def portal(self) -> BlockingPortal:
        with self._lock:
            if self.closed:
                raise DeepModeError("This Client is closed; create a new one to make more calls")
            if self._portal is None:
                self._context = anyio.from_thread.start_blocking_portal(name="deepmode-client")
                self._portal = self._context.__enter__()
                self.running = self._portal.call(asyncio.get_running_loop)
                self.thread_id = self._portal.call(threading.get_ident)
            return self._portal

    def event_loop(self) -> asyncio.AbstractEventLoop:
        """The helper thread's asyncio loop, started on first use."""
        self.portal()
        assert self.running is not None
        return self.running

    def close(self, forgotten: str | None = None) -> None:
        """Close the client's session and stop the thread (which is joined)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.running = None
            portal, context = self._portal, self._context
            self._portal = self._context = None
        if portal is None or context is None:
            return
        try:
            portal.call(self._client.aclose)
        finally:
            context.__exit__(None, None, None)
        if forgotten is not None:  # after the clean-up: the warning may be an error
            warnings.warn(
                f"{forgotten} was not closed; use `with Client() as dm:` or call close()",
                ResourceWarning,
                stacklevel=2,
            )


class _Blocking:
    """A blocking view of an async resource: each public coroutine method (or async
    generator) of the target becomes a method that runs it through the client's loop."""

    def __init__(self, target: object, client: Client) -> None:
        self._target = target
        self._client = client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # also keeps a half-built instance from recursing
            raise AttributeError(name)
        attribute = getattr(self._target, name)
        if inspect.iscoroutinefunction(attribute):
            blocking = _blocking_call(self._client, attribute)
        elif inspect.isasyncgenfunction(attribute):
            blocking = _blocking_iterator(self._client, attribute)
        else:
            return attribute
        setattr(self, name, blocking)  # made once; later lookups skip __getattr__
        return blocking

    def __dir__(self) -> list[str]:
        return [name for name in dir(self._target) if not name.startswith("_")]

    def __repr__(self) -> str:
        return f"<blocking {type(self._target).__name__} of {self._client!r}>"


def _blocking_call(client: Client, method: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    @functools.wraps(method)  # the name, docstring and signature of the async method
    def call(*args: Any, **kwargs: Any) -> T:
        return client._run(functools.partial(method, *args, **kwargs))

    return call


def _blocking_iterator(
    client: Client, method: Callable[..., AsyncIterator[T]]
) -> Callable[..., Iterator[T]]:
    @functools.wraps(method)
    def iterate(*args: Any, **kwargs: Any) -> Iterator[T]:
        return client._iterate(functools.partial(method, *args, **kwargs))

    return iterate
