"""Hostile input: whatever a server answers, whatever is POSTed to a callback hub, whatever
a `file_name` says and whatever a caller passes, the SDK gives a typed result or a typed
`DeepModeError` (never another exception) and writes nowhere but into `dest`.

1. Server answers. A raw aiohttp server on loopback (not the mock) answers each hypothesis
   example with the status, headers and body the example says, and every public call
   that makes a request is driven against it; a raw TCP server does the same with any
   bytes as the whole HTTP answer.
2. Callback bodies. Any body, with any framing, POSTed to a `CallbackHub` over HTTP
   (aiohttp and ASGI adapters) gets a 2xx or 4xx answer, and a waiter gets the result or
   keeps waiting.
3. File names. Any `file_name` downloads into `dest` and nowhere else.
4. Arguments. Any value for any parameter is a `ValidationError` raised before any byte
   is sent (no request, no charge), or the call works against the mock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import io
import itertools
import json
import math
import os
import pathlib
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Final, TypeVar

import aiohttp
import attrs
import pytest
from _support import leftovers
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_callbacks import bound_socket, serve_aiohttp, serve_uvicorn

from deepmode_async import (
    Accepted,
    APIStatusError,
    AsyncClient,
    Balance,
    BatchResult,
    CallbackTimeoutError,
    Client,
    DeepModeError,
    DownloadError,
    Gender,
    GenerateRequest,
    Generation,
    Image,
    Model,
    ModelCreated,
    ModelExtension,
    ModelType,
    RateLimitError,
    Ratio,
    RemixMode,
    RemixResult,
    RetryPolicy,
    Timeout,
    ValidationError,
)
from deepmode_async._downloads import safe_file_name
from deepmode_async.callbacks import (
    CallbackHub,
    parse_generation_callback,
    parse_model_callback,
    parse_upscale_callback,
)
from deepmode_async.testing import MockDeepMode, sample_image

pytestmark = pytest.mark.anyio

T = TypeVar("T")

KEY: Final = "sk-hostile-5f1e0c9a7b3d"
JPEG: Final = sample_image("jpeg")
PNG: Final = sample_image("png")
HUB_BODY_LIMIT: Final = 2048  # the hubs' max_body_size
BLOB: Final = "@BLOB@"  # replaced by the raw server's URL in every body it sends

# Hypothesis shares the async fixtures (servers, clients) between the examples of a test:
# starting a server per example would cost more than the examples.
SHARED: Final = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def fuzz(max_examples: int) -> Callable[[Any], Any]:
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=SHARED)


# ============================================================== answers the server can give

IMAGE_DOC: Final[dict[str, Any]] = {
    "id": "img-1",
    "file_name": "120e453f-3a73-4016-ad6a-5cd5e00ddd45.jpeg",
    "model_id": "b8a9f7e5d1c3a2f91e3d5",
    "image_url": f"{BLOB}/blob/img-1?st=2024-04-29T14%3A28%3A02Z&sp=r&sig=N%2Fa%3D",
    "prompt": "A beautiful landscape with mountains and a river.",
    "negative_prompt": "rainy, foggy",
    "upscaled": True,
    "ratio": "portrait",
}
MODEL_DOC: Final[dict[str, Any]] = {
    "id": "c6b8a9f7e5d1c3a2f91e3",
    "name": "My model",
    "gender": "woman",
    "active": True,
    "created_at": "2024-04-01T12:00:00Z",
    "expire_at": "2024-05-01T12:00:00Z",
}
REMIX_DOC: Final[dict[str, Any]] = {
    "id": "668f1a2bdb4c27d16052c82b",
    "file_name": "a62a9740.jpeg",
    "status": "completed",
    "created_at": "2024-07-10T23:32:59.210000Z",
    "image_url": f"{BLOB}/blob/remix?st=2024&sig=x%3D",
}
GENERATION_DOC: Final[dict[str, Any]] = {
    "images": [
        IMAGE_DOC,
        {**IMAGE_DOC, "id": "img-2", "image_url": f"{BLOB}/blob/img-2?sig=y"},
    ]
}
DOCUMENTED: Final[dict[str, dict[str, Any]]] = {
    "balance": {"remaining_balance": 4234},
    "message": {"message": "Generating images..."},
    "extension": {"updated_expire_at": "2024-05-01T12:00:00Z"},
    "image": IMAGE_DOC,
    "generation": GENERATION_DOC,
    "remix": REMIX_DOC,
    "model": MODEL_DOC,
    "error": {"detail": "Not enough credits"},
    "fastapi": {"detail": [{"loc": ["body", "prompt"], "msg": "too short", "type": "x"}]},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@attrs.frozen
class Deep:
    """A value nested `depth` arrays deep, written into the JSON text as is (json.dumps
    cannot write it)."""

    depth: int


def encode(value: Any) -> bytes:
    """JSON bytes of `value`, with each `Deep` written as that many nested arrays."""
    deep: dict[str, int] = {}

    def default(item: object) -> str:
        if isinstance(item, Deep):
            marker = f"@DEEP{len(deep)}@"
            deep[marker] = item.depth
            return marker
        raise TypeError(type(item).__name__)

    text = json.dumps(value, default=default)
    for marker, depth in deep.items():
        text = text.replace(f'"{marker}"', "[" * depth + "]" * depth)
    return text.encode()


WRONG = st.one_of(
    st.sampled_from(
        [
            None,
            "",
            "5",
            5,
            -1,
            0,
            10**30,
            -(10**30),
            1e308,
            math.inf,
            math.nan,
            True,
            False,
            [],
            {},
            "2024-13-45T99:99:99Z",
            "0001-01-01T00:00:00-23:59",
            "9999-12-31T23:59:59+23:59",
            "not a date",
            "\x00",
            "x" * 5000,
        ]
    ),
    st.sampled_from([3, 900, 5000]).map(Deep),
    json_values,
)
_DROP: Final = object()


def shaped(template: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """`template` with each field kept, dropped or replaced by a wrong value, plus extras."""
    fields = {key: st.just(value) | st.just(_DROP) | WRONG for key, value in template.items()}
    return st.fixed_dictionaries(fields, optional={"unexpected": WRONG}).map(
        lambda drawn: {k: v for k, v in drawn.items() if v is not _DROP}
    )


shaped_generation = st.fixed_dictionaries(
    {"images": st.lists(shaped(IMAGE_DOC), max_size=3) | WRONG}
)
ODD_BODIES: Final = [
    b"",
    b" ",
    b"null",
    b"1" * 5000,  # more digits than int() takes
    b"1e999999",
    b"NaN",
    b"\xef\xbb\xbf{}",  # a byte order mark
    b'{"remaining_balance": 1}\x00',
    b'{"remaining_balance": 1}{"remaining_balance": 2}',
    b"\xff\xfe{\x00}\x00",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"images": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"detail": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
    b"<html><title>\xff\xfe</title>",
    gzip.compress(b'{"remaining_balance": 3}'),
]
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(encode),
    st.sampled_from(list(DOCUMENTED.values())).map(encode),
    st.sampled_from([IMAGE_DOC, MODEL_DOC, REMIX_DOC, *DOCUMENTED.values()])
    .flatmap(shaped)
    .map(encode),
    shaped_generation.map(encode),
    st.sampled_from(ODD_BODIES),
)

STATUSES = st.one_of(
    st.just(200),
    st.sampled_from(
        [200, 201, 202, 204, 400, 401, 402, 403, 404, 409, 413, 422, 429, 500, 502, 503, 504]
    ),
    st.integers(200, 599),
)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=ebcdic-junk",
        "application/problem+json",
        "text/html",
        "text/plain",
        "multipart/form-data; boundary=x",
        "garbage",
        "/",
    ]
)
# What aiohttp lets a server write into a header value: no control characters.
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    | st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF),
    max_size=40,
)
RETRY_AFTERS = st.one_of(
    st.sampled_from(
        [
            "0",
            "0.001",
            "-1",
            "1e400",
            "nan",
            "inf",
            "-inf",
            "",
            " ",
            "120",
            "999999999999",
            "0x10",
            "1_000",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Mon, 01 Jan 0100 00:00:00 +2359",
            "Thu, 32 Foo 2024 99:99:99 XYZ",
        ]
    ),
    header_text,
    st.floats().map(str),
    st.integers().map(str),
)
ENCODINGS = st.sampled_from(["gzip", "deflate", "br", "zstd", "identity", "x-junk", "gzip, br"])
EXTRA_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "Retry-After": RETRY_AFTERS,
        "Location": st.sampled_from(["https://evil.example/steal", "//evil.example", "/x"])
        | header_text,
        "X-Request-Id": header_text,
        "Content-Encoding": ENCODINGS,
        "Set-Cookie": st.just("session=stolen; Path=/"),
    },
)


@attrs.define
class Answer:
    """One answer of the raw server."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = attrs.Factory(dict)
    content_type: str | None = "application/json"

    def response(self, base_url: str) -> web.Response:
        headers = dict(self.headers)
        if self.content_type is not None:
            headers["Content-Type"] = self.content_type
        body = self.body.replace(BLOB.encode(), base_url.encode())
        return web.Response(status=self.status, body=body, headers=headers)

    @property
    def plain(self) -> bool:
        """Whether the body reaches the client as written (no encoding to undo)."""
        return self.headers.get("Content-Encoding", "identity") in ("identity", "x-junk")


