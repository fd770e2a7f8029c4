"""OpenTelemetry's aiohttp client instrumentation, instrumented globally as a user does:
one span per attempt, and neither the API key nor a signed URL's signature in any span."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from conftest import make_client
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from yarl import URL

from deepmode_async import InternalServerError
from deepmode_async.testing import MockDeepMode

pytestmark = pytest.mark.anyio


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = AioHttpClientInstrumentor()
    instrumentor.instrument(tracer_provider=provider)  # every session made from now on
    try:
        yield exporter
    finally:
        instrumentor.uninstrument()


def _texts(span: ReadableSpan) -> list[str]:
    """Everything a span exports as text: its name, attributes, events and status."""
    texts = [span.name, str(span.status.description)]
    texts += [key + "=" + str(value) for key, value in (span.attributes or {}).items()]
    for event in span.events:
        texts.append(event.name)
        texts += [key + "=" + str(value) for key, value in (event.attributes or {}).items()]
    return texts


def _status(span: ReadableSpan) -> object:
    attributes = span.attributes or {}
    return attributes.get("http.response.status_code", attributes.get("http.status_code"))


async def test_one_span_per_attempt(mock: MockDeepMode, exporter: InMemorySpanExporter) -> None:
    mock.fail("balance", 503)
    async with make_client(mock) as dm:
        await dm.account.balance()
    spans = exporter.get_finished_spans()
    assert [(span.name, _status(span)) for span in spans] == [("GET", 503), ("GET", 200)]
    assert len([r for r in mock.requests if r.endpoint == "balance"]) == 2


async def test_a_lost_connection_is_a_span_of_its_own(
    mock: MockDeepMode, exporter: InMemorySpanExporter
) -> None:
    mock.drop("balance")
    async with make_client(mock) as dm:
        await dm.account.balance()
    spans = exporter.get_finished_spans()
    assert [(span.name, _status(span)) for span in spans] == [("GET", None), ("GET", 200)]
    assert not spans[0].status.is_ok
    assert len([r for r in mock.requests if r.endpoint == "balance"]) == 2


async def test_a_paid_call_that_is_not_retried_has_one_span(
    mock: MockDeepMode, exporter: InMemorySpanExporter
) -> None:
    mock.fail("generate", 500)
    async with make_client(mock) as dm:
        with pytest.raises(InternalServerError):
            await dm.images.generate(model_id=mock.add_model().id, prompt="x")
    assert [(span.name, _status(span)) for span in exporter.get_finished_spans()] == [("POST", 500)]


async def test_no_span_holds_the_key_or_a_signature(
    mock: MockDeepMode, exporter: InMemorySpanExporter, tmp_path: pathlib.Path
) -> None:
    async with make_client(mock) as dm:
        generation = await dm.images.generate(
            model_id=mock.add_model().id, prompt="x", num_images=2
        )
        mock.advance_clock(7200)  # expired: each download is refused, refreshed, fetched again
        paths = await dm.images.download(generation, tmp_path)
        assert len(paths) == 2
        await dm.images.with_raw_response.retrieve(generation.images[0].id)
    fetches = [record for record in mock.requests if record.endpoint == "download"]
    assert [record.status for record in fetches] == [403, 403, 200, 200]
    signatures = {URL(f"/?{record.query}", encoded=True).query["sig"] for record in fetches}
    assert len(signatures) == 4
    assert all(len(signature) >= 16 for signature in signatures)
    spans = exporter.get_finished_spans()
    blob = str(mock.blob_base_url).rstrip("/")
    downloads = [span for span in spans if any(f"={blob}/" in text for text in _texts(span))]
    assert len(downloads) == 4  # the image host's spans were recorded, one per fetch
    exported = "\n".join(text for span in spans for text in _texts(span))
    assert mock.api_key not in exported
    for signature in signatures:
        assert signature not in exported
    assert "sig=REDACTED" in exported  # the instrumentation's own redaction, relied upon
