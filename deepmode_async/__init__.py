"""deepmode_async: the async-first Python SDK for the DeepMode image API.

The client arrives in a later release; this one ships the API's enums and
`deepmode_async.testing.MockDeepMode`, a faithful mock of the whole API.
"""

from __future__ import annotations

from ._types import Gender, ModelType, Ratio, RemixMode

__version__ = "0.1.0.dev0"

__all__ = ["Gender", "ModelType", "Ratio", "RemixMode", "__version__"]