answers = st.builds(
    Answer, status=STATUSES, body=bodies, headers=EXTRA_HEADERS, content_type=CONTENT_TYPES
)


@attrs.define
class RawServer:
    """A stand-in API and image host on loopback that answers what the example says.

    Paths under /blob/ are the image host (`blob`, or `blobs[path]`), everything else is
    the API (`api`). A `CallbackHub` is mounted at /cb; with `deliver` set, a request
    that names a hub URL gets that body POSTed there before its answer is sent.
    """

    url: str
    hub: CallbackHub
    http: aiohttp.ClientSession
    api: Answer = attrs.Factory(Answer)
    blob: Answer = attrs.Factory(lambda: Answer(body=JPEG, content_type="image/jpeg"))
    blobs: dict[str, Answer] = attrs.Factory(dict)
    deliver: bytes | None = None
    seen: list[str] = attrs.Factory(list)
    delivered: list[int] = attrs.Factory(list)  # the hub's answers to `deliver`

    async def handle(self, request: web.Request) -> web.Response:
        data = await request.read()
        self.seen.append(f"{request.method} {request.path}")
        if request.path.startswith("/blob/"):
            return self.blobs.get(request.path, self.blob).response(self.url)
        found = re.search(rb"http://127\.0\.0\.1:\d+/cb/[A-Za-z0-9_-]{43}", data)
        if self.deliver is not None and found:
            async with self.http.post(found.group().decode(), data=self.deliver) as delivery:
                self.delivered.append(delivery.status)
        return self.api.response(self.url)

    def reset(self, api: Answer, blob: Answer | None = None, deliver: bytes | None = None) -> None:
        self.api = api
        self.blob = blob or Answer(body=JPEG, content_type="image/jpeg")
        self.blobs.clear()
        self.deliver = deliver
        self.seen.clear()
        self.delivered.clear()


@pytest.fixture
async def raw(plain: aiohttp.ClientSession) -> AsyncIterator[RawServer]:
    sock = bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # A short ttl: a call waiting on the hub for a callback that never comes ends soon.
    hub = CallbackHub(f"{url}/cb", ttl=0.1, max_body_size=HUB_BODY_LIMIT)
    server = RawServer(url, hub, plain)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_subapp("/cb", hub.aiohttp_app())
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield server
    finally:
        await runner.cleanup()
        sock.close()


def fast_client(base_url: str, *, max_retries: int = 1) -> AsyncClient:
    """A client whose retries (and honoured Retry-After) last milliseconds."""
    retries = RetryPolicy(max_retries=max_retries, backoff_base=0.001, retry_after_cap=0.02)
    return AsyncClient(KEY, base_url=base_url, max_retries=retries, timeout=Timeout(total=10))


@pytest.fixture
async def rdm(raw: RawServer) -> AsyncIterator[AsyncClient]:
    async with fast_client(raw.url) as client:
        yield client


