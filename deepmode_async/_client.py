"""`AsyncClient`: configuration, the session's life, and the resources."""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Final, Self, TypedDict, Unpack

import aiohttp
from yarl import URL

from . import _validate as check
from ._errors import DeepModeError, ValidationError
from ._retry import RetryPolicy
from ._shared_backoff import SharedBackoff
from ._timeout import Timeout, coerce_timeout
from ._transport import Transport, log
from .resources import Account, Images, Models
from .stores import Store, as_store

DEFAULT_BASE_URL: Final = "https://api.deepmode.ai"
#: Headers the client writes itself; a default of the user's would break requests.
_OWN_HEADERS: Final = frozenset(
    {"authorization", "content-type", "content-length", "transfer-encoding", "host"}
)
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_LOG_LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class ClientOptions(TypedDict, total=False):
    """What `with_options` may change; each left out stays as the client has it."""

    timeout: Timeout | float
    max_retries: int | RetryPolicy
    default_headers: Mapping[str, str]


class AsyncClient:
    """The DeepMode API on one aiohttp session: `dm.models`, `dm.images`, `dm.account`.

    ```python
    async with AsyncClient() as dm:  # key from $DEEPMODE_API_KEY
        generation = await dm.images.generate(model_id=..., prompt="a lighthouse")
        await dm.images.download(generation, "out/")
    ```

    `api_key` defaults to `$DEEPMODE_API_KEY`, `base_url` to `$DEEPMODE_BASE_URL`, then
    the public API. `timeout` is a `Timeout` or a number (the read timeout) and applies to
    each attempt; every method takes `timeout=` for itself. `max_retries` bounds the
    retries of one call (0: none), or is a whole `RetryPolicy` (its backoff and caps
    too); `max_connections` bounds the connections open at once.
    A `session` you pass is used as is and not closed by the client; otherwise one is
    created on first use, in the running event loop, and closed by `aclose()`.
    `default_headers` are sent with every API request (never to the image host).
    `store` (a store of `deepmode_async.stores`, or its URL) shares the back-off: a wait
    the server asks for (429, or 503 with `Retry-After`) holds the new calls of every
    client with this key sharing that store until then. A store given as a URL is
    closed by `aclose()`; one that cannot be reached leaves each client to back off on
    its own (logged once). None: this client backs off alone.
    """

    models: Models
    images: Images
    account: Account

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
        _configure_logging(os.environ.get("DEEPMODE_LOG"))
        key = _api_key(api_key if api_key is not None else os.environ.get("DEEPMODE_API_KEY"))
        if base_url is None:
            base_url = os.environ.get("DEEPMODE_BASE_URL") or DEFAULT_BASE_URL
        url = _base_url(base_url)
        if (
            not isinstance(max_connections, int)
            or isinstance(max_connections, bool)
            or max_connections < 1
        ):
            raise ValidationError(
                f"max_connections must be an int >= 1, not {check.shown(max_connections)}"
            )
        if session is not None and not isinstance(session, aiohttp.ClientSession):
            raise ValidationError("session must be an aiohttp.ClientSession or None")
        retry = _retry_policy(max_retries)
        self._transport = Transport(
            api_key=key,
            base_url=url,
            timeout=coerce_timeout(timeout, Timeout()),
            retry=retry,
            max_connections=max_connections,
            session=session,
            default_headers=_headers(default_headers),
            backoff=None
            if store is None
            else SharedBackoff(
                as_store(store),
                f"{url}\n{key}",  # one pause per account and API; only a hash is kept
                cap=retry.retry_after_cap,
                owns_store=isinstance(store, str),
            ),
        )
        self._resources()

    def with_options(self, **options: Unpack[ClientOptions]) -> Self:
        """A client with some options changed, on this client's session, connection pool
        and everything else it was given (as openai's `with_options`):

        ```python
        patient = dm.with_options(timeout=Timeout(read=1200), max_retries=5)
        ```

        `timeout`, `max_retries` and `default_headers` take what the constructor takes
        (`default_headers` replaces the client's, it does not add to them). Closing the
        new client ends its own calls only; closing this one closes both. Anything else
        (`api_key`, `base_url`: another account or host) is refused: make a new client.
        """
        if unknown := sorted(set(options) - ClientOptions.__optional_keys__):
            raise ValidationError(
                f"with_options() changes timeout, max_retries and default_headers only, not "
                f"{', '.join(unknown)}: for another key or host, make a new client"
            )
        transport = self._transport
        derived = copy.copy(self)
        derived._transport = transport.derive(
            timeout=coerce_timeout(options.get("timeout", transport.timeout), Timeout()),
            retry=_retry_policy(options.get("max_retries", transport.retry)),
            default_headers=_headers(options.get("default_headers", transport.default_headers)),
        )
        derived._resources()
        return derived

    def _resources(self) -> None:
        self.models = Models(self._transport)
        self.images = Images(self._transport)
        self.account = Account(self._transport)

    @property
    def base_url(self) -> str:
        """The API's base URL."""
        return str(self._transport.base_url)

    @property
    def timeout(self) -> Timeout:
        """The timeout of every call that does not pass its own."""
        return self._transport.timeout

    @property
    def max_retries(self) -> int:
        """How often a failed call may be retried (within the at-most-once rules)."""
        return self._transport.retry.max_retries

    @property
    def retry_policy(self) -> RetryPolicy:
        """When and how often a failed call is tried again (`max_retries=` made whole)."""
        return self._transport.retry

    @property
    def closed(self) -> bool:
        """True once `aclose()` was called; calls then raise `DeepModeError`."""
        return self._transport.closed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    async def aclose(self) -> None:
        """Close the client's session (not one you passed in). Calls still in flight end
        with a `DeepModeError` ("closed during the call"). Closing twice is harmless.

        A session you passed in is yours to close, after your calls: aiohttp leaves a
        call that is reading a body waiting forever when its session closes under it.
        """
        await self._transport.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def forget_session(client: AsyncClient) -> aiohttp.ClientSession | None:
    """Let go of `client`'s session without closing it (in a forked child, whose loop
    is not the session's); the caller keeps it referenced."""
    if client._transport.backoff is not None:
        client._transport.backoff.forget()
    return client._transport.forget_session()


