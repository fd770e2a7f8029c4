"""`Client`: the blocking facade. One `AsyncClient` runs on an event loop in a helper
thread (an anyio blocking portal); every method of its resources is derived from the
async one when first used, so nothing here names a single endpoint.

A call from any thread hands the coroutine to that loop and waits for it. If the
waiting thread is interrupted (Ctrl+C raises KeyboardInterrupt there), the call is
cancelled on the loop, which closes its connection. An async iterator becomes a plain
iterator fed by one task; leaving the loop early cancels that task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
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
from typing import TYPE_CHECKING, Any, Self, TypeVar, Unpack, cast

import aiohttp
import anyio
import attrs

from ._client import AsyncClient, ClientOptions, forget_session
from ._errors import DeepModeError, ValidationError
from ._raw import RawResponses
from ._retry import RetryPolicy
from ._timeout import Timeout
from .resources._blocking import BlockingAccount, BlockingImages, BlockingModels
from .stores import Store

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

T = TypeVar("T")

_SIGNALS_INTERRUPT_WAITS = os.name == "posix"
_WAKE_UP_SECONDS = 0.2
_CLEANUP_WAIT = 60.0  # seconds an abandoned call or iteration may take to clean up


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
        max_retries: int | RetryPolicy = 2,
        max_connections: int = 100,
        session: aiohttp.ClientSession | None = None,
        default_headers: Mapping[str, str] | None = None,
        store: Store | str | None = None,
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
            store=store,
        )
        self._loop = _LoopThread(self._async)
        # Closes the loop if the app forgets to (collected, or at exit); nothing the loop
        # or the resources hold points back to the client, so dropping it is enough.
        self._finalizer = weakref.finalize(self, self._loop.close, forgotten=repr(self))
        self._origin: Client | None = None  # the client this one was derived from
        self._resources()

    def _resources(self) -> None:
        self.models = cast(BlockingModels, _Blocking(self._async.models, self._loop))
        self.images = cast(BlockingImages, _Blocking(self._async.images, self._loop))
        self.account = cast(BlockingAccount, _Blocking(self._async.account, self._loop))

    def with_options(self, **options: Unpack[ClientOptions]) -> Self:
        """`AsyncClient.with_options`, blocking: a client on this one's loop and session."""
        derived = copy.copy(self)
        derived._async = self._async.with_options(**options)
        # It runs on this client's loop, which must outlive it: it keeps this client.
        derived._origin = self
        derived._resources()
        return derived

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
        """How often a failed call may be retried (within the at-most-once rules)."""
        return self._async.max_retries

    @property
    def retry_policy(self) -> RetryPolicy:
        """When and how often a failed call is tried again (`max_retries=` made whole)."""
        return self._async.retry_policy

    @property
    def closed(self) -> bool:
        """True once `close()` was called; calls then raise `DeepModeError`."""
        return self._loop.closed or self._async.closed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the connections and stop the helper thread; calls still in flight (in
        other threads) end with a `DeepModeError`. Closing twice is harmless."""
        if self._origin is None:
            self._finalizer.detach()
            self._loop.close()
        elif not self._loop.closed:
            self._loop.run(self._async.aclose)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _wait(future: Future[T]) -> T:
    """The future's result. Where a signal interrupts a lock wait (POSIX), Ctrl+C reaches
    a plain wait; elsewhere the wait wakes up now and then so that it can."""
    if _SIGNALS_INTERRUPT_WAITS:
        return future.result()
    while True:
        try:
            return future.result(timeout=_WAKE_UP_SECONDS)
        except TimeoutError:
            if future.done():  # finished just now, or the call itself raised TimeoutError
                return future.result()


class _Call:
    """One blocking call's coroutine on the loop, which an interrupted caller waits for:
    its cleanup (temporary files, connections) is over before the interrupt goes on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = False
        self._abandoned = False
        self._ended = threading.Event()

    async def run(self, function: Callable[[], Awaitable[T]]) -> T:
        with self._lock:
            if self._abandoned:  # interrupted before it began: nothing to do or undo
                raise asyncio.CancelledError
            self._started = True
        try:
            return await function()
        finally:
            self._ended.set()

    def abandon(self, future: Future[T]) -> None:
        """Cancel the call, and wait for it to end if it had begun."""
        with self._lock:
            self._abandoned = True
            started = self._started
        future.cancel()
        if started:
            self._ended.wait(_CLEANUP_WAIT)