@pytest.fixture
def photo(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "photo.jpg"
    path.write_bytes(JPEG)
    return path


_dirs = itertools.count()


def fresh_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A new directory for one example's downloads."""
    path = tmp_path / f"example-{next(_dirs)}"
    path.mkdir()
    return path


def temp_files(directory: pathlib.Path) -> list[str]:
    """Temporary download files under `directory` (hidden `.NAME.XXXX.part` ones: a
    downloaded image may itself be called `x.part`, never `.x.part`)."""
    return [path for path in leftovers(directory) if pathlib.Path(path).name.startswith(".")]


def blob_image(raw: RawServer, name: str = "photo.jpeg", image_id: str = "img-1") -> Image:
    return Image(
        id=image_id,
        file_name=name,
        model_id="m",
        image_url=f"{raw.url}/blob/{image_id}?se=2024&sig=a%2Fb%3D",
        prompt="p",
    )


# ---------------------------------------------------------------- every call that sends

Call = Callable[[AsyncClient, RawServer, pathlib.Path], Awaitable[object]]


async def _batch(
    dm: AsyncClient, raw: RawServer, where: pathlib.Path, download: bool
) -> list[BatchResult]:
    requests = [
        GenerateRequest(model_id="m", prompt="a"),
        GenerateRequest(model_id="n", prompt="b"),
    ]
    target = fresh_dir(where) if download else None
    return [r async for r in dm.images.generate_many(requests, download_to=target)]


def _create(
    images: bool, callback: str | CallbackHub | None
) -> Callable[[AsyncClient, RawServer, pathlib.Path], Awaitable[object]]:
    async def call(dm: AsyncClient, raw: RawServer, where: pathlib.Path) -> object:
        hub_or_url = raw.hub if callback == "hub" else callback
        if images:
            return await dm.models.create(
                images=[where / "photo.jpg"],
                gender="woman",
                model_type="amateur",
                callback=hub_or_url,
            )
        return await dm.models.create(
            image_urls=["https://example.com/a.jpg"],
            gender="man",
            model_type="professional",
            name="n",
            callback=hub_or_url,
        )

    return call


CALLS: Final[dict[str, tuple[Call, type | tuple[type, ...]]]] = {
    "balance": (lambda dm, raw, where: dm.account.balance(), Balance),
    "create-files": (_create(True, None), ModelCreated),
    "create-urls-callback": (_create(False, "https://app.example.com/cb"), ModelCreated),
    "create-hub": (_create(True, "hub"), Model),
    "extend": (lambda dm, raw, where: dm.models.extend("m/../1"), ModelExtension),
    "generate": (
        lambda dm, raw, where: dm.images.generate(model_id="m", prompt="p", num_images=2),
        Generation,
    ),
    "generate-callback": (
        lambda dm, raw, where: dm.images.generate(
            model_id="m", prompt="p", callback="https://app.example.com/cb"
        ),
        Accepted,
    ),
    "generate-hub": (
        lambda dm, raw, where: dm.images.generate(model_id="m", prompt="p", callback=raw.hub),
        Generation,
    ),
    "retrieve": (lambda dm, raw, where: dm.images.retrieve("img-1"), Image),
    "upscale": (lambda dm, raw, where: dm.images.upscale("img-1"), Image),
    "upscale-callback": (
        lambda dm, raw, where: dm.images.upscale("img-1", callback="https://app.example.com/cb"),
        Accepted,
    ),
    "upscale-hub": (lambda dm, raw, where: dm.images.upscale("img-1", callback=raw.hub), Image),
    "remix": (
        lambda dm, raw, where: dm.images.remix(
            model_id="m", artwork_image=JPEG, mask_image=("mask.png", PNG), mode="async"
        ),
        RemixResult,
    ),
    "face-id-remix": (
        lambda dm, raw, where: dm.images.face_id_remix(
            identity_image=where / "photo.jpg", artwork_image=io.BytesIO(JPEG), mask_image=PNG
        ),
        RemixResult,
    ),
    "generate-many": (lambda dm, raw, where: _batch(dm, raw, where, False), list),
    "generate-many-download": (lambda dm, raw, where: _batch(dm, raw, where, True), list),
    "download": (
        lambda dm, raw, where: dm.images.download(blob_image(raw), fresh_dir(where)),
        list,
    ),
}
# What the documented answer of each call is (the hub calls get theirs by callback).
DOCUMENTED_FOR: Final = {
    "balance": "balance",
    "create-files": "message",
    "create-urls-callback": "message",
    "create-hub": "message",
    "extend": "extension",
    "generate": "generation",
    "generate-callback": "message",
    "generate-hub": "message",
    "retrieve": "image",
    "upscale": "image",
    "upscale-callback": "message",
    "upscale-hub": "message",
    "remix": "remix",
    "face-id-remix": "remix",
    "generate-many": "generation",
    "generate-many-download": "generation",
    "download": "image",
}


async def outcome(awaitable: Awaitable[T]) -> T | DeepModeError:
    """The result, or the DeepModeError raised; any other exception fails the test."""
    try:
        return await awaitable
    except DeepModeError as error:
        return error


def check_typed_error(error: DeepModeError, api: Answer) -> None:
    """What any error must be: readable, without the key, and true to the status."""
    assert KEY not in str(error), error
    assert KEY not in repr(error.__cause__), error.__cause__
    if isinstance(error, APIStatusError):
        assert error.status_code == api.status
        assert not 200 <= api.status < 300, error
        assert len(error.detail) <= 500
        assert "\n" not in error.detail
    if isinstance(error, RateLimitError) and error.retry_after is not None:
        assert math.isfinite(error.retry_after)
        assert error.retry_after >= 0


def check_batch(results: list[BatchResult], raw: RawServer) -> None:
    assert sorted(r.index for r in results) == [0, 1]  # one result per request, none lost
    for result in results:
        if result.error is None:
            assert isinstance(result.generation, Generation)
            if result.paths is not None:
                assert len(result.paths) == len(result.generation.images)
        else:
            assert isinstance(result.error, DeepModeError), result.error
            if result.generation is None:
                check_typed_error(result.error, raw.api)
            else:
                assert isinstance(result.error, DownloadError), result.error


@fuzz(300)
@given(call=st.sampled_from(sorted(CALLS)), answer=answers, documented=st.booleans())
@example(call="balance", answer=Answer(200, b"[" * 100_000 + b"]" * 100_000), documented=False)
@example(call="generate", answer=Answer(429, b"", {"Retry-After": "1e400"}), documented=False)
async def test_any_answer_gives_a_typed_result_or_a_typed_error(
    raw: RawServer,
    rdm: AsyncClient,
    photo: pathlib.Path,
    call: str,
    answer: Answer,
    documented: bool,
) -> None:
    """Status 200-599, any content type, any body (bytes, JSON, the documented shapes with
    fields dropped or of the wrong type, huge or deeply nested), junk headers: every call
    returns its documented type or raises a DeepModeError true to the status."""
    if documented:
        answer = attrs.evolve(answer, body=encode(DOCUMENTED[DOCUMENTED_FOR[call]]))
    raw.reset(answer, blob=attrs.evolve(answer, body=JPEG))
    where = photo.parent
    function, expected = CALLS[call]
    result = await outcome(function(rdm, raw, where))
    works = documented and answer.plain and 200 <= answer.status < 300 and answer.status != 204
    if isinstance(result, DeepModeError):
        check_typed_error(result, answer)
        if call in ("download", "generate-many-download"):
            assert isinstance(result, DownloadError), result
        elif call.endswith("-hub"):
            assert not works or isinstance(result, CallbackTimeoutError), result  # none came
        else:
            assert not works, f"the documented answer failed: {result!r}"
    else:
        assert isinstance(result, expected), result
        if isinstance(result, list) and call.startswith("generate-many"):
            check_batch(result, raw)
        else:
            if isinstance(result, list):
                assert len(result) == 1
                assert result[0].read_bytes() == JPEG
            assert 200 <= answer.status < 300
    assert temp_files(where) == []


@fuzz(150)
@given(
    status=STATUSES,
    body=st.binary(max_size=300) | st.sampled_from([JPEG, b""]),
    headers=EXTRA_HEADERS.map(lambda h: {k: v for k, v in h.items() if k != "Content-Encoding"}),
    content_type=CONTENT_TYPES,
    refresh=answers,
)
async def test_any_image_host_answer_is_the_file_or_a_download_error(
    raw: RawServer,
    rdm: AsyncClient,
    tmp_path: pathlib.Path,
    status: int,
    body: bytes,
    headers: dict[str, str],
    content_type: str | None,
    refresh: Answer,
) -> None:
    """The image host answers any status and bytes (a 403 refreshes the URL through the
    API, which answers anything too): the file holds exactly the bytes sent, or
    `DownloadError` and no file, no temporary file."""
    raw.reset(refresh, blob=Answer(status, body, headers, content_type))
    dest = fresh_dir(tmp_path)
    paths = await outcome(rdm.images.download(blob_image(raw), dest))
    if isinstance(paths, DeepModeError):
        assert isinstance(paths, DownloadError), paths
        assert paths.image_id == "img-1"
        assert KEY not in str(paths)
        assert status != 200
        assert os.listdir(dest) == []
    else:
        assert status == 200
        assert [p.name for p in paths] == ["photo.jpeg"]
        assert paths[0].read_bytes() == body
        assert os.listdir(dest) == ["photo.jpeg"]
    if status == 403:
        assert raw.seen[1] == "GET /api/images/img-1"  # refreshed once, through the API
        assert len([s for s in raw.seen if s.startswith("GET /blob/")]) <= 2


def gzip_complete(data: bytes) -> bytes | None:
    """What a gzip stream decodes to, or None when it is not one whole gzip stream."""
    decoder = zlib.decompressobj(wbits=31)
    try:
        out = decoder.decompress(data) + decoder.flush()
    except zlib.error:
        return None
    return out if decoder.eof and not decoder.unused_data else None


whole_gzip = st.binary(max_size=2000).map(gzip.compress)


@fuzz(60)
@given(
    body=st.one_of(
        whole_gzip,
        st.tuples(whole_gzip, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])]),
        st.binary(max_size=100),
    )
)
@example(body=gzip.compress(JPEG)[: len(gzip.compress(JPEG)) // 2])
@example(body=b"")
async def test_a_gzip_encoded_image_is_saved_whole_or_refused(
    raw: RawServer, rdm: AsyncClient, tmp_path: pathlib.Path, body: bytes
) -> None:
    """An image host may gzip its answer. A stream cut short (with a Content-Length that
    matches what was sent) must not be saved as the image: only a whole stream is."""
    raw.reset(Answer(), blob=Answer(200, body, {"Content-Encoding": "gzip"}, "image/jpeg"))
    dest = fresh_dir(tmp_path)
    expected = gzip_complete(body)
    paths = await outcome(rdm.images.download(blob_image(raw), dest))
    if isinstance(paths, DeepModeError):
        assert isinstance(paths, DownloadError), paths
        assert expected is None, "a whole gzip stream was refused"
        assert os.listdir(dest) == []
    else:
        saved = paths[0].read_bytes()
        assert expected is not None, f"a broken gzip stream was saved as {len(saved)} bytes"
        assert saved == expected


# ------------------------------------------------------ any bytes as the whole HTTP answer


@attrs.define
class TcpServer:
    """Answers every connection with `reply` (the whole HTTP answer, raw), then closes."""

    url: str = ""
    reply: bytes = b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(self.reply)
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@pytest.fixture
async def tcp() -> AsyncIterator[TcpServer]:
    server = TcpServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    async with listener:
        yield server


STATUS_LINES = st.sampled_from(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 429 Too Many",
        b"HTTP/1.1 503 ",
        b"HTTP/1.0 200 OK",
        b"HTTP/1.1 999 What",
        b"HTTP/1.1 abc",
        b"HTTP/2 200",
        b"HTTP/1.1 100 Continue",
        b"ICY 200 OK",
        b"",
    ]
)
HEADER_LINES = st.lists(
    st.sampled_from(
        [
            b"Content-Length: 0",
            b"Content-Length: 5",
            b"Content-Length: 99999",
            b"Content-Length: -1",
            b"Content-Length: 1, 2",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: gzip, chunked",
            b"Content-Encoding: gzip",
            b"Content-Type: application/json",
            b"Retry-After: 0",
            b"Retry-After: \xff\xfe",
            b"X-Request-Id: \xc3\xa9\x80",
            b"Location: http://evil.example/",
            b"Connection: close",
            b"Bad Header",
            b": no name",
            b"X-Folded: a\r\n b",
        ]
    )
    | st.binary(max_size=30),
    max_size=5,
)


@fuzz(120)
@given(
    call=st.sampled_from(["balance", "generate", "download"]),
    status_line=STATUS_LINES,
    header_lines=HEADER_LINES,
    body=st.sampled_from([b"", b"{}", b'{"remaining_balance": 5}', b"5\r\nabcde\r\n0\r\n\r\n"])
    | st.binary(max_size=100),
    whole=st.booleans(),
)
async def test_any_bytes_as_the_whole_http_answer(
    tcp: TcpServer,
    tmp_path: pathlib.Path,
    call: str,
    status_line: bytes,
    header_lines: list[bytes],
    body: bytes,
    whole: bool,
) -> None:
    """Broken status lines, lying Content-Lengths, broken chunking, bytes that are not
    HTTP at all: a typed result or a DeepModeError (a DownloadError for downloads)."""
    head = b"\r\n".join([status_line, *header_lines]) + b"\r\n\r\n"
    tcp.reply = head + body if whole else body
    dest = fresh_dir(tmp_path)
    image = Image(id="i", file_name="f.jpeg", model_id="m", image_url=tcp.url, prompt="")

    async def run(dm: AsyncClient) -> object:
        if call == "balance":
            return await dm.account.balance()
        if call == "generate":
            return await dm.images.generate(model_id="m", prompt="p")
        return await dm.images.download(image, dest)

    async with fast_client(tcp.url) as client:
        result = await outcome(run(client))
    if isinstance(result, DeepModeError):
        assert KEY not in str(result)
        assert call != "download" or isinstance(result, DownloadError), result
    else:
        expected = {"balance": Balance, "generate": Generation, "download": list}[call]
        assert isinstance(result, expected), result
    assert temp_files(dest) == []


# ================================================================== 2. callback bodies

KINDS: Final = ("model", "generation", "upscale")
DOC_CALLBACKS: Final[dict[str, dict[str, Any]]] = {
    "model": MODEL_DOC,
    "generation": GENERATION_DOC,
    "upscale": IMAGE_DOC,
}
PARSERS: Final[dict[str, Callable[[bytes], object]]] = {
    "model": parse_model_callback,
    "generation": parse_generation_callback,
    "upscale": parse_upscale_callback,
}

callback_bodies = st.one_of(
    st.binary(max_size=300),
    st.binary(min_size=HUB_BODY_LIMIT - 2, max_size=HUB_BODY_LIMIT + 2),
    json_values.map(encode),
    st.sampled_from([IMAGE_DOC, MODEL_DOC]).flatmap(shaped).map(encode),
    shaped_generation.map(encode),
    st.sampled_from(list(DOC_CALLBACKS.values())).map(encode),
    st.sampled_from(ODD_BODIES[:-3]),
)


@contextlib.asynccontextmanager
async def serve_hub(adapter: str, hub_options: dict[str, Any]) -> AsyncIterator[CallbackHub]:
    """A hub served on loopback at /cb by its aiohttp or its ASGI adapter (uvicorn)."""
    sock = bound_socket()
    hub = CallbackHub(f"http://127.0.0.1:{sock.getsockname()[1]}/cb", **hub_options)
    serve = (
        serve_aiohttp(hub, sock) if adapter == "aiohttp" else serve_uvicorn(hub.asgi_app(), sock)
    )
    async with serve:
        yield hub


@pytest.fixture(params=["aiohttp", "asgi"])
async def hub(request: pytest.FixtureRequest) -> AsyncIterator[CallbackHub]:
    async with serve_hub(request.param, {"max_body_size": HUB_BODY_LIMIT, "ttl": 30}) as served:
        yield served


PATH_TRICKS: Final = ["", "/", "x", "%2F..%2F", "/../x", "?a=1", "#f", "%00"]


@fuzz(120)
@given(
    kind=st.sampled_from(KINDS),
    body=callback_bodies,
    content_type=st.sampled_from(
        ["application/json", "text/plain", "application/x-www-form-urlencoded", "", "garbage"]
    ),
    path=st.sampled_from(["token", "other token", *(f"token{t}" for t in PATH_TRICKS)]),
)
async def test_any_body_posted_to_the_hub_gets_2xx_or_4xx_and_the_waiter_keeps_waiting(
    hub: CallbackHub,
    plain: aiohttp.ClientSession,
    kind: str,
    body: bytes,
    content_type: str,
    path: str,
) -> None:
    """A waiter gets the parsed result when a valid body reaches its URL; anything else
    gets 400/404/413 and the waiter keeps waiting, then takes the next valid delivery."""
    pending = hub.expect(kind)  # type: ignore[call-overload]
    other = hub.expect(kind)  # type: ignore[call-overload]
    url = path.replace("other token", other.url).replace("token", pending.url)
    waiter = asyncio.create_task(pending.wait(timeout=10))
    try:
        async with plain.post(url, data=body, headers={"Content-Type": content_type}) as response:
            status = response.status
            answer = await response.read()
        assert status in (200, 400, 404, 413), (status, answer)
        assert status == 404 or "detail" in json.loads(answer), answer
        if path == "other token":
            assert not pending.done
            assert other.done == (status == 200)
        elif status == 200:  # the exact URL, or one the adapter reads the same token from
            assert pending.done
            assert await waiter == PARSERS[kind](body)
            return
        assert not pending.done
        if url == pending.url and len(body) <= HUB_BODY_LIMIT:
            assert status == 400, status  # a body of the right size that does not parse
        if url == pending.url and len(body) > HUB_BODY_LIMIT:
            assert status == 413, status
        valid = encode(DOC_CALLBACKS[kind])
        async with plain.post(pending.url, data=valid) as response:
            assert response.status == 200
        assert await waiter == PARSERS[kind](valid)
    finally:
        waiter.cancel()


def raw_post(target: str, headers: list[bytes], body: bytes) -> bytes:
    request_line = f"POST {target} HTTP/1.1".encode()
    return b"\r\n".join([request_line, b"Host: 127.0.0.1", *headers]) + b"\r\n\r\n" + body


async def exchange(url: str, request: bytes, *, half_close: bool) -> bytes:
    """Send raw bytes to the server of `url` and read its answer until it closes."""
    port = int(url.split(":")[2].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


framings = st.sampled_from(
    ["length", "short-length", "long-length", "chunked", "bad-chunked", "gzip", "deflate"]
)


def framed(framing: str, body: bytes, valid: bool) -> tuple[list[bytes], bytes, bool]:
    """Headers, body bytes and whether to half-close, for one way of framing `body`."""
    length = f"Content-Length: {len(body)}".encode()
    if framing == "short-length":
        return [f"Content-Length: {max(len(body) - 1, 0)}".encode()], body, False
    if framing == "long-length":
        return [f"Content-Length: {len(body) + 10}".encode()], body, True
    if framing == "chunked":
        chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
        return [b"Transfer-Encoding: chunked"], chunk, False
    if framing == "bad-chunked":
        return [b"Transfer-Encoding: chunked"], b"zz\r\n" + body + b"\r\n0\r\n\r\n", False
    if framing in ("gzip", "deflate"):
        data = (
            (gzip.compress(body) if framing == "gzip" else zlib.compress(body)) if valid else body
        )
        encoding = f"Content-Encoding: {framing}".encode()
        return [encoding, f"Content-Length: {len(data)}".encode()], data, False
    return [length], body, False


@fuzz(80)
@given(
    kind=st.sampled_from(KINDS),
    framing=framings,
    body=callback_bodies,
    compressed=st.booleans(),
)
@example(kind="model", framing="gzip", body=b"\x00\x00", compressed=False)
@example(kind="upscale", framing="deflate", body=b"", compressed=False)
async def test_any_framing_of_a_delivery_gets_an_answer_below_500(
    hub: CallbackHub, kind: str, framing: str, body: bytes, compressed: bool
) -> None:
    """A delivery with a Content-Length that lies, broken chunking, or a Content-Encoding
    whose bytes are not compressed: 2xx/4xx (or the connection closed), never a 5xx, and
    only a whole valid body settles the callback."""
    pending = hub.expect(kind)  # type: ignore[call-overload]
    headers, data, half_close = framed(framing, body, compressed)
    target = pending.url.split("/", 3)[3]
    request = raw_post(f"/{target}", [*headers, b"Connection: close"], data)
    answer = await exchange(pending.url, request, half_close=half_close)
    status_line = answer.split(b"\r\n", 1)[0]
    if answer:
        status = int(status_line.split()[1])
        assert status < 500, answer[:300]
    if pending.done:
        assert framing not in ("long-length", "bad-chunked"), framing
        sent = body[: len(body) - 1] if framing == "short-length" else body
        assert await pending.wait(timeout=1) == PARSERS[kind](sent)


HUB_CALLS: Final[dict[str, tuple[str, Call]]] = {
    "generate": ("generation", CALLS["generate-hub"][0]),
    "upscale": ("upscale", CALLS["upscale-hub"][0]),
    "create": ("model", CALLS["create-hub"][0]),
}


@fuzz(50)
@given(
    call=st.sampled_from(sorted(HUB_CALLS)),
    body=callback_bodies,
    documented_body=st.booleans(),
    api=answers,
    accepted=st.booleans(),
)
async def test_a_call_waiting_on_a_hub_gets_the_result_or_a_typed_error(
    raw: RawServer,
    photo: pathlib.Path,
    call: str,
    body: bytes,
    documented_body: bool,
    api: Answer,
    accepted: bool,
) -> None:
    """The server POSTs any body to the hub URL of a call in callback mode, and answers
    anything: the call returns the parsed result of a valid body, or raises a
    DeepModeError (a CallbackTimeoutError saying why the body was refused)."""
    kind, function = HUB_CALLS[call]
    if documented_body:
        body = encode(DOC_CALLBACKS[kind]).replace(BLOB.encode(), raw.url.encode())
    if accepted:
        api = Answer(200, encode(DOCUMENTED["message"]))
    raw.reset(api, deliver=body)
    async with fast_client(raw.url, max_retries=0) as dm:
        result = await outcome(function(dm, raw, photo.parent))
    if isinstance(result, DeepModeError):
        assert KEY not in str(result)
        if accepted:
            assert raw.delivered != [200], f"a valid callback did not end the wait: {result!r}"
            assert isinstance(result, CallbackTimeoutError), result
            if raw.delivered != [404]:  # 404: on a slow machine the ttl ended first
                assert "refused" in str(result), result
    else:
        assert raw.delivered == [200]
        assert result == PARSERS[kind](body)
        assert 200 <= api.status < 300


# =================================================================== 3. file names

HOSTILE_PIECES = st.sampled_from(
    [
        *["..", ".", "/", "\\", "\x00", "\n", "\r", "\t", "\x1b", "\x7f", "con", "CON", "nul"],
        *["LPT1", "com9", ".jpeg", ".part", " ", "~", "$", "%2F", "%00", "\u202e", "\u200b"],
        *["\ufeff", "e\u0301", "\u00e9", "\uff0f", "\u2215", "\u2024", "\uff0e", "\ufe52"],
        *["\ud800", "\udcff", "😀", "x" * 60, "a:b", "?", "*", "|", '"', "<", ">", "-2"],
        *["/etc/passwd", "C:\\Windows\\", "\\\\server\\share\\", "~/.ssh/id_rsa"],
    ]
)
NAMES = st.one_of(
    st.text(max_size=40),
    st.text(max_size=600),
    st.lists(HOSTILE_PIECES, max_size=30).map("".join),
    st.lists(st.one_of(HOSTILE_PIECES, st.text(max_size=5)), max_size=60).map("".join),
    st.sampled_from(["", ".", "..", "CON", "con.jpeg", "/", "\\", "\x00", " ", "...."]),
)


def all_files(root: pathlib.Path) -> set[pathlib.Path]:
    return set(root.rglob("*"))


@fuzz(120)
@given(
    names=st.lists(NAMES, min_size=1, max_size=6),
    existing=st.lists(NAMES, max_size=3),
    overwrite=st.booleans(),
)
@example(names=["a" * 600, "a" * 600], existing=["a" * 600], overwrite=False)
@example(names=["../sibling.txt", "..", "/", "\\..\\sibling.txt"], existing=[], overwrite=True)
@example(names=["\ud800\udcff"], existing=[], overwrite=False)
async def test_any_file_name_lands_directly_inside_dest(
    raw: RawServer,
    rdm: AsyncClient,
    tmp_path: pathlib.Path,
    names: list[str],
    existing: list[str],
    overwrite: bool,
) -> None:
    """A generation whose images have any `file_name` (separators, `..`, NUL, control
    characters, reserved names, look-alike slashes and dots, lone surrogates, huge ones):
    every file lands directly in `dest` with its own bytes, earlier files there are kept
    (or replaced with `overwrite`), and nothing else is written anywhere."""
    base = fresh_dir(tmp_path)
    dest = base / "dest"
    dest.mkdir()
    (base / "sibling.txt").write_bytes(b"keep")
    old = {dest / safe_file_name(name, "fallback.jpeg") for name in existing}
    for path in old:
        path.write_bytes(b"old")
    images = [
        {**IMAGE_DOC, "id": f"img-{i}", "file_name": name, "image_url": f"{BLOB}/blob/{i}?s=1"}
        for i, name in enumerate(names)
    ]
    raw.reset(Answer(200, json.dumps({"images": images}).encode()))
    for index in range(len(names)):
        raw.blobs[f"/blob/{index}"] = Answer(200, f"image {index}".encode(), {}, "image/jpeg")
    everything_before = all_files(tmp_path)

    generation = await rdm.images.generate(model_id="m", prompt="p", num_images=len(names))
    # JSON joins a lone high surrogate followed by a low one into one character.
    served = [json.loads(json.dumps(name)) for name in names]
    assert [image.file_name for image in generation.images] == served
    paths = await rdm.images.download(generation, dest, overwrite=overwrite)

    assert len(paths) == len(names)
    assert len({path.name.lower() for path in paths}) == len(paths)
    for index, path in enumerate(paths):
        assert path.resolve().parent == dest.resolve(), path
        assert path.parent == dest
        assert path.is_file()
        assert not path.is_symlink()
        assert path.read_bytes() == f"image {index}".encode()
        assert path.name not in ("", ".", "..")
        assert path.name.isprintable()
        assert len(path.name.encode()) <= 210  # 200, and a "-N" when the name is taken
    for path in old - set(paths):
        assert path.read_bytes() == b"old"  # a name already taken is never clobbered
    if not overwrite:
        assert not old & set(paths)
    assert (base / "sibling.txt").read_bytes() == b"keep"
    assert all_files(tmp_path) - everything_before == set(paths) - old
    assert temp_files(base) == []


@pytest.mark.parametrize("overwrite", [False, True])
async def test_a_symlink_in_dest_is_never_written_through(
    raw: RawServer, rdm: AsyncClient, tmp_path: pathlib.Path, overwrite: bool
) -> None:
    """A file name that matches a symlink in `dest` pointing outside: the target outside
    stays as it was, whether or not `overwrite` is set."""
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "photo.jpeg").symlink_to(outside)
    raw.reset(Answer(), blob=Answer(200, b"downloaded", {}, "image/jpeg"))

    (path,) = await rdm.images.download(blob_image(raw), dest, overwrite=overwrite)

    assert outside.read_bytes() == b"precious"
    assert path.parent == dest
    assert path.read_bytes() == b"downloaded"
    assert not path.is_symlink()
    assert path.name == ("photo.jpeg" if overwrite else "photo-2.jpeg")
    assert (dest / "photo.jpeg").is_symlink() != overwrite


# =================================================================== 4. arguments

HUGE: Final = [10**400, -(10**400), 2**1024, 2**63]
NOT_TEXT: Final = [
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e300]),
    st.binary(max_size=20),
    st.lists(st.integers() | st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    st.builds(object),
    st.sampled_from([bytearray(b"x"), (1, 2), frozenset({1}), 1j, ..., KeyError, ValueError()]),
]
TEXT: Final = [
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "\ud800", "a\r\nb", "é", "😀" * 3]),
]
anything = st.one_of(*NOT_TEXT, *TEXT)
# Anything but a str: a text would be a directory to create, maybe outside the test's.
anything_but_text = st.one_of(*NOT_TEXT)


