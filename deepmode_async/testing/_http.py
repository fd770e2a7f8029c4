"""Plumbing shared by the mock's two hosts: problems, faults and bounded body reading."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Literal

import aiohttp
import attrs
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .._formats import SNIFF_BYTES, sniff_image_format
from ._records import RecordedRequest, UploadedFile

CHUNK: Final = 256 * 1024
MAX_TEXT_FIELD: Final = 64 * 1024
MAX_PARTS: Final = 100

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(Exception):
    """An error answer: FastAPI's `{"detail": ...}` on the API, Azure's XML on the image host."""

    def __init__(
        self, status: int, detail: Any, *, code: str = "", headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail
        self.code = code  # Azure error code, used by the image host only
        self.headers = dict(headers or {})


def field_error(loc: str | int, type_: str, msg: str, value: Any = None) -> dict[str, Any]:
    """One item of a FastAPI 422 `detail` list."""
    return {"type": type_, "loc": ["body", loc], "msg": msg, "input": value}


@attrs.frozen
class Fault:
    """A misbehaviour for one call of an endpoint, queued (see `MockDeepMode.fail` & co) or
    dealt at random (`MockDeepMode.chaos`).

    `delay` is waited before anything else happens (chaos's random latency); `dealt` marks
    a fault dealt by chaos, which is never queued, so it is not put back for a later call.
    """

    kind: Literal["status", "drop", "stall", "truncate"]
    status: int = 500
    detail: Any = None
    body: bytes | None = None
    content_type: str = "application/json"
    retry_after: str | None = None
    after_processing: bool = False
    seconds: float = 0.0
    after_bytes: int | None = None
    delay: float = 0.0
    dealt: bool = False

    def response(self) -> web.Response:
        """The answer of a `status` fault: the given body, or `{"detail": ...}`."""
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
        if self.body is not None:
            return web.Response(
                status=self.status, body=self.body, headers=headers, content_type=self.content_type
            )
        detail = self.detail if self.detail is not None else f"Injected fault {self.status}"
        return web.json_response({"detail": detail}, status=self.status, headers=headers)


async def misbehave_before(fault: Fault | None, request: web.Request) -> web.Response | None:
    """Carry out what `fault` does before a call is processed; a response ends the call."""
    if fault is None:
        return None
    if fault.delay > 0:
        await asyncio.sleep(fault.delay)
    if fault.kind == "status":
        return fault.response()
    if fault.after_processing:
        return None
    if fault.kind == "drop":
        return drop_connection(request)
    if fault.kind == "stall" and fault.after_bytes is None:
        await asyncio.sleep(fault.seconds)
    return None


#: Set on a request whose connection the mock closed on purpose (a fault).
_DROPPED: Final = web.RequestKey("dropped", bool)


def drop_connection(request: web.Request) -> web.Response:
    """Close the connection without an answer; the returned response is never sent."""
    request[_DROPPED] = True
    if request.transport is not None:
        request.transport.close()
    return web.Response()


def note_answer(
    record: RecordedRequest, request: web.Request, response: web.StreamResponse
) -> None:
    """Record the status sent; or, when the connection is gone, that the client hung up
    (unless the mock dropped it on purpose)."""
    if request.transport is not None and not request.transport.is_closing():
        record.status = response.status
    elif not request.get(_DROPPED, False):
        record.disconnected = True


def format_retry_after(value: float | str | None) -> str | None:
    """`Retry-After` as a header value: seconds (a whole number when it is one) or a date."""
    if value is None or isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


async def read_json_object(request: web.Request, record: RecordedRequest) -> Any:
    """Parse a JSON object body as FastAPI would, answering 415/422 for bad ones.

    Bodies over the application's `client_max_size` get aiohttp's 413.
    """
    if request.content_type != "application/json":
        raise Problem(415, "Content-Type must be application/json")
    try:
        raw = await request.read()
    except web.RequestPayloadError as exc:  # e.g. a Content-Encoding the body does not have
        raise Problem(400, f"Malformed body: {exc}") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd nesting
        raise Problem(422, [field_error(0, "json_invalid", f"JSON decode error: {exc}")]) from None
    record.json = data
    if not isinstance(data, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        raise Problem(422, [field_error(0, "model_attributes_type", msg, data)])
    return data


@attrs.define
class Form:
    """A streamed multipart body: its text fields and the files of `file_fields`."""

    fields: dict[str, str] = attrs.Factory(dict)
    files: dict[str, list[UploadedFile]] = attrs.Factory(dict)


async def read_form(
    request: web.Request, record: RecordedRequest, file_fields: frozenset[str], limit: int
) -> Form:
    """Stream a multipart body part by part, keeping only what validation needs.

    File contents are counted and sniffed, never held, so a 600 MB training upload
    costs the mock a few kilobytes.
    """
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, f"Request body is larger than {limit} bytes")
    form = Form()
    total = 0
    try:
        reader = await request.multipart()
        for _ in range(MAX_PARTS + 1):
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, aiohttp.BodyPartReader) or part.name is None:
                raise Problem(422, [field_error(0, "multipart", "Nested or unnamed form parts")])
            is_file = part.name in file_fields
            kept, size = bytearray(), 0
            while chunk := await part.read_chunk(CHUNK):
                size += len(chunk)
                total += len(chunk)
                if total > limit:
                    raise Problem(413, f"Request body is larger than {limit} bytes")
                if is_file:
                    kept += chunk[: max(0, SNIFF_BYTES - len(kept))]
                elif size > MAX_TEXT_FIELD:
                    raise Problem(413, f"Form field {part.name!r} exceeds {MAX_TEXT_FIELD} bytes")
                else:
                    kept += chunk
            if is_file:
                if part.filename is None:
                    msg = "Expected UploadFile, received: <class 'str'>"
                    raise Problem(422, [field_error(part.name, "value_error", msg)])
                upload = UploadedFile(
                    field=part.name,
                    filename=part.filename,
                    content_type=part.headers.get("Content-Type"),
                    size=size,
                    format=sniff_image_format(bytes(kept)),
                )
                form.files.setdefault(part.name, []).append(upload)
                record.files.append(upload)
            else:
                form.fields[part.name] = record.form[part.name] = kept.decode()
        else:
            raise Problem(413, f"More than {MAX_PARTS} form parts")
    except (
        ValueError,
        AssertionError,
        HttpProcessingError,
        aiohttp.ClientPayloadError,
        web.RequestPayloadError,
        # Warnings, raised as errors when a test suite runs with `-W error`:
        aiohttp.BadContentDispositionHeader,
        aiohttp.BadContentDispositionParam,
    ) as exc:
        # Malformed multipart (no boundary, broken headers, bad UTF-8) is the sender's fault.
        raise Problem(400, f"Malformed multipart body: {exc}") from None
    return form
