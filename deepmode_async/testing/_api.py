"""The eight endpoints of the DeepMode API, with every documented rule enforced."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web

from .._formats import ACCEPTED_FORMATS
from .._types import Gender, ModelType, Ratio, RemixMode
from ._faults import Faults
from ._http import (
    Handler,
    Problem,
    drop_connection,
    field_error,
    misbehave_before,
    note_answer,
    read_form,
    read_json_object,
)
from ._records import (
    MODEL_LIFETIME,
    CallbackKind,
    Endpoint,
    RecordedRequest,
    UploadedFile,
    iso,
)
from ._state import MockState
from ._work import Work

MAX_TRAINING_IMAGES: Final = 30
MAX_NUM_IMAGES: Final = 8
RECORD: Final = web.RequestKey("record", RecordedRequest)


class Fields:
    """Reads the fields of a JSON object or a form, collecting FastAPI-style 422 errors."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.errors: list[dict[str, Any]] = []

    def text(
        self,
        name: str,
        *,
        required: bool = False,
        default: str | None = None,
        choices: type[Gender | ModelType | Ratio | RemixMode] | None = None,
        url: bool = False,
        non_empty: bool = False,
    ) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                self.errors.append(field_error(name, "missing", "Field required"))
            return default
        if not isinstance(value, str):
            self.errors.append(field_error(name, "string_type", "Input should be a string", value))
        elif non_empty and not value.strip():
            msg = "String should have at least 1 character"
            self.errors.append(field_error(name, "string_too_short", msg, value))
        elif choices is not None and value not in set(choices):
            allowed = " or ".join(f"'{choice}'" for choice in choices)
            self.errors.append(field_error(name, "enum", f"Input should be {allowed}", value))
        elif url and not is_http_url(value):
            msg = "Input should be an absolute http or https URL"
            self.errors.append(field_error(name, "url_parsing", msg, value))
        else:
            return value
        return default

    def required(
        self,
        name: str,
        *,
        choices: type[Gender | ModelType | Ratio | RemixMode] | None = None,
        non_empty: bool = False,
    ) -> str:
        """A required text field ("" when it is wrong: `check` then answers 422)."""
        return self.text(name, required=True, choices=choices, non_empty=non_empty) or ""

    def integer(self, name: str, *, default: int, low: int, high: int) -> int:
        value = self.data.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            self.errors.append(field_error(name, "int_type", "Input should be an integer", value))
        elif not low <= value <= high:
            msg = f"Input should be between {low} and {high}"
            self.errors.append(field_error(name, "range", msg, value))
        else:
            return value
        return default

    def boolean(self, name: str, *, default: bool) -> bool:
        value = self.data.get(name, default)
        if isinstance(value, bool):
            return value
        self.errors.append(field_error(name, "bool_type", "Input should be a boolean", value))
        return default

    def url_list(self, name: str) -> list[str]:
        value = self.data.get(name)
        if value is None:
            self.errors.append(field_error(name, "missing", "Field required"))
            return []
        if not isinstance(value, list):
            self.errors.append(
                field_error(name, "list_type", "Input should be a valid list", value)
            )
            return []
        if not 1 <= len(value) <= MAX_TRAINING_IMAGES:
            msg = f"List should have 1 to {MAX_TRAINING_IMAGES} items, not {len(value)}"
            self.errors.append(field_error(name, "too_long" if value else "too_short", msg))
        for index, item in enumerate(value):
            if not isinstance(item, str) or not is_http_url(item):
                msg = "Input should be an absolute http or https URL"
                self.errors.append(
                    {**field_error(name, "url_parsing", msg, item), "loc": ["body", name, index]}
                )
        return value

    def check(self, extra: list[dict[str, Any]] | None = None) -> None:
        """Answer 422 with every problem found so far."""
        if self.errors or extra:
            raise Problem(422, self.errors + (extra or []))


def is_http_url(value: str) -> bool:
    """True for an absolute http(s) URL with a host, as the API needs for callbacks and images."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def authenticate(request: web.Request, api_key: str) -> None:
    """Answer 401 unless the request carries `Bearer <api_key>`."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "Not authenticated", headers={"WWW-Authenticate": "Bearer"})
    # aiohttp decodes headers with surrogateescape: encode back the same way.
    sent = token.encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(sent, api_key.encode()):
        raise Problem(401, "Invalid API key", headers={"WWW-Authenticate": "Bearer"})


def check_images(files: list[UploadedFile], field: str, *, low: int, high: int) -> None:
    """The count (422) and the content (400) of the uploaded images of one field."""
    if not files:
        raise Problem(422, [field_error(field, "missing", "Field required")])
    if not low <= len(files) <= high:
        msg = f"List should have {low} to {high} items, not {len(files)}"
        raise Problem(422, [field_error(field, "too_long", msg)])
    for index, upload in enumerate(files, 1):
        if upload.format is None:
            raise Problem(
                400,
                f"Image {index} ({upload.filename!r}, {upload.size} bytes) is not a valid image: "
                f"accepted formats are {ACCEPTED_FORMATS}",
            )