def maybe(valid: st.SearchStrategy[Any], near: Iterable[Any] = ()) -> st.SearchStrategy[Any]:
    """Mostly a valid value, else a nearly valid one from `near`, or anything at all: so
    that many calls have one odd argument among good ones, and some work."""
    odd = st.sampled_from(list(near)) | anything if near else anything
    return st.sampled_from([True, True, True, False]).flatmap(lambda good: valid if good else odd)


def noop(progress: object) -> None:
    pass


@attrs.frozen
class Ref:
    """A valid value only the running test knows (its mock's ids, its photo), drawn by
    name: arguments are drawn in `@given`, as `data.draw()` inside an async test would
    raise hypothesis's own control exceptions through anyio's test runner."""

    name: str
    detail: str = ""


@attrs.frozen
class Known:
    """The valid values of the argument fuzz: ids the mock knows, a photo, a hub."""

    mock: MockDeepMode
    model_id: str
    image: Image
    photo: pathlib.Path
    hub: CallbackHub

    def resolve(self, value: Any) -> Any:
        """`value` with each `Ref` in it (in lists and tuples too) made real."""
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if isinstance(value, tuple):
            return tuple(self.resolve(item) for item in value)
        if not isinstance(value, Ref):
            return value
        directory = f"{self.photo.parent}/out/{value.detail}"
        makers: dict[str, Callable[[], object]] = {
            "model_id": lambda: self.model_id,
            "image_id": lambda: self.image.id,
            "image": lambda: self.image,
            "generation": lambda: Generation((self.image,)),
            "photo": lambda: self.photo,
            "photo text": lambda: str(self.photo),
            "photo's directory": lambda: str(self.photo.parent),
            "hub": lambda: self.hub,
            "request": lambda: GenerateRequest(model_id=self.model_id, prompt="p"),
            "directory": lambda: directory,
            "directory path": lambda: pathlib.Path(directory),
            "BytesIO": lambda: io.BytesIO(JPEG),
            "StringIO": lambda: io.StringIO("text"),
        }
        return makers[value.name]()


