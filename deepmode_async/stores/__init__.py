"""Where the SDK keeps what must outlive a call, shared between processes.

```python
from deepmode_async.stores import open_store

store = open_store("sqlite:///deepmode.db")   # every process on this machine
store = open_store("redis://localhost:6379/0")  # every process on every machine
```

- `MemoryStore()`: this process only, in memory (the default everywhere).
- `SQLiteStore(path)`: a file shared by every process on one machine that opens it
  (`uvicorn --workers N`); survives restarts; the standard library only.
- `RedisStore(url_or_client, *, prefix="deepmode:")`: every process on every machine
  using that Redis; the `redis` extra (`pip install 'deepmode-async[redis]'`).

Everywhere the SDK takes a store it takes such a URL too (`as_store`). A store that
cannot be reached or fails raises `StoreError`, whose message never shows a password.
`Store` is the interface, for a store of your own.
"""

from __future__ import annotations

from typing import Final

from .._errors import StoreError, ValidationError
from .._public import publish
from ._base import Store, Subscription, redact_url
from ._memory import MemoryStore
from ._redis import RedisStore
from ._sqlite import SQLiteStore

__all__ = [
    "MemoryStore",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "StoreError",
    "Subscription",
    "as_store",
    "open_store",
]

_FORMS: Final = (
    '"memory://", "sqlite:///relative/path.db", "sqlite:////absolute/path.db", '
    '"redis://[[user]:password@]host[:port][/db]" or "rediss://..." (TLS)'
)


def open_store(url: str) -> Store:
    """The store a URL names: memory://, sqlite:///path (SQLAlchemy's form), redis://.

    `sqlite:///data/hub.db` is relative to the working directory, `sqlite:////var/
    lib/app/hub.db` absolute. Redis URLs are redis-py's (`rediss://` for TLS). Any
    other string raises `ValidationError` naming these forms.
    """
    if not isinstance(url, str):
        raise ValidationError(f"a store URL must be a str, not {type(url).__name__}")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "memory" and url.lower() == "memory://":
        return MemoryStore()
    if scheme == "sqlite" and url[len("sqlite://") :].startswith("/"):
        path = url[len("sqlite:///") :]
        if path and "?" not in path:
            return SQLiteStore(path)
    if scheme in ("redis", "rediss"):
        return RedisStore(url)
    raise ValidationError(f"not a store URL: {redact_url(url)!r}; use {_FORMS}")


def as_store(store: Store | str) -> Store:
    """`store` itself, or the store its URL names (see `open_store`)."""
    if isinstance(store, Store):
        return store
    if isinstance(store, str):
        return open_store(store)
    raise ValidationError(
        f"a store must be a Store or a store URL ({_FORMS}), not {type(store).__name__}"
    )


__dir__ = publish(__name__, globals())