def _retry_policy(max_retries: int | RetryPolicy) -> RetryPolicy:
    return max_retries if isinstance(max_retries, RetryPolicy) else RetryPolicy(max_retries)


def _api_key(key: object) -> str:
    if key is None or key == "":
        raise DeepModeError(
            "No API key: pass AsyncClient(api_key=...) or set the DEEPMODE_API_KEY "
            "environment variable (keys are at https://deepmode.ai, under API)"
        )
    if not isinstance(key, str):
        raise ValidationError(f"api_key must be a str, not {type(key).__name__}")
    if not key.isascii() or not key.isprintable() or key != key.strip() or " " in key:
        # Never echo it: even a malformed key is a secret.
        raise ValidationError("api_key contains spaces or characters a key cannot have")
    return key


def _base_url(value: object) -> URL:
    if not isinstance(value, str):
        raise ValidationError(f"base_url must be a str, not {type(value).__name__}")
    try:
        url = URL(value)
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ValidationError(f"base_url must be an absolute http(s) URL, not {check.shown(value)}")
    if url.user is not None or url.password is not None:
        # Never echo it: the URL carries a password.
        raise ValidationError("base_url must not hold credentials: pass api_key= instead")
    if url.query_string or url.fragment:
        raise ValidationError(f"base_url must have no query or fragment, not {check.shown(value)}")
    return url


def _headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ValidationError("default_headers must be a mapping of str to str")
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValidationError(f"default_headers: {name!r} is not a valid header name")
        check.header_value(f"default_headers[{name!r}]", value)
        if name.lower() in _OWN_HEADERS:
            raise ValidationError(
                f"default_headers must not set {name.title()}: the client sets it"
                + (" (pass api_key=)" if name.lower() == "authorization" else "")
            )
    return dict(headers)


def _configure_logging(level_name: str | None) -> None:
    """`DEEPMODE_LOG=debug|info|warning`: log to stderr, unless the app set up logging."""
    if not level_name:
        return
    level = _LOG_LEVELS.get(level_name.strip().lower())
    if level is None:
        raise ValidationError(
            f"DEEPMODE_LOG must be one of {', '.join(_LOG_LEVELS)}, not {level_name!r}"
        )
    log.setLevel(level)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