BAD_URLS = [
    "ftp://x/cb",
    "http://",
    "https:///x",
    "http://[::1",
    "http://a b/",
    " http://a/",
    "http://a/\x00",
    "javascript:alert(1)",
    "//no-scheme/x",
    "http://" + "a" * 300 + "/",
]
URLS = st.sampled_from(["https://app.example.com/cb", "http://127.0.0.1:9/cb", *BAD_URLS])
TIMEOUTS = maybe(
    st.sampled_from([None, 30, 30.0, 1e300, Timeout(), Timeout(connect=5, read=60, total=None)])
)
PROGRESS = maybe(st.sampled_from([None, noop]))
MODEL_IDS = maybe(st.just(Ref("model_id")), ["unknown-model", "../x", "a/b", "%2e", " "])
IMAGE_IDS = maybe(st.just(Ref("image_id")), ["unknown-image", "..", "a?b#c", "\t"])
CALLBACKS = maybe(st.sampled_from([None, None, Ref("hub"), "http://127.0.0.1:9/cb"]), BAD_URLS)
GOOD_IMAGE = st.sampled_from(
    [Ref("photo"), Ref("photo text"), Ref("BytesIO"), JPEG, ("a.png", PNG), ("a.jpg", JPEG, "x/y")]
)
ODD_IMAGE = st.sampled_from(
    [
        Ref("StringIO"),
        b"not an image",
        b"",
        Ref("photo's directory"),
        "/nonexistent/photo.jpg",
        "photo\x00.jpg",
        "/dev/null",
        ("a.jpg", 5),
        ("a.jpg", JPEG, "image/jpeg\r\nX: 1"),
        ("a.jpg",),
        (5, JPEG),
        ("a\ud800.jpg", JPEG),
        ("a.jpg", Ref("photo text")),
    ]
)
IMAGES = maybe(
    st.lists(GOOD_IMAGE, min_size=1, max_size=3),
    [[], [JPEG] * 31, "photo.jpg", JPEG, Ref("photo")],
) | st.lists(GOOD_IMAGE | ODD_IMAGE | anything, min_size=1, max_size=3)
IMAGE_URLS = maybe(
    st.lists(st.just("https://example.com/a.jpg"), min_size=1, max_size=3),
    [[], ["https://example.com/a.jpg"] * 31, "https://example.com/a.jpg", ["ftp://x/a.jpg"]],
)
# Text is always under the test's directory (no `..`): a dest is created when missing.
DIRECTORIES = (
    st.text(max_size=10)
    .filter(lambda t: ".." not in t)
    .flatmap(lambda t: st.sampled_from([Ref("directory", t), Ref("directory path", t)]))
    | anything_but_text
)

