"""Secrets: the API key never shows in a repr, in any error (its text, its attributes, its
chain, its pickle), in the logs or in a request to another host; signed query strings are
redacted in log lines, which still name the path.

Three keys are in play so a leak of any one is caught: the one passed as `api_key`, the
one read from `$DEEPMODE_API_KEY`, and a wrong one (a 401 must not echo it either).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import pickle
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Self

import attrs
import pytest
from conftest import FAST

from deepmode_async import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    CallbackTimeoutError,
    Client,
    ConflictError,
    DeepModeError,
    DownloadError,
    GenerateRequest,
    Image,
    InsufficientCreditsError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RequestInfo,
    ResponseValidationError,
    Timeout,
    UnprocessableEntityError,
    ValidationError,
)
from deepmode_async._transport import Request
from deepmode_async.callbacks import CallbackHub
from deepmode_async.testing import MockDeepMode, sample_image

pytestmark = pytest.mark.anyio

KEY = "sk-live-SECRET-4f9c8e7d6b5a0e1f"  # passed as api_key=
ENV_KEY = "sk-live-ENVKEY-9a8b7c6d5e4f3a2b"  # read from $DEEPMODE_API_KEY
WRONG = "sk-live-WRONG-0b1c2d3e4f5a6b7c"  # refused with 401
SECRETS = (KEY, ENV_KEY, WRONG)
SIGNATURE = "sig="  # the signed part of every image URL the mock hands out (_blob.py)
DEEPMODE = pathlib.Path(sys.executable).with_name("deepmode")


def fast(client: AsyncClient) -> AsyncClient:
    client._transport.retry = attrs.evolve(client._transport.retry, backoff_base=FAST)
    return client


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No DEEPMODE_* variables but the key, which clients without `api_key` read."""
    for name in list(os.environ):
        if name.startswith("DEEPMODE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DEEPMODE_API_KEY", ENV_KEY)
    return monkeypatch


# ------------------------------------------------------------------ where a secret may show


def chain(error: BaseException) -> list[BaseException]:
    """`error` and every exception reachable from it: causes, contexts (even the ones
    `raise ... from None` hides from tracebacks) and the members of groups."""
    found: list[BaseException] = []
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or any(current is seen for seen in found):
            continue
        found.append(current)
        todo += [current.__cause__, current.__context__]
        if isinstance(current, BaseExceptionGroup):
            todo += list(current.exceptions)
    return found


