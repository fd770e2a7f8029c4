"""deepmode_async: the async-first Python SDK for the DeepMode image API.

```python
from deepmode_async import AsyncClient

async with AsyncClient() as dm:  # the key comes from $DEEPMODE_API_KEY
    generation = await dm.images.generate(model_id="...", prompt="a lighthouse at dusk")
    paths = await dm.images.download(generation, "out/")
```

`Client` is the same API, blocking, for scripts, notebooks and threads.
`deepmode_async.testing.MockDeepMode` is a faithful mock of the whole API for tests.
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
    CallbackTimeoutError,
    ConflictError,
    DeepModeError,
    DownloadError,
    InsufficientCreditsError,
    InternalServerError,
    NotFoundError,
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
from ._sync import Client
from ._transport import Timeout
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
from .batch import BatchProgress, BatchResult, GenerateRequest

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "Accepted",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Balance",
    "BatchProgress",
    "BatchResult",
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
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProgressCallbackError",
    "RateLimitError",
    "Ratio",
    "RemixMode",
    "RemixResult",
    "RequestInfo",
    "ResponseValidationError",
    "StoreError",
    "Timeout",
    "UnprocessableEntityError",
    "UploadProgress",
    "ValidationError",
    "__version__",
]