Method = Callable[..., Awaitable[Any]]


async def _many(dm: AsyncClient, **kwargs: Any) -> list[BatchResult]:
    return [result async for result in dm.images.generate_many(**kwargs)]


# `models.create`'s arguments besides the photos, for both ways of giving them.
TRAINING_ARGUMENTS: Final[dict[str, st.SearchStrategy[Any]]] = {
    "gender": maybe(st.sampled_from(["woman", "man", Gender.MAN]), ["Woman", "other"]),
    "model_type": maybe(st.sampled_from(["amateur", ModelType.PROFESSIONAL]), ["pro"]),
    "name": maybe(st.sampled_from([None, "My model", ""]), ["\ud800"]),
    "callback": CALLBACKS,
    "progress": PROGRESS,
    "timeout": TIMEOUTS,
}

RESOURCE_METHODS: Final[dict[str, tuple[Method, dict[str, st.SearchStrategy[Any]]]]] = {
    "account.balance": (lambda dm, **kw: dm.account.balance(**kw), {"timeout": TIMEOUTS}),
    "models.create": (
        lambda dm, **kw: dm.models.create(**kw),
        {
            "images": IMAGES,
            "image_urls": maybe(st.none(), [["https://example.com/a.jpg"]]),
            **TRAINING_ARGUMENTS,
        },
    ),
    "models.create(image_urls)": (
        lambda dm, **kw: dm.models.create(**kw),
        {"images": maybe(st.none(), [[JPEG]]), "image_urls": IMAGE_URLS, **TRAINING_ARGUMENTS},
    ),
    "models.extend": (
        lambda dm, **kw: dm.models.extend(**kw),
        {"model_id": MODEL_IDS, "timeout": TIMEOUTS},
    ),
    "images.generate": (
        lambda dm, **kw: dm.images.generate(**kw),
        {
            "model_id": MODEL_IDS,
            "prompt": maybe(st.sampled_from(["a lighthouse", "x" * 10_000]), ["", "  ", "\n"]),
            "negative_prompt": maybe(st.sampled_from([None, "", "rain"]), ["\udfff"]),
            "num_images": maybe(st.integers(1, 8), [0, -1, 9, True, 1.0, "1", 2**64]),
            "upscale": maybe(st.booleans(), [0, 1, "true", None]),
            "ratio": maybe(
                st.sampled_from(["portrait", "square", Ratio.SQUARE]), ["PORTRAIT", "landscape"]
            ),
            "callback": CALLBACKS,
            "timeout": TIMEOUTS,
        },
    ),
    "images.retrieve": (
        lambda dm, **kw: dm.images.retrieve(**kw),
        {"image_id": IMAGE_IDS, "timeout": TIMEOUTS},
    ),
    "images.upscale": (
        lambda dm, **kw: dm.images.upscale(**kw),
        {"image_id": IMAGE_IDS, "callback": CALLBACKS, "timeout": TIMEOUTS},
    ),
    "images.remix": (
        lambda dm, **kw: dm.images.remix(**kw),
        {
            "model_id": MODEL_IDS,
            "artwork_image": maybe(st.sampled_from([JPEG, Ref("photo")]), [b"junk", b""]),
            "mask_image": maybe(st.sampled_from([PNG, ("m.png", PNG)]), [("m.png", b"x")]),
            "prompt": maybe(st.just("on a beach"), [None]),
            "negative_prompt": maybe(st.just(""), [None]),
            "mode": maybe(st.sampled_from(["sync", "async", RemixMode.ASYNC]), ["ASYNC", "x"]),
            "timeout": TIMEOUTS,
        },
    ),
    "images.face_id_remix": (
        lambda dm, **kw: dm.images.face_id_remix(**kw),
        {
            "identity_image": maybe(st.sampled_from([JPEG, Ref("photo")]), [Ref("StringIO")]),
            "artwork_image": maybe(st.just(JPEG)),
            "mask_image": maybe(st.just(PNG)),
            "prompt": maybe(st.just("")),
            "negative_prompt": maybe(st.just("")),
            "mode": maybe(st.sampled_from(["sync", "async"])),
            "timeout": TIMEOUTS,
        },
    ),
    "images.download": (
        lambda dm, **kw: dm.images.download(**kw),
        {
            "items": maybe(
                st.sampled_from([Ref("image"), Ref("generation"), [Ref("image"), Ref("image")]]),
                [[], [Ref("image"), 1], [[Ref("image")]], Ref("request")],
            ),
            "dest": DIRECTORIES,
            "concurrency": maybe(st.integers(1, 4), [0, -1, True, 2.0]),
            "overwrite": maybe(st.booleans(), [0, "yes"]),
            "progress": PROGRESS,
            "timeout": TIMEOUTS,
        },
    ),
    "images.generate_many": (
        _many,
        {
            "requests": maybe(
                st.lists(st.just(Ref("request")), max_size=3),
                [[Ref("request"), 1], [Ref("image")], "abc", b"abc", {}],
            ),
            "concurrency": maybe(st.integers(1, 4), [0, -1, True, 2.0]),
            "download_to": st.none() | DIRECTORIES,
            "progress": PROGRESS,
            "timeout": TIMEOUTS,
        },
    ),
}


