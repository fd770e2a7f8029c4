"""DeepMode behind a FastAPI app: one shared client, callback mode awaited through a hub.

Run it with

    DEEPMODE_API_KEY=... PUBLIC_URL=https://myapp.example.com \\
        uvicorn examples.fastapi_app:app

and try `POST /generate` with `{"model_id": "...", "prompt": "a lighthouse at dusk"}`,
or `POST /train` with `{"name": "me", "gender": "woman", "image_urls": ["https://..."]}`
(answered at once; the model id is logged when training is done, hours later).

Environment:
    DEEPMODE_API_KEY   your API key (read when the app starts, not when it is imported).
    DEEPMODE_BASE_URL  another API host, e.g. a `python -m deepmode_async.testing` mock.
    PUBLIC_URL         where the DeepMode API can reach this app (default
                       http://127.0.0.1:8000). Results are POSTed to
                       PUBLIC_URL/deepmode-callbacks/<token>, so in production this must be
                       reachable from the internet: your domain, or a tunnel in development.
    DEEPMODE_HUB_STORE where the hub keeps deliveries (default memory://, this process).
                       With `uvicorn --workers N` use one every worker shares:
                       sqlite:///deepmode-hub.db on one machine, redis://host:6379/0 for
                       several; a delivery to any worker then wakes the one that waits, and
                       results outlive a restart (the startup log lists those not yet
                       handed out, model ids included).

`create_app(Settings(...))` builds the app with explicit settings, for tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from deepmode_async import (
    AsyncClient,
    CallbackTimeoutError,
    DeepModeError,
    GenerateRequest,
    Image,
    InsufficientCreditsError,
    Model,
    NotFoundError,
    StoreError,
    ValidationError,
)
from deepmode_async.callbacks import CallbackHub, PendingCallback

log = logging.getLogger(__name__)

CALLBACK_PATH = "/deepmode-callbacks"


@dataclass(frozen=True)
class Settings:
    """What the app needs to know. `None` key and base URL: `AsyncClient`'s environment
    defaults (DEEPMODE_API_KEY, DEEPMODE_BASE_URL)."""

    public_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    base_url: str | None = None
    # An HTTP caller will not wait hours; the hub's default ttl is sized for model training.
    callback_timeout: float = 120.0
    # Training takes minutes to hours: its callback is awaited this long.
    training_ttl: float = 6 * 3600.0
    batch_concurrency: int = 4
    hub_store: str = "memory://"

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            public_url=os.environ.get("PUBLIC_URL", cls.public_url),
            hub_store=os.environ.get("DEEPMODE_HUB_STORE", cls.hub_store),
        )


# ----------------------------------------------------------------------------- schemas


class GenerateBody(BaseModel):
    # No ranges here: the SDK checks every argument before sending anything, and its
    # ValidationError becomes a 422 below, so the rules live in one place.
    model_id: str
    prompt: str
    num_images: int = 1


class BatchBody(BaseModel):
    # Bounded so that one HTTP call cannot spend an unbounded number of credits.
    requests: list[GenerateBody] = Field(min_length=1, max_length=50)


class TrainBody(BaseModel):
    name: str
    gender: str
    model_type: str = "amateur"
    image_urls: list[str] = Field(min_length=1, max_length=30)


class TrainOut(BaseModel):
    status: str
    expires_at: str  # when the hub stops waiting for the training result


class ImageOut(BaseModel):
    id: str
    url: str


class GenerateOut(BaseModel):
    images: list[ImageOut]


class BatchItemOut(BaseModel):
    index: int
    ok: bool
    images: list[ImageOut] = Field(default_factory=list)
    status: int | None = None  # the HTTP status this item would have had on its own
    error: str | None = None


class BatchOut(BaseModel):
    results: list[BatchItemOut]


def image_out(image: Image) -> ImageOut:
    # The URL is signed and expires after an hour: hand it out, do not store it.
    return ImageOut(id=image.id, url=image.image_url)


# ----------------------------------------------------------------------------- errors


def http_error(error: DeepModeError) -> tuple[int, str]:
    """The status and message a caller of this app gets for an SDK error."""
    if isinstance(error, ValidationError):
        return 422, str(error)
    if isinstance(error, NotFoundError):
        return 404, error.detail
    if isinstance(error, InsufficientCreditsError):
        return 402, error.detail
    if isinstance(error, CallbackTimeoutError):
        return 504, "the image service did not deliver the result in time"
    # Anything else is our upstream failing (or refusing our key): a bad gateway, not
    # the caller's fault. Its details stay in the log; they may name internal hosts.
    log.error("DeepMode call failed: %s", error)
    return 502, "the image service failed"


async def deepmode_error(request: Request, error: DeepModeError) -> JSONResponse:
    status, detail = http_error(error)
    return JSONResponse({"detail": detail}, status_code=status)


# ----------------------------------------------------------------------------- the app


def deepmode(request: Request) -> AsyncClient:
    """The client the lifespan opened (a FastAPI dependency)."""
    client: AsyncClient = request.state.deepmode
    return client


DeepMode = Annotated[AsyncClient, Depends(deepmode)]


async def report_outstanding(hub: CallbackHub) -> None:
    """Log the results in the hub's store whose waiter is gone (a restart, a killed
    worker): a trained model's id reaches an app only through its callback, and the API
    cannot list models, so this is where an app finds it again."""
    try:
        found = await hub.outstanding()
    except StoreError as error:  # the app still serves; deliveries get 503 until it is back
        log.warning("cannot list outstanding callbacks: %s", error)
        return
    for pending in found:
        if pending.kind == "model" and pending.done:
            model: Model = await pending.wait()  # at once: it has arrived
            log.warning("model %s (%s) finished training while no one waited", model.id, model.name)
        elif pending.kind == "model":  # still training: wait for it here, in this worker
            keep(asyncio.create_task(record_model(pending)))
        else:
            log.info("outstanding %s callback, expires %s", pending.kind, pending.expires_at)


async def record_model(pending: PendingCallback[Model]) -> None:
    """Wait for a training result and record its model id (a real app would save it in
    its database). If this worker dies first, the next startup finds it."""
    try:
        model = await pending.wait()
    except DeepModeError as error:  # expired or discarded: nothing was handed out
        log.error("training result not received: %s", error)
        return
    log.warning("model %s (%s) trained", model.id, model.name)


_background: set[asyncio.Task[None]] = set()


def keep(task: asyncio.Task[None]) -> None:
    """Hold a background task until it ends (the loop keeps only weak references)."""
    _background.add(task)
    task.add_done_callback(_background.discard)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    # Shared by every worker through the store; opening it connects to nothing yet.
    hub = CallbackHub(
        settings.public_url.rstrip("/") + CALLBACK_PATH,
        store=settings.hub_store,
        ttl=settings.callback_timeout,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, AsyncClient]]:
        await report_outstanding(hub)
        # Created here, not at import: importing the module needs no key, and the
        # client's connection pool belongs to the server's event loop. One client for
        # all requests, so connections are reused.
        async with AsyncClient(settings.api_key, base_url=settings.base_url) as client:
            yield {"deepmode": client}

    app = FastAPI(
        title="DeepMode example",
        lifespan=lifespan,
        exception_handlers={DeepModeError: deepmode_error},
    )
    # The URL the hub hands out must lead here: PUBLIC_URL + this same path.
    app.mount(CALLBACK_PATH, hub.asgi_app())

    @app.post("/generate")
    async def generate(body: GenerateBody, dm: DeepMode) -> GenerateOut:
        # Callback mode: the API answers at once and POSTs the images to the hub, so no
        # connection to DeepMode stays open while they render.
        generation = await dm.images.generate(
            model_id=body.model_id,
            prompt=body.prompt,
            num_images=body.num_images,
            callback=hub,
        )
        return GenerateOut(images=[image_out(image) for image in generation.images])

    @app.post("/train", status_code=202)
    async def train(body: TrainBody, dm: DeepMode) -> TrainOut:
        # Not `callback=hub`: no HTTP caller waits hours. The expectation is in the store
        # before any credit is spent, so whichever worker or restart is alive when the
        # result arrives has it; this worker waits for it in the background.
        pending = hub.expect("model", ttl=settings.training_ttl)
        await pending.saved()
        await dm.models.create(
            image_urls=body.image_urls,
            gender=body.gender,
            model_type=body.model_type,
            name=body.name,
            callback=pending.url,
        )
        keep(asyncio.create_task(record_model(pending)))
        return TrainOut(status="training", expires_at=pending.expires_at.isoformat())

    @app.post("/generate-batch")
    async def generate_batch(body: BatchBody, dm: DeepMode) -> BatchOut:
        # Built up front: an invalid item fails the whole call with 422 before any
        # credit is spent, instead of after the valid ones went out.
        requests = [
            GenerateRequest(model_id=item.model_id, prompt=item.prompt, num_images=item.num_images)
            for item in body.requests
        ]
        results: list[BatchItemOut] = []
        async for result in dm.images.generate_many(
            requests, concurrency=settings.batch_concurrency
        ):
            if result.error is not None:
                status, detail = http_error(result.error)
                item = BatchItemOut(index=result.index, ok=False, status=status, error=detail)
            else:
                assert result.generation is not None  # without download_to, success has one
                images = [image_out(image) for image in result.generation.images]
                item = BatchItemOut(index=result.index, ok=True, images=images)
            results.append(item)
        # Results arrive as they complete; callers expect their own order.
        results.sort(key=lambda item: item.index)
        return BatchOut(results=results)

    return app


app = create_app()
