"""Callback mode, made awaitable: parse what the API POSTs, and wait for it to arrive.

In callback mode the API answers at once and later POSTs the result (a trained `Model`,
a `Generation`, an upscaled `Image`) to a URL of yours. The parsers turn such a body
into the SDK's data classes. `CallbackHub` hands out unguessable URLs under your app's
public address, receives the POSTs through an aiohttp or ASGI adapter you mount in your
app, and lets code `await` what arrives:

```python
hub = CallbackHub("https://myapp.example.com/deepmode-callbacks")
app.mount("/deepmode-callbacks", hub.asgi_app())        # FastAPI / Starlette
model = await dm.models.create(images=photos, gender="woman",
                               model_type="amateur", callback=hub)  # waits for training
```

The callback URL is the only secret of a delivery (the API signs nothing): its last
segment is a token signed with a key the hub's store keeps, and is never shown in a
repr or a log line.

Inside, from the bottom: `_parsers` (the bodies), `_tokens` (signed tokens),
`_shared` (the records in the store, and where store calls run), `_registry` (this
process's expectations), `_keeper` (`PendingCallback`, and settling it from deliveries
and the store), `_adapters` (serving it from aiohttp or ASGI), `_hub` (`CallbackHub`),
`_serve` (the hub alone on a thread). The resources hold the glue that submits a call
in callback mode and waits for it; the hub knows nothing of them.
"""

from __future__ import annotations

from .._public import publish
from ._adapters import AsgiReceive as Receive
from ._adapters import AsgiSend as Send
from ._adapters import Scope
from ._hub import CallbackHub
from ._keeper import PendingCallback
from ._parsers import (
    CallbackBody,
    CallbackKind,
    parse_generation_callback,
    parse_model_callback,
    parse_upscale_callback,
)
from ._serve import ServedHub, is_loopback

__all__ = [
    "CallbackBody",
    "CallbackHub",
    "CallbackKind",
    "PendingCallback",
    "Receive",
    "Scope",
    "Send",
    "ServedHub",
    "is_loopback",
    "parse_generation_callback",
    "parse_model_callback",
    "parse_upscale_callback",
]

__dir__ = publish(__name__, globals())
