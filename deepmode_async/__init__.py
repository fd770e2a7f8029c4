"""deepmode_async: the async-first Python SDK for the DeepMode image API.

```python
from deepmode_async import AsyncClient

async with AsyncClient() as dm:  # the key comes from $DEEPMODE_API_KEY
    generation = await dm.images.generate(model_id="...", prompt="a lighthouse at dusk")
    paths = await dm.images.download(generation, "out/")
```

`Client` is the same API, blocking, for scripts, notebooks and threads.
`deepmode_async.testing.MockDeepMode` is a faithful mock of the whole API for tests.

Layers, lowest first. A module imports from its own layer and those below, never from
one above, and no import comes back round (tests/test_layering.py checks it):

1. vocabulary: _version, _public, _formats, _errors, _validate, _types, _convert, _encoding
2. values and state between calls: _tasks, _timeout, _requests, stores
3. calls: _raw, _connection, _failures, _retry, _pacing, _shared_backoff, _transport, _uploads,
   _downloads
4. built on requests, not on a client: _journal, batch, callbacks, prep
5. the endpoints: resources
6. the clients and this public face: _client, _sync, __init__
7. the mock server, and the options and loop of the command line: testing, _mock_options, _loop
8. the command line: cli, __main__
"""

from __future__ import annotations

from ._client import AsyncClient
from ._downloads import DownloadProgress
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CallbackNotFoundError,
    CallbackTimeoutError,
    ConflictError,
    DeepModeError,
    DownloadError,
    InsufficientCreditsError,
    InternalServerError,
    NotFoundError,
    OutcomeUnknownError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ProgressCallbackError,
    RateLimitError,
    RequestInfo,
    ResponseValidationError,
    StoreError,
    UnprocessableEntityError,
    ValidationError,
)
from ._public import publish
from ._raw import APIResponse
from ._requests import GenerateRequest
from ._retry import RetryPolicy
from ._sync import Client
from ._timeout import Timeout
from ._types import (
    Accepted,
    Balance,
    Gender,
    Generation,
    Image,
    Model,
    ModelCreated,
    ModelExtension,
    ModelType,
    Ratio,
    RemixMode,
    RemixResult,
)
from ._uploads import UploadProgress
from ._version import __version__
from .batch import BatchDownloaded, BatchFailure, BatchProgress, BatchResult, BatchSuccess

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponse",
    "APIStatusError",
    "APITimeoutError",
    "Accepted",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Balance",
    "BatchDownloaded",
    "BatchFailure",
    "BatchProgress",
    "BatchResult",
    "BatchSuccess",
    "CallbackNotFoundError",
    "CallbackTimeoutError",
    "Client",
    "ConflictError",
    "DeepModeError",
    "DownloadError",
    "DownloadProgress",
    "Gender",
    "GenerateRequest",
    "Generation",
    "Image",
    "InsufficientCreditsError",
    "InternalServerError",
    "Model",
    "ModelCreated",
    "ModelExtension",
    "ModelType",
    "NotFoundError",
    "OutcomeUnknownError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProgressCallbackError",
    "RateLimitError",
    "Ratio",
    "RemixMode",
    "RemixResult",
    "RequestInfo",
    "ResponseValidationError",
    "RetryPolicy",
    "StoreError",
    "Timeout",
    "UnprocessableEntityError",
    "UploadProgress",
    "ValidationError",
    "__version__",
]

__dir__ = publish(__name__, globals())