def calls_of(
    table: Mapping[str, tuple[object, dict[str, st.SearchStrategy[Any]]]],
    only: Iterable[str] | None = None,
) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """A method of `table` (of `only`) and an argument for each of its parameters."""
    names = sorted(table if only is None else only)
    return st.sampled_from(names).flatmap(
        lambda name: st.fixed_dictionaries(table[name][1]).map(lambda kw: (name, kw))
    )


# Refusals that mean the mock got what the client should have refused itself.
REFUSED_BY_SERVER: Final = (400, 413, 422)


@pytest.fixture
async def known(photo: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Known]:
    monkeypatch.chdir(photo.parent)  # a relative path argument lands in the test's directory
    async with MockDeepMode(balance=10**9, callback_retries=0) as mock:
        model = mock.add_model()
        async with AsyncClient(mock.api_key, base_url=mock.base_url) as dm:
            image = (await dm.images.generate(model_id=model.id, prompt="p")).images[0]
        # Nobody serves this hub: a call waiting on it ends with its ttl.
        hub = CallbackHub("http://127.0.0.1:9/cb", ttl=0.01)
        yield Known(mock, model.id, image, photo, hub)


def api_calls(mock: MockDeepMode) -> int:
    """Requests to the API (a batch with `download_to` also downloads what it made)."""
    return sum(1 for record in mock.requests if record.endpoint != "download")


def check_outcome(
    known: Known, before: tuple[int, int], result: object, arguments: Mapping[str, Any]
) -> None:
    """A ValidationError sent nothing and spent nothing; another error is the mock's
    answer to something the client may send (an unknown id, a timeout)."""
    if isinstance(result, ValidationError):
        # A batch checks its requests as it takes them (its input may be endless): the
        # good ones before a bad one have gone out, as documented, and nothing after it.
        requests = arguments.get("requests")
        sent = 0
        if isinstance(requests, list) and "requests[" in str(result):
            sent = next(
                (i for i, item in enumerate(requests) if not isinstance(item, GenerateRequest)),
                len(requests),
            )
        assert api_calls(known.mock) == before[0] + sent, "a request went out before the check"
        assert len(known.mock.ledger) <= before[1] + sent, "credits were spent"
    elif isinstance(result, APIStatusError):
        assert result.status_code not in REFUSED_BY_SERVER, f"the client let it through: {result}"