class _LoopThread:
    """The helper thread's event loop (an anyio blocking portal), started on first use,
    and the `AsyncClient` that lives on it. Runs calls and iterations for any thread."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._started: _Started | None = None
        self.closed = False
        _all_loops.add(self)

    # ------------------------------------------------------------------ running

    def run(self, function: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine function on the loop and wait; an interrupt here cancels it."""
        started = self._started or self._start()  # no lock once it runs
        self._refuse_own_thread(started)
        call = _Call()
        coroutine = call.run(function)
        try:
            # Straight onto the loop: a portal task (with its cancel scope) costs more.
            future = asyncio.run_coroutine_threadsafe(coroutine, started.loop)
        except RuntimeError:  # the loop closed since we looked
            coroutine.close()
            raise _closed_error() from None
        try:
            return _wait(future)
        except concurrent.futures.CancelledError:  # not by us: the client closed meanwhile
            raise _closed_error("during the call") from None
        except BaseException:
            call.abandon(future)  # KeyboardInterrupt in this thread: stop the call on the loop
            raise

    def iterate(self, function: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Drive an async iterator in one task on the loop, handing its items over here.
        Leaving the loop early (break, an error, Ctrl+C) cancels that task."""
        started = self._started or self._start()
        self._refuse_own_thread(started)
        portal = started.portal
        send, receive = anyio.create_memory_object_stream[T]()
        pumped = threading.Event()  # set once the iterator has been closed on the loop

        async def pump() -> None:
            try:
                async with send, contextlib.aclosing(function()) as items:  # type: ignore[type-var]
                    async for item in items:
                        await send.send(item)
            except BaseException as exc:
                if isinstance(exc, Exception | anyio.get_cancelled_exc_class()):
                    raise
                # Any other BaseException from a portal task would stop the whole portal.
                raise DeepModeError(f"the iteration failed: {exc!r}") from exc
            finally:
                pumped.set()

        try:
            future = portal.start_task_soon(pump)
        except RuntimeError:
            raise _closed_error() from None
        try:
            while True:
                try:
                    item = _wait(portal.start_task_soon(receive.receive))
                except anyio.EndOfStream:
                    future.result()  # raises what ended the iteration early, if anything
                    return
                except (RuntimeError, concurrent.futures.CancelledError):
                    raise _closed_error("during the iteration") from None
                yield item
        finally:
            future.cancel()
            try:
                portal.call(receive.aclose)
            except RuntimeError:  # the client was closed meanwhile: its loop is gone
                receive.close()
            else:
                # Cancelling returns at once; the iterator's clean-up (cancelled requests,
                # temporary files) is over only when the pump ends. Bounded, in case the
                # loop dies under it.
                pumped.wait(_CLEANUP_WAIT)

    def _refuse_own_thread(self, started: _Started) -> None:
        if threading.get_ident() == started.thread_id:
            raise DeepModeError(
                "A Client method was called from the Client's own event loop (from a "
                "callback such as progress=); it would wait for itself forever"
            )

    # ------------------------------------------------------------------ life

    def _start(self) -> _Started:
        with self._lock:
            if self.closed:
                raise _closed_error()
            if self._started is None:
                self._started = _Started.launch()
            return self._started

    def close(self, forgotten: str | None = None) -> None:
        """Close the client's session and stop the thread (which is joined)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            started, self._started = self._started, None
        if started is None:
            return
        if threading.get_ident() == started.thread_id:
            # From a callback on the loop: the loop cannot wait for itself to stop.
            threading.Thread(target=started.stop, args=(self._client,), daemon=True).start()
        else:
            started.stop(self._client)
        if forgotten is not None:  # after the clean-up: the warning may be an error
            warnings.warn(
                f"{forgotten} was not closed; use `with Client() as dm:` or call close()",
                ResourceWarning,
                stacklevel=2,
            )

    def forget_after_fork(self) -> None:
        """In a forked child the loop's thread does not exist: start afresh on next use."""
        self._lock = threading.Lock()
        if self._started is not None:
            # Kept, never collected: finalizing anyio's portal context would join a thread
            # that does not exist here, and hang.
            _orphaned_after_fork.append(self._started)
            _orphaned_after_fork.append(forget_session(self._client))
            self._started = None


@attrs.frozen
class _Started:
    """A running helper loop: its portal, how to stop it, its asyncio loop and thread."""

    portal: BlockingPortal
    context: AbstractContextManager[BlockingPortal]
    loop: asyncio.AbstractEventLoop
    thread_id: int

    @classmethod
    def launch(cls) -> _Started:
        """Start the loop from a starter thread, so that Ctrl+C in the calling thread
        cannot land inside anyio's start-up and leave a half-started loop behind."""
        outcome: Future[_Started] = Future()

        def start() -> None:
            # Imported here: only a `Client`'s first call needs it (benchmarks/import_time.py).
            import anyio.from_thread

            try:
                context = anyio.from_thread.start_blocking_portal(name="deepmode-client")
                portal = context.__enter__()
                loop = portal.call(asyncio.get_running_loop)
                outcome.set_result(cls(portal, context, loop, portal.call(threading.get_ident)))
            except BaseException as exc:  # pragma: no cover - anyio failing to start a loop
                outcome.set_exception(exc)

        threading.Thread(target=start, name="deepmode-client-start", daemon=True).start()
        try:
            return _wait(outcome)
        except BaseException:
            outcome.add_done_callback(_stop_if_started)  # interrupted: stop it once it is up
            raise

    def stop(self, client: AsyncClient) -> None:
        """Close the session, cancel what still runs (iterations), stop and join."""
        try:
            self.portal.call(client.aclose)
        finally:
            with contextlib.suppress(RuntimeError):
                self.portal.call(self.portal.stop, True)  # cancel iterations still waiting
            self.context.__exit__(None, None, None)


def _stop_if_started(outcome: Future[_Started]) -> None:
    if not outcome.cancelled() and outcome.exception() is None:
        started = outcome.result()
        with contextlib.suppress(RuntimeError):
            started.portal.call(started.portal.stop, True)
        started.context.__exit__(None, None, None)


def _closed_error(when: str = "") -> DeepModeError:
    detail = f" {when}" if when else ""
    return DeepModeError(f"This Client was closed{detail}; create a new one to make more calls")


#: Every loop, so that a forked child can forget the threads it did not inherit.
_all_loops: weakref.WeakSet[_LoopThread] = weakref.WeakSet()
_orphaned_after_fork: list[object] = []


def _after_fork_in_child() -> None:
    for loop in list(_all_loops):
        loop.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Blocking:
    """A blocking view of an async resource: each public coroutine method (or async
    generator) of the target becomes a method that runs it through the client's loop."""

    def __init__(self, target: object, loop: _LoopThread) -> None:
        self._target, self._loop = target, loop

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # also keeps a half-built instance from recursing
            raise AttributeError(name)
        attribute = getattr(self._target, name)
        if isinstance(attribute, RawResponses):  # `with_raw_response`: blocking in turn
            blocking: Any = _Blocking(attribute, self._loop)
        elif inspect.iscoroutinefunction(attribute):
            blocking = _blocking(self._loop.run, attribute)
        elif inspect.isasyncgenfunction(attribute):
            blocking = _blocking(self._loop.iterate, attribute)
        else:
            return attribute
        setattr(self, name, blocking)  # made once; later lookups skip __getattr__
        return blocking

    def __dir__(self) -> list[str]:
        return [name for name in dir(self._target) if not name.startswith("_")]

    def __repr__(self) -> str:
        return f"<blocking {type(self._target).__name__}>"


def _blocking(run: Callable[[Callable[[], Any]], Any], method: Callable[..., Any]) -> Any:
    """`method` made blocking: each call hands it to `run` (a `_LoopThread`'s `run` for
    a coroutine function, its `iterate` for an async generator function)."""

    @functools.wraps(method)  # the name, docstring and signature of the async method
    def call(*args: Any, **kwargs: Any) -> Any:
        return run(functools.partial(method, *args, **kwargs))

    return call