def exposures(error: BaseException, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    """Each place where one of `secrets` shows for `error`: the whole printed traceback,
    then str, repr, args and every attribute of each exception of its chain, then its
    pickle (when it pickles). A URL signature counts too in the text the SDK writes (not
    in what the server sent back: a redirect's `Location` may well hold one)."""
    texts = {"format_exception": "".join(traceback.format_exception(error))}
    for index, member in enumerate(chain(error)):
        name = f"chain[{index}] {type(member).__name__}"
        texts[f"{name} str"] = str(member)
        texts[f"{name} repr"] = repr(member)
        texts[f"{name} args"] = repr(member.args)
        texts[f"{name} vars"] = repr(vars(member))
    # APIStatusError and CallbackTimeoutError do not pickle: nothing to leak there.
    with contextlib.suppress(TypeError, AttributeError, pickle.PicklingError):
        texts["pickle"] = pickle.dumps(error).decode("latin-1")
    return [
        place
        for place, text in texts.items()
        if any(secret in text for secret in secrets)
        or (SIGNATURE in text and not place.endswith(("vars", "pickle")))
    ]


async def caught(call: Awaitable[object]) -> DeepModeError:
    """The DeepModeError `call` raises (a call that succeeds fails the test)."""
    try:
        result = await call
    except DeepModeError as error:
        return error
    raise AssertionError(f"expected an error, got {result!r}")


# ------------------------------------------------------------------ a bare HTTP server


def http_answer(status: int, body: bytes = b"", **headers: str) -> bytes:
    """A whole HTTP/1.1 answer that closes its connection."""
    lines = [f"HTTP/1.1 {status} Whatever", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def request_path(head: bytes) -> str:
    """The path and query of a request, from its head."""
    return head.split(b" ", 2)[1].decode()


class RawOrigin:
    """An HTTP origin on loopback that keeps every byte each connection sent (headers,
    body, or a TLS hello) and answers with `answer(head)`, raw, then hangs up."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = await reader.read(65536)
                data += chunk
                if not chunk or not data[:1].isalpha():  # closed, or not HTTP (TLS)
                    return
            head, _, body = data.partition(b"\r\n\r\n")
            lowered = head.lower()
            length = 0
            for line in lowered.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            while (
                b"transfer-encoding: chunked" in lowered and not body.endswith(b"0\r\n\r\n")
            ) or len(body) < length:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                body += chunk
            data = head + b"\r\n\r\n" + body
            writer.write(self.answer(head))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.received.append(data)
            writer.close()


@pytest.fixture
async def garbage() -> AsyncIterator[RawOrigin]:
    """An origin whose answers each test scripts through `.answer`."""
    async with RawOrigin(lambda head: http_answer(500)) as origin:
        yield origin


# ------------------------------------------------------------------ reprs


async def test_a_client_and_everything_reachable_from_it_show_no_key(
    env: pytest.MonkeyPatch, mock: MockDeepMode
) -> None:
    async with (
        AsyncClient(KEY, base_url=mock.base_url) as given,
        AsyncClient(base_url=mock.base_url) as from_env,
    ):
        assert from_env._transport._api_headers["Authorization"] == f"Bearer {ENV_KEY}"
        for dm in (given, from_env):
            with pytest.raises(AuthenticationError):  # the mock takes `mock-key` only
                await dm.account.balance()  # the session exists from here on
            transport = dm._transport
            api_request = Request(
                "POST", transport.api_url("/api/x"), False, transport._api_headers
            )
            plain = transport.plain_request(transport.api_url("/c/a.jpeg?sig=abc%2B"))
            objects: list[object] = [
                dm,
                dm.models,
                dm.images,
                dm.account,
                dm.timeout,
                transport,
                api_request,
                transport.retry,
                transport.timeout,
                transport._pool._session,
                plain,
                plain.info,
                RequestInfo("GET", "x"),
            ]
            texts = [repr(o) for o in objects] + [str(o) for o in objects]
            texts += [repr(vars(dm)), repr(vars(dm.images)), repr(vars(dm.models)), f"{dm}"]
            assert texts
            for text in texts:
                assert not any(secret in text for secret in SECRETS), text
            # The request (internal) shows its URL whole, as the `Image` it came from does;
            # what is logged or raised is its `info`, with the query redacted.
            assert SIGNATURE in repr(plain)
            assert repr(dm) == f"AsyncClient(base_url={mock.base_url!r})"
            assert "?[redacted]" in str(plain.info)


def test_the_blocking_client_and_its_errors_show_no_key(
    env: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    with MockDeepMode(api_key=ENV_KEY) as mock:
        model = mock.add_model()
        errors: dict[str, DeepModeError] = {}
        with Client(base_url=mock.base_url, max_retries=0) as dm:  # the key from the env
            texts = [repr(dm), str(dm), repr(dm.images), repr(dm.models), repr(dm.account)]
            texts += [repr(dm.timeout), repr(vars(dm))]
            generation = dm.images.generate(model_id=model.id, prompt="a lighthouse")
            try:
                dm.images.retrieve("nope")
            except NotFoundError as error:
                errors["404"] = error
            mock.fail("download", 404)
            try:
                dm.images.download(generation, tmp_path)
            except DownloadError as error:
                errors["download"] = error
            try:
                dm.images.generate(model_id=model.id, prompt=" ")
            except ValidationError as error:
                errors["validation"] = error
            (result,) = dm.images.generate_many([GenerateRequest(model_id="nope", prompt="x")])
            assert isinstance(result.error, NotFoundError)
            errors["batch"] = result.error
            texts.append(repr(result))
        with Client(WRONG, base_url=mock.base_url, max_retries=0) as wrong:
            texts.append(repr(wrong))
            try:
                wrong.account.balance()
            except AuthenticationError as error:
                errors["401"] = error
        try:
            dm.account.balance()
        except DeepModeError as error:
            errors["closed"] = error
    assert sorted(errors) == ["401", "404", "batch", "closed", "download", "validation"]
    for text in texts:
        assert not any(secret in text for secret in SECRETS), text
    for label, failure in errors.items():
        assert exposures(failure) == [], label


# ------------------------------------------------------------------ errors


async def test_no_error_the_sdk_raises_holds_a_key(
    closed_port: int, garbage: RawOrigin, tmp_path: pathlib.Path
) -> None:
    """Every kind of failure, for real; each error is read every way an app or an error
    reporter may print it."""
    async with MockDeepMode(api_key=KEY, callback_retries=0) as mock:
        await each_failure(mock, closed_port, garbage, tmp_path)


async def each_failure(
    mock: MockDeepMode, closed_port: int, garbage: RawOrigin, tmp_path: pathlib.Path
) -> None:
    model = mock.add_model()
    training = mock.add_model(active=False)
    errors: list[tuple[str, type[DeepModeError], DeepModeError]] = []

    async def expect(label: str, cls: type[DeepModeError], call: Awaitable[object]) -> None:
        error = await caught(call)
        errors.append((label, cls, error))

    async with fast(AsyncClient(WRONG, base_url=mock.base_url)) as wrong:
        await expect("401 wrong key", AuthenticationError, wrong.account.balance())
    async with fast(AsyncClient(KEY, base_url=mock.base_url)) as dm:
        generation = await dm.images.generate(model_id=model.id, prompt="a lighthouse")
        balance = mock.balance
        mock.balance = 0
        gen = dm.images.generate(model_id=model.id, prompt="x")
        await expect("402 no credits", InsufficientCreditsError, gen)
        mock.balance = balance
        await expect("404 unknown image", NotFoundError, dm.images.retrieve("nope"))
        gen = dm.images.generate(model_id=training.id, prompt="x")
        await expect("409 training", ConflictError, gen)
        mock.max_upload_size = 2000
        create = dm.models.create(
            images=[sample_image("jpeg", size=5000)], gender="woman", model_type="amateur"
        )
        await expect("413 too large", PayloadTooLargeError, create)
        mock.max_upload_size = 1024**3
        detail = [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]
        mock.fail("generate", 422, detail=detail)
        gen = dm.images.generate(model_id=model.id, prompt="x")
        await expect("422", UnprocessableEntityError, gen)
        mock.fail("balance", 429, times=3, retry_after=0)
        await expect("429 retries exhausted", RateLimitError, dm.account.balance())
        mock.fail("generate", 500)
        gen = dm.images.generate(model_id=model.id, prompt="x")
        await expect("500 paid call", InternalServerError, gen)
        mock.fail("balance", 503, times=3)
        await expect("503 retries exhausted", InternalServerError, dm.account.balance())
        mock.stall("balance", seconds=5, times=3)  # a read: tried three times, each timing out
        call = dm.account.balance(timeout=Timeout(read=0.05))
        await expect("read timeouts", APITimeoutError, call)
        mock.clear_faults()
        mock.drop("generate")
        gen = dm.images.generate(model_id=model.id, prompt="x")
        await expect("dropped connection", APIConnectionError, gen)
        mock.fail("download", 404)
        download = dm.images.download(generation, tmp_path / "a")
        await expect("download 404", DownloadError, download)
        mock.truncate(times=3)
        download = dm.images.download(generation, tmp_path / "b")
        await expect("download truncated", DownloadError, download)
        mock.advance_clock(2 * 3600)  # the URL expires; its refresh is refused
        mock.fail("retrieve_image", 401)
        download = dm.images.download(generation, tmp_path / "c")
        await expect("download refresh refused", DownloadError, download)
        gen = dm.images.generate(model_id=model.id, prompt="")
        await expect("bad argument", ValidationError, gen)
        mock.fail("generate", 400, detail="The image could not be read")
        gen = dm.images.generate(model_id=model.id, prompt="x")
        await expect("400", BadRequestError, gen)
        hub = CallbackHub(f"http://127.0.0.1:{closed_port}/hooks", ttl=0.1)
        gen = dm.images.generate(model_id=model.id, prompt="x", callback=hub)
        await expect("callback never came", CallbackTimeoutError, gen)
        batch = dm.images.generate_many([GenerateRequest(model_id="nope", prompt="x")])
        results = [result async for result in batch]
        assert results[0].error is not None
        errors.append(("batch item", NotFoundError, results[0].error))
        assert not any(secret in repr(results) for secret in SECRETS)
        mock.advance_clock(31 * 24 * 3600)  # the model has expired
        gen = dm.images.generate(model_id=model.id, prompt="x")
        await expect("403 expired model", PermissionDeniedError, gen)
    await expect("closed client", DeepModeError, dm.account.balance())
    async with fast(AsyncClient(KEY, base_url=f"http://127.0.0.1:{closed_port}")) as refused:
        await expect("connection refused", APIConnectionError, refused.account.balance())
    async with AsyncClient(KEY, base_url=garbage.origin, max_retries=0) as odd:
        garbage.answer = lambda head: http_answer(200, b'{"remaining_balance": "lots"}')
        await expect("2xx of the wrong shape", ResponseValidationError, odd.account.balance())
        garbage.answer = lambda head: (
            b"HTTP/1.1 200 OK\r\nContent-Length: 90\r\nContent-Type: application/json\r\n"
            b'Connection: close\r\n\r\n{"remaining'
        )
        await expect("answer cut short", APIConnectionError, odd.account.balance())

    assert len(errors) == 23
    for label, cls, error in errors:
        assert type(error) is cls, (label, error)
        assert exposures(error) == [], (label, error)


async def test_credentials_inside_an_image_url_never_show(
    closed_port: int, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with MockDeepMode() as mock:
        model = mock.add_model()
        async with fast(AsyncClient(mock.api_key, base_url=mock.base_url)) as dm:
            (image,) = (await dm.images.generate(model_id=model.id, prompt="x")).images
            url = f"http://user:hunter2-secret@127.0.0.1:{closed_port}/x.jpeg?sig=sig-secret"
            error = await caught(
                dm.images.download(attrs.evolve(image, image_url=url), tmp_path / "out")
            )
    shown = [str(error), repr(error), "".join(traceback.format_exception(error)), caplog.text]
    assert all("hunter2-secret" not in text and "sig-secret" not in text for text in shown)
    assert f"127.0.0.1:{closed_port}/x.jpeg?[redacted]" in str(error)


# ------------------------------------------------------------------ logs


async def test_debug_logs_hold_no_key_and_no_signature_but_the_path(
    env: pytest.MonkeyPatch,
    sdk_logger: logging.Logger,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    closed_port: int,
    garbage: RawOrigin,
    tmp_path: pathlib.Path,
) -> None:
    env.setenv("DEEPMODE_LOG", "debug")
    caplog.set_level(logging.DEBUG)  # the root: aiohttp's and asyncio's loggers too
    app_log = logging.getLogger("the_app")
    async with MockDeepMode(api_key=ENV_KEY) as mock:
        model = mock.add_model()
        async with fast(AsyncClient(base_url=mock.base_url)) as dm:
            assert len(sdk_logger.handlers) == 1  # DEEPMODE_LOG's own, to stderr
            mock.fail("balance", 503)  # retried: a warning
            await dm.account.balance()
            generation = await dm.images.generate(model_id=model.id, prompt="x", num_images=2)
            mock.fail("download", 503)  # a download retried: a warning naming its path
            await dm.images.download(generation, tmp_path / "first")
            mock.advance_clock(2 * 3600)  # expired: 403, a retrieve, a fresh URL
            await dm.images.download(generation, tmp_path / "second")
            mock.fail("download", 404)
            failures = [await caught(dm.images.download(generation, tmp_path / "third"))]
        async with AsyncClient(WRONG, base_url=mock.base_url) as wrong:
            failures.append(await caught(wrong.account.balance()))
        async with fast(AsyncClient(KEY, base_url=f"http://127.0.0.1:{closed_port}")) as refused:
            failures.append(await caught(refused.account.balance()))
        async with AsyncClient(KEY, base_url=garbage.origin, max_retries=0) as odd:
            garbage.answer = lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"
            failures.append(await caught(odd.account.balance()))
        for failure in failures:
            app_log.exception("the call failed", exc_info=failure)
        downloads = [r for r in mock.requests if r.endpoint == "download"]

    queries = {r.query for r in downloads}
    blob_paths = {r.path for r in downloads}
    assert len(queries) >= 2
    assert all(SIGNATURE in query for query in queries)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    lines = []
    for record in caplog.records:
        text = "\n".join([formatter.format(record), repr(record.args), record.exc_text or ""])
        lines.append(text)
        for secret in (*SECRETS, *queries, SIGNATURE):
            assert secret not in text, (secret, text)
    # Still useful: each download's line names its path, the query replaced by a marker.
    for path in blob_paths:
        assert any(f"{path}?[redacted] -> 200" in line for line in lines), path
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(path in w and "?[redacted]" in w for path in blob_paths for w in warnings)
    assert any("/api/check-balance" in w for w in warnings)
    assert sum(line.startswith("the_app ERROR") for line in lines) == 4
    stderr = capsys.readouterr().err
    assert "(attempt 2)" in stderr  # what DEEPMODE_LOG=debug printed
    for secret in (*SECRETS, *queries, SIGNATURE):
        assert secret not in stderr, secret


# ------------------------------------------------------------------ other hosts


async def test_image_hosts_get_no_key_and_no_api_header(
    env: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    jpeg = sample_image("jpeg")
    async with (
        MockDeepMode(api_key=ENV_KEY) as mock,
        RawOrigin(lambda head: http_answer(200, jpeg, Content_Type="image/jpeg")) as foreign,
    ):
        model = mock.add_model()
        headers = {"X-Tenant-Token": "tenant-secret-77"}
        async with fast(AsyncClient(base_url=mock.base_url, default_headers=headers)) as dm:
            generation = await dm.images.generate(model_id=model.id, prompt="x", num_images=2)
            mock.fail("download", 503)
            await dm.images.download(generation, tmp_path / "a")
            mock.advance_clock(2 * 3600)
            await dm.images.download(generation, tmp_path / "b")
            upscaled = await dm.images.upscale(generation.images[0].id)
            await dm.images.download(upscaled, tmp_path / "c")
            elsewhere = attrs.evolve(
                generation.images[0], image_url=f"{foreign.origin}/c/a.jpeg?se=1&sig=ab%2Bc"
            )
            await dm.images.download(elsewhere, tmp_path / "d")
        api = [r for r in mock.requests if r.endpoint not in (None, "download")]
        blob = [r for r in mock.requests if r.endpoint == "download"]
    assert {r.headers.get("Authorization") for r in api} == {"[redacted]"}  # the key went
    assert {r.status for r in blob} == {200, 403, 503}
    assert len(blob) == 8
    for record in blob:
        assert "authorization" not in {name.lower() for name in record.headers}
        assert "X-Tenant-Token" not in record.headers
        seen = " ".join([record.path, record.query, *record.headers.values()])
        assert not any(secret in seen for secret in SECRETS)
    (raw,) = foreign.received
    assert raw.startswith(b"GET /c/a.jpeg?se=1&sig=ab%2Bc HTTP/1.1\r\n")  # byte for byte
    assert b"authorization" not in raw.lower()
    assert b"tenant-secret-77" not in raw
    assert not any(secret.encode() in raw for secret in SECRETS)


REDIRECTS = (301, 302, 303, 307, 308)


@pytest.mark.parametrize("status", REDIRECTS)
@pytest.mark.parametrize("target", ["other port", "other scheme", "other host", "chain back"])
async def test_a_redirect_never_takes_the_key_to_another_origin(
    status: int, target: str, tmp_path: pathlib.Path
) -> None:
    """The API origin answers every call with a redirect away; whatever the SDK does
    about it, the other origin must not get the key. It does not follow at all: each
    call raises the 3xx as an `APIStatusError` (a download as a `DownloadError`)."""
    locations: dict[str, Callable[[str], str]] = {}

    def home_answer(head: bytes) -> bytes:
        return http_answer(status, Location=locations[target](request_path(head)))

    def other_answer(head: bytes) -> bytes:
        if target == "chain back":
            return http_answer(status, Location=f"{home.origin}/again{request_path(head)}")
        return http_answer(200, b'{"remaining_balance": 1}', Content_Type="application/json")

    async with RawOrigin(home_answer) as home, RawOrigin(other_answer) as other:
        locations["other port"] = lambda path: f"{other.origin}{path}"
        locations["other scheme"] = lambda path: f"https://127.0.0.1:{home.port}{path}"
        locations["other host"] = lambda path: f"http://localhost:{home.port}{path}"
        locations["chain back"] = lambda path: f"{other.origin}{path}"
        image = Image(
            id="img_1",
            file_name="a.jpeg",
            model_id="m_1",
            image_url=f"{home.origin}/container/a.jpeg?se=2030&sig=ab%2Bc",
            prompt="x",
        )
        async with AsyncClient(KEY, base_url=home.origin, max_retries=0) as dm:
            outcomes = [
                await caught(dm.account.balance()),
                await caught(dm.images.generate(model_id="m_1", prompt="a lighthouse")),
                await caught(dm.images.retrieve("img_1")),
                await caught(dm.images.upscale("img_1")),
                await caught(
                    dm.models.create(
                        images=[sample_image("jpeg")], gender="woman", model_type="amateur"
                    )
                ),
            ]
            download = await caught(dm.images.download(image, tmp_path))

    for outcome in outcomes:
        assert type(outcome) is APIStatusError
        assert outcome.status_code == status
        assert exposures(outcome) == []
    assert type(download) is DownloadError
    assert isinstance(download.__cause__, APIStatusError)
    assert download.__cause__.status_code == status
    assert exposures(download) == []
    # The API origin saw each call once (the download without the key), nothing more.
    assert len(home.received) == 6
    assert all(f"Bearer {KEY}".encode() in raw for raw in home.received[:5])
    assert b"POST /api/models HTTP/1.1" in home.received[4]  # the multipart body was there
    assert b"authorization" not in home.received[5].lower()
    assert other.received == []  # not followed: no byte went to the other origin
    for raw in home.received + other.received:
        assert KEY.encode() not in raw.replace(f"Bearer {KEY}".encode(), b"", 1)


# ------------------------------------------------------------------ the command line


async def test_the_cli_prints_no_key_on_failure(closed_port: int, tmp_path: pathlib.Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEEPMODE_")}
    # --debug: the whole traceback of a refused connection, and every logger at DEBUG.
    refused = base | {
        "DEEPMODE_API_KEY": KEY,
        "DEEPMODE_BASE_URL": f"http://127.0.0.1:{closed_port}",
    }
    async with MockDeepMode(api_key=ENV_KEY) as mock:
        async with AsyncClient(ENV_KEY, base_url=mock.base_url) as dm:
            generation = await dm.images.generate(model_id=mock.add_model().id, prompt="x")
        # DEEPMODE_LOG=debug: a download retried (503), then refused (404), all logged.
        download = base | {
            "DEEPMODE_API_KEY": ENV_KEY,
            "DEEPMODE_BASE_URL": mock.base_url,
            "DEEPMODE_LOG": "debug",
        }
        mock.fail("download", 503)
        mock.fail("download", 404)
        image_id = generation.images[0].id
        (code1, out1, err1), (code2, out2, err2) = await asyncio.gather(
            run_cli(refused, "balance", "--debug"),
            run_cli(download, "download", image_id, "--out", str(tmp_path)),
        )
        (blob_path,) = {r.path for r in mock.requests if r.endpoint == "download"}
    assert code1 == 1
    assert "Traceback" in err1
    assert "APIConnectionError" in err1
    assert code2 == 1
    assert f"{blob_path}?[redacted] -> 503" in err2  # the debug lines name the path
    assert err2.splitlines()[-1].startswith("error: ")
    for text in (out1, err1, out2, err2):
        for secret in (*SECRETS, SIGNATURE):
            assert secret not in text, (secret, text)


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(DEEPMODE),
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


# ------------------------------------------------------------------ leaks found (SDK bugs)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["bad length", "bad status line", "bad header line"],
)
async def test_an_unreadable_answer_leaves_no_key_in_the_error_chain(
    garbage: RawOrigin, answer: bytes
) -> None:
    """aiohttp raises `ClientResponseError` here, whose `request_info` holds the request's
    headers, key included. The transport raises its own error `from None`, which hides
    that error from tracebacks but still keeps it as `__context__`."""
    garbage.answer = lambda head: answer
    async with AsyncClient(KEY, base_url=garbage.origin, max_retries=0) as dm:
        error = await caught(dm.account.balance())
    assert type(error) is APIConnectionError
    assert KEY not in "".join(traceback.format_exception(error))  # the printed part is clean
    assert exposures(error) == []


async def test_an_error_body_echoing_the_key_does_not_put_it_in_the_error(
    garbage: RawOrigin,
) -> None:
    """A gateway or an API that repeats the key it refused ("Invalid API key: sk-...")."""

    def echo(head: bytes) -> bytes:
        (auth,) = [line for line in head.split(b"\r\n") if line.lower().startswith(b"author")]
        token = auth.split(b" ")[-1]
        return http_answer(401, b'{"detail": "Invalid API key: ' + token + b'"}')

    garbage.answer = echo
    async with AsyncClient(WRONG, base_url=garbage.origin, max_retries=0) as dm:
        error = await caught(dm.account.balance())
    assert type(error) is AuthenticationError
    assert exposures(error) == []


@pytest.mark.parametrize("failure", ["401", "connection refused"])
async def test_frame_locals_that_error_reporters_capture_hold_no_key(
    mock: MockDeepMode, closed_port: int, failure: str
) -> None:
    """Sentry and similar tools send the local variables of every frame of an error's
    traceback (and of its causes'); `TracebackException(capture_locals=True)` shows the same."""
    url = mock.base_url if failure == "401" else f"http://127.0.0.1:{closed_port}"
    async with AsyncClient(KEY, base_url=url, max_retries=0) as dm:
        error = await caught(dm.account.balance())
    report = traceback.TracebackException.from_exception(error, capture_locals=True)
    leaking = []
    for member in [report, *_members(report)]:
        for frame in member.stack:
            if frame.filename == __file__:
                continue  # this test's own frames hold the key on purpose
            for name, value in (frame.locals or {}).items():
                if KEY in value:
                    leaking.append(f"{pathlib.Path(frame.filename).name}:{frame.name}:{name}")
    assert leaking == []


def _members(report: traceback.TracebackException) -> Iterator[traceback.TracebackException]:
    for linked in (report.__cause__, report.__context__):
        if linked is not None:
            yield linked
            yield from _members(linked)


def test_a_malformed_default_header_value_is_not_echoed() -> None:
    """Default headers go to the API only because they "may carry secrets too"
    (_transport.py); an invalid one should be refused without repeating it."""
    with pytest.raises(ValidationError) as refused:
        AsyncClient(KEY, default_headers={"X-Tenant-Token": "tenant-secret-77\n"})
    assert "X-Tenant-Token" in str(refused.value)
    assert "tenant-secret-77" not in str(refused.value)