class DeepModeApi:
    """The API host: one aiohttp handler per endpoint, over the mock's state, faults and work.

    Its settings are read as each call comes (`max_json_size` when `app` is made).
    """

    def __init__(
        self,
        state: MockState,
        faults: Faults,
        work: Work,
        *,
        api_key: str,
        fetch_image_urls: bool,
        max_upload_size: int,
        max_json_size: int,
    ) -> None:
        self.state = state
        self.faults = faults
        self.work = work
        self.api_key = api_key
        self.fetch_image_urls = fetch_image_urls
        self.max_upload_size = max_upload_size
        self.max_json_size = max_json_size

    def app(self) -> web.Application:
        """A new aiohttp application serving the eight endpoints."""
        app = web.Application(middlewares=[self.middleware], client_max_size=self.max_json_size)
        routes = [
            ("POST", "/api/models", "create_model", self.create_model),
            ("POST", "/api/models/{model_id}/extend", "extend_model", self.extend_model),
            ("POST", "/api/images/generate", "generate", self.generate),
            ("GET", "/api/images/{image_id}", "retrieve_image", self.retrieve_image),
            ("POST", "/api/images/upscale", "upscale", self.upscale),
            ("POST", "/api/remix/generate", "remix", self.remix),
            ("POST", "/api/face-id-remix", "face_id_remix", self.face_id_remix),
            ("GET", "/api/check-balance", "balance", self.balance),
        ]
        for method, path, name, handler in routes:
            app.router.add_route(method, path, handler, name=name)
        return app

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record, misbehave on demand, rate-limit, authenticate, then answer or explain."""
        record = self.state.record(request)
        request[RECORD] = record
        self.state.enter()
        try:
            response = await self._answer(request, handler, record)
        except (asyncio.CancelledError, ConnectionError):  # the client hung up
            record.disconnected = True
            raise
        finally:
            self.state.leave()
        response.headers["x-request-id"] = record.request_id
        note_answer(record, request, response)
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, record: RecordedRequest
    ) -> web.StreamResponse:
        fault = self.faults.take(record.endpoint)
        try:
            if record.endpoint is None:  # aiohttp raises its 404 or 405, answered below
                return await handler(request)
            if (early := await misbehave_before(fault, request)) is not None:
                return early
            self.faults.check_rate_limit(self.state.in_flight)
            authenticate(request, self.api_key)
            try:
                response = await handler(request)
            except Problem:
                if fault is not None and fault.after_processing:
                    self.faults.put_back(record.endpoint, fault)  # meant for a processed call
                raise
            if fault is not None and fault.after_processing and fault.kind == "stall":
                await asyncio.sleep(fault.seconds)
            if fault is not None and fault.after_processing and fault.kind == "drop":
                return drop_connection(request)
            return response
        except Problem as problem:
            return web.json_response(
                {"detail": problem.detail}, status=problem.status, headers=problem.headers
            )
        except web.HTTPException as exc:  # aiohttp's own: unknown route or method, body too large
            headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
            return web.json_response({"detail": exc.reason}, status=exc.status, headers=headers)

    # ----------------------------------------------------------------- endpoints

    async def create_model(self, request: web.Request) -> web.StreamResponse:
        state, record = self.state, request[RECORD]
        if request.content_type == "multipart/form-data":
            form = await read_form(request, record, frozenset({"images"}), self.max_upload_size)
            fields = Fields(form.fields)
            images = form.files.get("images", [])
            image_count = len(images)
        else:
            fields = Fields(await read_json_object(request, record))
            image_count = len(fields.url_list("image_urls"))
        gender = fields.required("gender", choices=Gender)
        model_type = fields.required("model_type", choices=ModelType)
        name = fields.text("name")
        callback = fields.text("callback", url=True)
        fields.check()
        if request.content_type == "multipart/form-data":
            check_images(images, "images", low=1, high=MAX_TRAINING_IMAGES)
        elif self.fetch_image_urls:
            await self.work.fetch_training_urls(fields.data["image_urls"])
        state.charge("create_model", record)
        model = state.add_model(name=name, gender=gender, model_type=model_type, active=False)
        model.image_count = image_count
        self.work.train(model, callback)
        await self.work.simulate("create_model")
        return web.json_response({"message": "Created model successfully"})

    async def extend_model(self, request: web.Request) -> web.StreamResponse:
        model = self.state.find_model(request.match_info["model_id"], trained=False)
        self.state.charge("extend_model", request[RECORD])
        model.expire_at += MODEL_LIFETIME
        await self.work.simulate("extend_model")
        return web.json_response({"updated_expire_at": iso(model.expire_at)})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        state, record = self.state, request[RECORD]
        fields = Fields(await read_json_object(request, record))
        model_id = fields.required("model_id", non_empty=True)
        prompt = fields.required("prompt", non_empty=True)
        negative_prompt = fields.text("negative_prompt")
        num_images = fields.integer("num_images", default=1, low=1, high=MAX_NUM_IMAGES)
        upscale = fields.boolean("upscale", default=False)
        ratio = fields.text("ratio", default=Ratio.PORTRAIT.value, choices=Ratio) or "portrait"
        callback = fields.text("callback", url=True)
        fields.check()
        self.state.find_model(model_id)
        state.charge("generate", record)

        def make_images() -> dict[str, Any]:
            images = [
                state.add_image(model_id, prompt, negative_prompt, upscaled=upscale, ratio=ratio)
                for _ in range(num_images)
            ]
            return {"images": [state.image_json(image) for image in images]}

        return await self._in_mode(
            "generate", "generation", callback, "Generating images...", make_images
        )

    async def retrieve_image(self, request: web.Request) -> web.StreamResponse:
        image = self.state.images.get(request.match_info["image_id"])
        if image is None:
            raise Problem(404, f"Image {request.match_info['image_id']!r} not found")
        await self.work.simulate("retrieve_image")
        return web.json_response(self.state.image_json(image))

    async def upscale(self, request: web.Request) -> web.StreamResponse:
        state, record = self.state, request[RECORD]
        fields = Fields(await read_json_object(request, record))
        image_id = fields.required("image_id", non_empty=True)
        callback = fields.text("callback", url=True)
        fields.check()
        source = state.images.get(image_id)
        if source is None:
            raise Problem(404, f"Image {image_id!r} not found")
        state.charge("upscale", record)

        def make_image() -> dict[str, Any]:
            image = state.add_image(
                source.model_id,
                source.prompt,
                source.negative_prompt,
                upscaled=True,
                ratio=source.ratio,
            )
            return state.image_json(image)

        return await self._in_mode(
            "upscale", "upscale", callback, "Upscaling images...", make_image
        )

    async def _in_mode(
        self,
        endpoint: Endpoint,
        kind: CallbackKind,
        callback: str | None,
        accepted: str,
        make_result: Callable[[], Any],
    ) -> web.StreamResponse:
        """Sync mode answers with the result when the work is done; callback mode answers
        `{"message": accepted}` at once and POSTs the same result to `callback` later."""
        if callback is not None:
            self.work.deliver_later(endpoint, kind, callback, make_result)
            return web.json_response({"message": accepted})
        # The result exists before the simulated work: a client that gives up meanwhile
        # leaves what a slow real server would, a charge and its result.
        result = make_result()
        await self.work.simulate(endpoint)
        return web.json_response(result)

    async def remix(self, request: web.Request) -> web.StreamResponse:
        return await self._remix(request, "remix", ("artwork_image", "mask_image"))

    async def face_id_remix(self, request: web.Request) -> web.StreamResponse:
        images = ("identity_image", "artwork_image", "mask_image")
        return await self._remix(request, "face_id_remix", images)

    async def _remix(
        self, request: web.Request, endpoint: Endpoint, image_fields: tuple[str, ...]
    ) -> web.StreamResponse:
        state, record = self.state, request[RECORD]
        if request.content_type != "multipart/form-data":
            raise Problem(415, "Content-Type must be multipart/form-data")
        form = await read_form(request, record, frozenset(image_fields), self.max_upload_size)
        fields = Fields(form.fields)
        model_id = fields.required("model_id", non_empty=True) if endpoint == "remix" else None
        fields.text("prompt", default="")
        fields.text("negative_prompt", default="")
        mode = fields.text("mode", default=RemixMode.SYNC.value, choices=RemixMode)
        missing = [
            field_error(name, "missing", "Field required")
            for name in image_fields
            if name not in form.files
        ]
        fields.check(missing)
        for name in image_fields:
            check_images(form.files[name], name, low=1, high=1)
        if model_id is not None:
            self.state.find_model(model_id)
        state.charge(endpoint, record)
        # Ready when the work is done; sync mode waits for it, async answers at once.
        remix = state.add_remix(endpoint, model_id, ready_in=self.work.latency.get(endpoint, 0.0))
        if mode == RemixMode.SYNC:
            await self.work.simulate(endpoint)
        return web.json_response(state.remix_json(remix))

    async def balance(self, request: web.Request) -> web.StreamResponse:
        await self.work.simulate("balance")
        return web.json_response({"remaining_balance": self.state.balance})
