"""Test against DeepMode without the network: `MockDeepMode` and its pytest fixtures.

```python
from deepmode_async.testing import MockDeepMode

async with MockDeepMode(balance=100) as mock:
    ...  # call mock.base_url with the key mock.api_key
```

Installing the package also registers a pytest plugin with the fixtures
`deepmode_mock` (a running mock; configure it with `@pytest.mark.deepmode_mock(...)`)
and `deepmode_env` (the same, with `DEEPMODE_API_KEY` and `DEEPMODE_BASE_URL` set).
`mock_process()` runs the mock in an interpreter of its own instead.
"""

from __future__ import annotations

from .._public import publish
from ._mock import MockDeepMode
from ._process import MockProcess, mock_process
from ._records import (
    COSTS,
    ENDPOINTS,
    CallbackDelivery,
    CallbackKind,
    Charge,
    Endpoint,
    MockImage,
    MockModel,
    MockRemix,
    RecordedRequest,
    UploadedFile,
)
from ._samples import SampleFormat, sample_image

__all__ = [
    "COSTS",
    "ENDPOINTS",
    "CallbackDelivery",
    "CallbackKind",
    "Charge",
    "Endpoint",
    "MockDeepMode",
    "MockImage",
    "MockModel",
    "MockProcess",
    "MockRemix",
    "RecordedRequest",
    "SampleFormat",
    "UploadedFile",
    "mock_process",
    "sample_image",
]

__dir__ = publish(__name__, globals())