@fuzz(600)
@given(call=calls_of(RESOURCE_METHODS))
@example(call=("account.balance", {"timeout": 10**400}))
@example(call=("images.generate", {"model_id": "m", "prompt": "p", "timeout": 2**1024}))
async def test_any_arguments_to_a_resource_method_are_a_validation_error_or_work(
    known: Known, call: tuple[str, dict[str, Any]]
) -> None:
    """Every parameter of every resource method gets a valid value, a nearly valid one
    or anything at all (None, bools, ints huge and small, floats with NaN and infinities,
    text, bytes, lists, dicts, bare objects, types): a ValidationError before any
    request, or the call works against the mock. Never a TypeError or ValueError."""
    method, drawn = call
    arguments = {name: known.resolve(value) for name, value in drawn.items()}
    before = (api_calls(known.mock), len(known.mock.ledger))
    async with AsyncClient(known.mock.api_key, base_url=known.mock.base_url, max_retries=0) as dm:
        result = await outcome(RESOURCE_METHODS[method][0](dm, **arguments))
    check_outcome(known, before, result, arguments)


async def _construct_client(hub: CallbackHub, **kwargs: Any) -> object:
    async with AsyncClient(**kwargs) as client:
        return client


async def _construct(cls: Callable[..., object], hub: CallbackHub, **kwargs: Any) -> object:
    return cls(**kwargs)


async def _expect(hub: CallbackHub, **kwargs: Any) -> object:
    return hub.expect(**kwargs)


async def _receive(hub: CallbackHub, **kwargs: Any) -> object:
    status, detail = hub.receive(**kwargs)
    assert status in (200, 400, 404, 413)
    assert isinstance(detail, str)
    return status


async def _wait(hub: CallbackHub, **kwargs: Any) -> object:
    return await hub.expect("model").wait(**kwargs)


SECONDS = maybe(st.sampled_from([None, 0.5, 10, 1e300]), [0, -1, True, "1"])
POSITIVE = maybe(st.sampled_from([1, 10, 10**12]), [0, -1, True, 1.0])
VALUE_CALLS: Final[dict[str, tuple[Method, dict[str, st.SearchStrategy[Any]]]]] = {
    "AsyncClient": (
        _construct_client,
        {
            "api_key": maybe(st.just(KEY), [None, "", "k y", "k\n", " k", "ключ"]),
            "base_url": maybe(
                st.sampled_from([None, "http://127.0.0.1:9", "https://api.example.com/v1/"]),
                ["ftp://x", "http://", "//x", "http://u:p@x", "http://x/?q=1", "http://x/#f"],
            ),
            "timeout": TIMEOUTS,
            "max_retries": maybe(st.integers(0, 3)),
            "max_connections": maybe(st.integers(1, 10)),
            "session": maybe(st.none()),
            "default_headers": maybe(
                st.sampled_from(
                    [
                        None,
                        {"X-App": "1"},
                        {"X-Bad": "a\r\nb"},
                        {"Authorization": "x"},
                        {"x y": "1"},
                        {"X-E": "é"},
                    ]
                )
            ),
        },
    ),
    "GenerateRequest": (
        functools.partial(_construct, GenerateRequest),
        {
            "model_id": maybe(st.just("m")),
            "prompt": maybe(st.just("p")),
            "negative_prompt": maybe(st.none()),
            "num_images": maybe(st.integers(0, 9)),
            "upscale": maybe(st.booleans()),
            "ratio": maybe(st.sampled_from(["portrait", "square"])),
        },
    ),
    "Timeout": (
        functools.partial(_construct, Timeout),
        {"connect": SECONDS, "read": SECONDS, "total": SECONDS},
    ),
    "CallbackHub": (
        functools.partial(_construct, CallbackHub),
        {
            "public_base_url": maybe(URLS | st.just("https://app.example.com/cb?x=1")),
            "ttl": maybe(st.sampled_from([0.5, 10, 1e300]), [0, -1, True, None]),
            "max_pending": POSITIVE,
            "max_body_size": POSITIVE,
        },
    ),
    "CallbackHub.expect": (_expect, {"kind": maybe(st.sampled_from(KINDS)), "ttl": SECONDS}),
    "CallbackHub.receive": (
        _receive,
        {
            "token": maybe(st.text(max_size=50)),
            "body": maybe(st.sampled_from([encode(MODEL_DOC), b"", b"{}"])),
        },
    ),
    "PendingCallback.wait": (
        _wait,
        {"timeout": maybe(st.sampled_from([None, 0.001, 1e-300]))},
    ),
}


@fuzz(300)
@given(call=calls_of(VALUE_CALLS))
@example(call=("Timeout", {"read": 10**400}))
@example(call=("CallbackHub", {"public_base_url": "https://app.example.com/cb", "ttl": 2**1024}))
@example(call=("PendingCallback.wait", {"timeout": 10**400}))
async def test_any_arguments_to_constructors_and_the_hub_are_a_validation_error_or_work(
    monkeypatch: pytest.MonkeyPatch, call: tuple[str, dict[str, Any]]
) -> None:
    """`AsyncClient(...)`, `GenerateRequest(...)`, `Timeout(...)`, `CallbackHub(...)`,
    `hub.expect`, `hub.receive` and `pending.wait` with anything for each parameter: a
    ValidationError, or the object (a DeepModeError saying how to set a missing key)."""
    for name in ("DEEPMODE_API_KEY", "DEEPMODE_BASE_URL", "DEEPMODE_LOG"):
        monkeypatch.delenv(name, raising=False)
    target, arguments = call
    hub = CallbackHub("http://127.0.0.1:9/cb", ttl=0.01)  # a wait on it ends at once
    result = await outcome(VALUE_CALLS[target][0](hub, **arguments))
    if isinstance(result, CallbackTimeoutError):
        assert target == "PendingCallback.wait"
    elif isinstance(result, DeepModeError) and not isinstance(result, ValidationError):
        # Only a missing key is not a ValidationError: it says how to set one.
        assert target == "AsyncClient", result
        assert arguments["api_key"] in (None, ""), result
        assert "DEEPMODE_API_KEY" in str(result)


@pytest.fixture
def blocking(
    photo: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Known, Client]]:
    for name in ("DEEPMODE_API_KEY", "DEEPMODE_BASE_URL", "DEEPMODE_LOG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(photo.parent)
    with (
        MockDeepMode(balance=10**9, callback_retries=0) as mock,
        Client(mock.api_key, base_url=mock.base_url, max_retries=0) as dm,
    ):
        model = mock.add_model()
        image = dm.images.generate(model_id=model.id, prompt="p").images[0]
        hub = CallbackHub("http://127.0.0.1:9/cb", ttl=0.01)
        yield Known(mock, model.id, image, photo, hub), dm


BLOCKING_CALLS: Final = {
    **{name: RESOURCE_METHODS[name] for name in ("account.balance", "images.download")},
    "images.generate": RESOURCE_METHODS["images.generate"],
    "Client": VALUE_CALLS["AsyncClient"],
}


@fuzz(60)
@given(call=calls_of(BLOCKING_CALLS))
@example(call=("account.balance", {"timeout": 10**400}))
def test_the_blocking_client_refuses_bad_arguments_the_same_way(
    blocking: tuple[Known, Client], call: tuple[str, dict[str, Any]]
) -> None:
    """`Client(...)`, and its balance, generate and download, with anything for each
    parameter: a ValidationError before any request, or it works."""
    known, dm = blocking
    method, drawn = call
    arguments = {name: known.resolve(value) for name, value in drawn.items()}
    before = (api_calls(known.mock), len(known.mock.ledger))
    functions: dict[str, Callable[..., object]] = {
        "account.balance": dm.account.balance,
        "images.download": dm.images.download,
        "images.generate": dm.images.generate,
        "Client": lambda **kw: Client(**kw).close(),
    }
    try:
        functions[method](**arguments)
    except DeepModeError as error:
        result: object = error
    else:
        result = None
    if method == "Client" and isinstance(result, DeepModeError):
        assert isinstance(result, ValidationError) or arguments["api_key"] in (None, "")
    check_outcome(known, before, result, arguments)
