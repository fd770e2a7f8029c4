"""What a README fragment (`<!-- fragment: names=... -->`) may ask for: see test_readme.py."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI

from deepmode_async import AsyncClient, GenerateRequest
from deepmode_async.callbacks import CallbackHub


@contextlib.asynccontextmanager
async def provide(names: Sequence[str]) -> AsyncIterator[dict[str, Any]]:
    """`dm` (a client of the mock in the environment), `model` (a model trained on it),
    `requests` (three `GenerateRequest`s for it), `photos` (paths), `app` (a FastAPI app)."""
    async with AsyncClient() as dm:
        given: dict[str, Any] = {"dm": dm, "app": FastAPI()}
        given["photos"] = ["me-1.jpg", "me-2.png"]
        if "model" in names or "requests" in names:
            given["model"] = await _train(dm)
            given["requests"] = [
                GenerateRequest(model_id=given["model"].id, prompt=prompt)
                for prompt in ("a lighthouse", "a fox", "a cabin")
            ]
        yield {name: given[name] for name in names}


async def _train(dm: AsyncClient) -> Any:
    """A model trained on the mock, its id received through a hub on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hub = CallbackHub(f"http://127.0.0.1:{port}")
    async with hub.serve(port=port):
        return await dm.models.create(
            images=["me-1.jpg"], gender="woman", model_type="amateur", callback=hub
        )
