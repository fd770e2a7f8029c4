"""Public names look public: classes report the module users import them from, `dir()`
shows the public names only, and pickles round-trip through the public module."""

from __future__ import annotations

import importlib
import pickle
import traceback

import pytest

import deepmode_async
from deepmode_async import Balance, GenerateRequest, NotFoundError, RequestInfo, Timeout
from deepmode_async._errors import status_error

PUBLIC = ["deepmode_async", "deepmode_async.callbacks", "deepmode_async.stores"]
PUBLIC += ["deepmode_async.testing", "deepmode_async.prep"]


@pytest.mark.parametrize("name", PUBLIC)
def test_exported_classes_name_their_public_module(name: str) -> None:
    module = importlib.import_module(name)
    classes = [getattr(module, n) for n in module.__all__ if isinstance(getattr(module, n), type)]
    assert classes
    for cls in classes:
        # Exported by the package as well as a submodule: the package names it.
        expected = "deepmode_async" if cls.__name__ in deepmode_async.__all__ else name
        assert cls.__module__ == expected, cls
        assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls


@pytest.mark.parametrize("name", PUBLIC)
def test_dir_shows_public_names_only(name: str) -> None:
    module = importlib.import_module(name)
    for submodule in ("batch", "callbacks", "cli", "prep", "resources", "stores", "testing"):
        # dir() lists the public submodules imported so far: import them all, whatever
        # other tests of this process imported before.
        importlib.import_module(f"deepmode_async.{submodule}")
    stray = [n for n in dir(module) if n not in module.__all__]
    assert "annotations" not in dir(module)
    assert all(not n.startswith("_") for n in dir(module) if n != "__version__")
    if name == "deepmode_async":
        assert stray == ["batch", "callbacks", "cli", "prep", "resources", "stores", "testing"]
    else:
        assert stray == []


def test_an_error_shows_and_pickles_as_public() -> None:
    error = status_error(
        RequestInfo("GET", "https://api.example/api/images/x"),
        404,
        b'{"detail": "Image not found"}',
        {"X-Request-Id": "req-1"},
    )
    assert isinstance(error, NotFoundError)
    shown = "".join(traceback.format_exception_only(error))
    assert shown.startswith("deepmode_async.NotFoundError: ")
    again = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert type(again) is NotFoundError
    assert str(again) == str(error)
    assert (again.status_code, again.detail, again.request_id) == (404, "Image not found", "req-1")


@pytest.mark.parametrize(
    "value",
    [Timeout(read=3.0), Balance(remaining_balance=5), GenerateRequest(model_id="m", prompt="p")],
)
def test_values_pickle_through_the_public_module(value: object) -> None:
    data = pickle.dumps(value)
    assert pickle.loads(data) == value  # noqa: S301 - our own bytes
    assert b"deepmode_async._" not in data
