"""`RedisStore`: every process on every machine that uses one Redis (the `redis` extra)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import secrets
import socket
import threading
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from .._errors import StoreError, ValidationError
from ._base import (
    QueueSubscription,
    Store,
    Subscription,
    check_address,
    check_channel,
    check_items,
    check_key,
    check_ns,
    check_ttl,
    check_value,
    chunks,
    password_of,
    redact_url,
)
from ._redis_pubsub import LoopPubSub

if TYPE_CHECKING:
    from redis.asyncio import Redis

_PAGE: Final = 500
#: Connections per event loop at most (or fewer, if your client's pool says so).
_MAX_CONNECTIONS: Final = 64
_POOL_INTERNALS: Final = ("maint_notifications", "orig_", "himport_registry")
# Compare-and-set in one step on the server; KEYS[1] key, ARGV expected, value, ms or "".
_REPLACE: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[2])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""
_ADD_AND_PUBLISH: Final = """
local set
if ARGV[2] == '' then set = redis.call('SET', KEYS[1], ARGV[1], 'NX')
else set = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) end
if not set then return 0 end
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
"""
_GLOB: Final = re.compile(rb"([*?\[\]\\])")
#: Connection options the store sets unless the URL or your client says otherwise: a
#: store that cannot be reached fails within seconds instead of hanging a request.
_DEFAULTS: Final = {"socket_connect_timeout": 5.0, "socket_timeout": 10.0}


def _redis() -> Any:
    try:
        import redis.asyncio
    except ImportError:
        raise StoreError(
            "RedisStore needs the redis package: pip install 'deepmode-async[redis]'"
        ) from None
    return redis


class _OnLoop:
    """The client (and pub/sub) of one event loop, closed when that loop ends."""

    def __init__(self, store: RedisStore) -> None:
        self.client: Redis = store._make_client()
        self.replace = self.client.register_script(_REPLACE)
        self.add_and_publish = self.client.register_script(_ADD_AND_PUBLISH)
        self.pubsub = LoopPubSub(self.client, store._failures, store._describe)
        self._done = asyncio.Event()
        # A task that outlives nothing: asyncio.run() (and anyio) cancel it when the
        # loop ends, and it closes the connections on the loop that made them.
        self.keeper = asyncio.get_running_loop().create_task(self._keep())

    async def _keep(self) -> None:
        try:
            await self._done.wait()
        finally:
            await self.pubsub.aclose()
            with contextlib.suppress(Exception):
                await self.client.aclose()

    async def aclose(self) -> None:
        self._done.set()
        await asyncio.gather(self.keeper, return_exceptions=True)


def _connection_settings(url_or_client: object) -> tuple[dict[str, Any], str, int]:
    """The connection settings of a URL or a client (not its pool), its name without a
    password, and the most connections the store may open."""
    redis = _redis()
    if isinstance(url_or_client, str):
        name = redact_url(url_or_client)
        try:
            kwargs = {**_DEFAULTS, **redis.asyncio.connection.parse_url(url_or_client)}
        except (ValueError, TypeError) as exc:
            reason = _scrub(str(exc), url_or_client)
            if _quotes_some_of(reason, password_of(url_or_client)):
                reason = "it does not parse; a password must be percent-encoded"
            raise ValidationError(
                f"not a Redis URL: {name} ({reason}); "
                "use redis://[[user]:password@]host[:port][/db], rediss://... or "
                "unix:///path/to/redis.sock"
            ) from None
        kwargs.setdefault(
            "retry", redis.asyncio.retry.Retry(redis.backoff.ExponentialBackoff(0.2, 0.02), 2)
        )
        max_connections = _MAX_CONNECTIONS
    elif isinstance(url_or_client, redis.asyncio.Redis):
        pool = url_or_client.connection_pool
        # The settings, not the pool's own machinery (handlers bound to that pool).
        kwargs = {
            setting: value
            for setting, value in pool.connection_kwargs.items()
            if not setting.startswith(_POOL_INTERNALS)
        }
        kwargs["connection_class"] = pool.connection_class
        max_connections = min(pool.max_connections, _MAX_CONNECTIONS)
        tls = issubclass(pool.connection_class, redis.asyncio.SSLConnection)
        name = _describe_kwargs(kwargs, "rediss" if tls else "redis")
    else:
        raise ValidationError(
            "RedisStore takes a redis:// URL or a redis.asyncio.Redis, not "
            f"{type(url_or_client).__name__}"
        )
    return kwargs, name, max_connections


class RedisStore(Store):
    """A store in Redis, shared by every process on every machine that uses it.

    `url_or_client` is a URL in redis-py's form (`redis://[[user]:password@]host[:port]
    [/db]`, `rediss://` for TLS, `unix:///path.sock`) or a `redis.asyncio.Redis` you
    made: its connection settings (address, credentials, TLS, timeouts) are copied into
    one client per event loop that uses the store, because a redis-py asyncio client
    works on one loop only. Your client itself is never used nor closed by the store.
    Keys are `prefix + ns + ":" + key`, channels `prefix + channel`. Pub/sub is Redis's
    own (a push: a waiter wakes within a few milliseconds). After an outage the store
    reconnects by itself. No password appears in its repr or its errors.
    """

    def __init__(self, url_or_client: str | Redis, *, prefix: str = "deepmode:") -> None:
        if not isinstance(prefix, str):
            raise ValidationError(f"prefix must be a str, not {type(prefix).__name__}")
        self._prefix = prefix
        kwargs, self._name, max_connections = _connection_settings(url_or_client)
        kwargs["decode_responses"] = False  # values are bytes
        # Blocking: past `max_connections` a call waits for a free connection rather
        # than failing as if Redis were down.
        kwargs["max_connections"] = max_connections
        kwargs["timeout"] = kwargs.get("socket_timeout") or _DEFAULTS["socket_timeout"]
        self._kwargs = kwargs
        self._password = kwargs.get("password")
        try:  # a setting redis-py does not take (`?Password=`) fails here, not at each call
            _redis().asyncio.BlockingConnectionPool(**kwargs).make_connection()
        except (TypeError, ValueError, _redis().RedisError) as exc:
            raise ValidationError(
                f"RedisStore({self._name!r}): {_scrub(str(exc), self._password)}; see "
                "redis-py's from_url for the settings a URL's query string may give"
            ) from None
        self._failures: tuple[type[BaseException], ...] = (_redis().RedisError, OSError)
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _OnLoop] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._secrets: dict[str, bytes] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStore({self._name!r}, prefix={self._prefix!r})"

    # ------------------------------------------------------------------ plumbing

    def _make_client(self) -> Redis:
        redis = _redis()
        pool = redis.asyncio.BlockingConnectionPool(**self._kwargs)
        client: Redis = redis.asyncio.Redis.from_pool(pool)
        return client

    def _on_loop(self) -> _OnLoop:
        if self._closed:
            raise StoreError(f"this RedisStore ({self._name}) was closed")
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._loops.get(loop)
        if state is None or state.keeper.done():
            state = _OnLoop(self)
            with self._lock:
                # The keeper task refers to its loop, so ended loops are dropped here.
                for ended in [other for other in self._loops if other.is_closed()]:
                    del self._loops[ended]
                self._loops[loop] = state
        return state

    def _describe(self, exc: BaseException) -> StoreError:
        return describe_failure(exc, self._name, self._password)

    @contextlib.contextmanager
    def _translated(self) -> Any:
        try:
            yield
        except self._failures as exc:
            raise self._describe(exc) from None

    def _key(self, ns: str, key: str) -> bytes:
        return f"{self._prefix}{ns}:{key}".encode()

    # ------------------------------------------------------------------ records

    async def get(self, ns: str, key: str) -> bytes | None:
        check_address(ns, key)
        client = self._on_loop().client
        with self._translated():
            value = await client.get(self._key(ns, key))
        return cast("bytes | None", value)

    async def get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        check_ns(ns)
        keys = [check_key(key) for key in keys]
        client = self._on_loop().client
        values: list[bytes | None] = []
        with self._translated():
            for part in chunks(keys, _PAGE):
                found = await client.mget([self._key(ns, key) for key in part])
                values.extend(cast("list[bytes | None]", found))
        return values

    async def put(self, ns: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
        await self._set(ns, key, value, ttl, only_new=False)

    async def put_many(
        self, ns: str, items: Sequence[tuple[str, bytes]], *, ttl: float | None = None
    ) -> None:
        checked, checked_ttl = check_items(ns, items, ttl)
        ms = _ms(checked_ttl)
        # MULTI/EXEC: one round trip, and no other client sees half of it.
        async with self._on_loop().client.pipeline(transaction=True) as pipe:
            for key, value in checked:
                pipe.set(self._key(ns, key), value, px=ms)
            with self._translated():
                await pipe.execute()

    async def add(self, ns: str, key: str, value: bytes, *, ttl: float | None = None) -> bool:
        return await self._set(ns, key, value, ttl, only_new=True)

    async def _set(
        self, ns: str, key: str, value: bytes, ttl: float | None, *, only_new: bool
    ) -> bool:
        check_address(ns, key)
        value, ttl = check_value(value), check_ttl(ttl)
        client = self._on_loop().client
        with self._translated():
            done = await client.set(self._key(ns, key), value, px=_ms(ttl), nx=only_new)
        return bool(done)

    async def replace(
        self, ns: str, key: str, expected: bytes, value: bytes, *, ttl: float | None = None
    ) -> bool:
        check_address(ns, key)
        expected, value, ttl = check_value(expected), check_value(value), check_ttl(ttl)
        script = self._on_loop().replace
        ms = _ms(ttl)
        with self._translated():
            done = await script(keys=[self._key(ns, key)], args=[expected, value, ms or ""])
        return bool(done)

    async def add_and_publish(
        self, ns: str, key: str, value: bytes, channel: str, *, ttl: float | None = None
    ) -> bool:
        check_address(ns, key)
        check_channel(channel)
        value, ttl = check_value(value), check_ttl(ttl)
        script = self._on_loop().add_and_publish
        args = [value, _ms(ttl) or "", f"{self._prefix}{channel}".encode()]
        with self._translated():
            done = await script(keys=[self._key(ns, key)], args=args)
        return bool(done)

    async def delete(self, ns: str, key: str) -> bool:
        check_address(ns, key)
        client = self._on_loop().client
        with self._translated():
            count = await client.delete(self._key(ns, key))
        return bool(count)

    async def items(self, ns: str) -> AsyncIterator[tuple[str, bytes]]:
        check_ns(ns)
        start = f"{self._prefix}{ns}:".encode()
        pattern = _GLOB.sub(rb"\\\1", start) + b"*"
        cursor = 0
        while True:
            client = self._on_loop().client
            with self._translated():
                cursor, keys = await client.scan(cursor, match=pattern, count=_PAGE)
                values = cast("list[bytes | None]", await client.mget(keys) if keys else [])
            for key, value in zip(keys, values, strict=True):
                if value is not None:  # expired or deleted since the SCAN
                    yield cast(bytes, key)[len(start) :].decode(), value
            if cursor == 0:
                return

    # ------------------------------------------------------------------ pub/sub

    async def publish(self, channel: str, message: bytes) -> None:
        check_channel(channel)
        message = check_value(message)
        client = self._on_loop().client
        with self._translated():
            await client.publish(f"{self._prefix}{channel}".encode(), message)

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        check_channel(channel)
        pubsub = self._on_loop().pubsub
        name = f"{self._prefix}{channel}".encode()
        sub = QueueSubscription(asyncio.get_running_loop())
        await pubsub.subscribe(name, sub)
        try:
            yield sub
        finally:
            pubsub.unsubscribe(name, sub)

    # ------------------------------------------------------------------ the rest

    def secret(self, name: str) -> bytes:
        check_key(name)
        cached = self._secrets.get(name)
        if cached is not None:
            return cached
        if self._closed:
            raise StoreError(f"this RedisStore ({self._name}) was closed")
        # A loop of its own on a thread of its own: this may be called on a running loop.
        with concurrent.futures.ThreadPoolExecutor(1) as one:
            value = one.submit(asyncio.run, self._fetch_secret(name)).result()
        return self._secrets.setdefault(name, value)

    async def _fetch_secret(self, name: str) -> bytes:
        # Cannot clash with a record: a namespace is never empty.
        key = f"{self._prefix}:secret:{name}".encode()
        client = self._make_client()
        try:
            with self._translated():
                await client.set(key, secrets.token_bytes(32), nx=True)
                value = cast("bytes | None", await client.get(key))
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
        if value is None or len(value) != 32:
            raise StoreError(f"Redis at {self._name} lost the shared secret {name!r}; try again")
        return value

    async def aclose(self) -> None:
        self._closed = True
        with self._lock:
            states = list(self._loops.items())
            self._loops.clear()
        here = asyncio.get_running_loop()
        for loop, state in states:
            if loop is here:
                await state.aclose()
            elif not loop.is_closed():
                with contextlib.suppress(Exception):
                    future = asyncio.run_coroutine_threadsafe(state.aclose(), loop)
                    await asyncio.wait_for(asyncio.wrap_future(future), 5.0)


def describe_failure(exc: BaseException, name: str, password: object) -> StoreError:
    """A `StoreError` for a redis/socket failure: what happened and what to check."""
    redis = _redis()
    reason = _scrub(str(exc), password) or type(exc).__name__
    where = f"Redis at {name}"
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        text = f"{where} refused the credentials: {reason}; check the URL's user and password"
    elif isinstance(exc, redis.exceptions.ResponseError) and "NOAUTH" in str(exc):
        text = f"{where} requires a password: put it in the URL (redis://:PASSWORD@host)"
    elif isinstance(exc, redis.TimeoutError | TimeoutError):
        text = f"{where} did not answer in time ({reason}); is it overloaded or unreachable?"
    elif isinstance(exc, redis.ConnectionError | OSError):
        if _caused_by(exc, ConnectionRefusedError):
            reason = "connection refused"
        elif _caused_by(exc, socket.gaierror):
            reason = f"no such host ({reason})"
        text = f"cannot reach {where}: {reason}; is redis-server running?"
    else:
        text = f"{where} failed: {type(exc).__name__}: {reason}"
    return StoreError(text)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):  # a chain, not a loop
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


#: The longest expiry given to Redis, in ms (about 3 million years): a ttl Redis cannot
#: add to its clock (past 2**63 ms) would fail the write, so a longer one is this.
_LONGEST_MS: Final = 10**17


def _ms(ttl: float | None) -> int | None:
    return None if ttl is None else max(1, round(min(ttl, _LONGEST_MS / 1000) * 1000))


def _quotes_some_of(text: str, secret: str) -> bool:
    """Whether `text` holds any three characters in a row of `secret` (a parser's
    message may quote the piece of a URL it stumbled on)."""
    if len(secret) < 3:
        return bool(secret) and secret in text
    return any(secret[start : start + 3] in text for start in range(len(secret) - 2))


def _scrub(text: str, password: object) -> str:
    if isinstance(password, str) and password:
        text = text.replace(password, "***")
    return text


def _describe_kwargs(kwargs: dict[str, Any], scheme: str) -> str:
    """A URL naming the server of a client's settings, without its password."""
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}"
    host, port, db = kwargs.get("host", "localhost"), kwargs.get("port", 6379), kwargs.get("db", 0)
    user = kwargs.get("username")
    auth = f"{user or ''}:***@" if kwargs.get("password") else (f"{user}@" if user else "")
    return f"{scheme}://{auth}{host}:{port}/{db}"
