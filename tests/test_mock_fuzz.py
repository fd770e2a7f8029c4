"""Whatever a client sends, the mock answers 2xx or 4xx with a `detail`, never a 5xx."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepmode_async.testing import MockDeepMode, sample_image

ROUTES = [
    ("POST", "/api/models"),
    ("POST", "/api/models/{model}/extend"),
    ("POST", "/api/images/generate"),
    ("GET", "/api/images/{image}"),
    ("POST", "/api/images/upscale"),
    ("POST", "/api/remix/generate"),
    ("POST", "/api/face-id-remix"),
    ("GET", "/api/check-balance"),
]
FIELDS = [
    "images",
    "image_urls",
    "gender",
    "model_type",
    "name",
    "callback",
    "model_id",
    "prompt",
    "negative_prompt",
    "num_images",
    "upscale",
    "ratio",
    "image_id",
    "mode",
    "artwork_image",
    "mask_image",
    "identity_image",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
field_values = (
    st.sampled_from(
        ["woman", "man", "amateur", "professional", "portrait", "square", "sync", "async"]
    )
    | json_values
)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[MockDeepMode, requests.Session, dict[str, str]]]:
    with MockDeepMode(balance=10**9, max_upload_size=64 * 1024) as mock, requests.Session() as s:
        s.headers["Authorization"] = f"Bearer {mock.api_key}"
        model = mock.add_model()
        ok = s.post(
            f"{mock.base_url}/api/images/generate", json={"model_id": model.id, "prompt": "p"}
        )
        ids = {"model": model.id, "image": ok.json()["images"][0]["id"]}
        yield mock, s, ids


def check(response: requests.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert "detail" in response.json()


ServerFixture = tuple[MockDeepMode, requests.Session, dict[str, str]]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    body=st.fixed_dictionaries(
        {}, optional={name: field_values for name in FIELDS if "image" not in name}
    )
    | json_values,
    known_ids=st.booleans(),
)
def test_any_json_body(server: ServerFixture, route: Any, body: Any, known_ids: bool) -> None:
    mock, session, ids = server
    if isinstance(body, dict) and known_ids:
        body = {**body, "model_id": ids["model"], "image_id": ids["image"]}
    method, path = route
    url = mock.base_url + path.format(**ids)
    headers = {"Content-Type": "application/json"}
    check(session.request(method, url, data=json.dumps(body), headers=headers, timeout=10))


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    content_type=st.sampled_from(
        [
            None,
            "application/json",
            "multipart/form-data",
            "multipart/form-data; boundary=zz",
            "text/plain",
            "application/x-www-form-urlencoded",
        ]
    ),
    raw=st.binary(max_size=300),
)
def test_any_raw_body(
    server: ServerFixture, route: Any, content_type: str | None, raw: bytes
) -> None:
    mock, session, ids = server
    headers = {"Content-Type": content_type} if content_type else {}
    method, path = route
    url = mock.base_url + path.format(**ids)
    check(session.request(method, url, data=raw, headers=headers, timeout=10))


@FUZZ
@given(
    route=st.sampled_from([r for r in ROUTES if r[0] == "POST"]),
    parts=st.lists(
        st.tuples(
            st.sampled_from(FIELDS),
            st.binary(max_size=40) | st.sampled_from([sample_image(), sample_image("png")]),
            st.none() | st.text(max_size=12),
        ),
        max_size=8,
    ),
)
def test_any_multipart_body(server: ServerFixture, route: Any, parts: Any) -> None:
    mock, session, ids = server
    files = [(name, (filename, data)) for name, data, filename in parts]
    if not files:
        files = [("nothing", (None, b""))]
    method, path = route
    url = mock.base_url + path.format(**ids)
    check(session.request(method, url, files=files, timeout=10))


@FUZZ
@given(segment=st.text(min_size=1, max_size=30))
def test_any_identifier_in_the_path(server: ServerFixture, segment: str) -> None:
    mock, session, _ = server
    quoted = urllib.parse.quote(segment, safe="")
    check(session.get(f"{mock.base_url}/api/images/{quoted}", timeout=10))
    check(session.post(f"{mock.base_url}/api/models/{quoted}/extend", timeout=10))


# Visible ASCII and obs-text (>= 0x80), as HTTP allows in a header value; control
# characters are refused by aiohttp's parser before the mock sees the request.
header_bytes = st.lists(st.integers(0x21, 0xFF).filter(lambda c: c != 0x7F), max_size=40).map(bytes)


@FUZZ
@given(token=header_bytes)
def test_any_authorization_header(server: ServerFixture, token: bytes) -> None:
    mock, _, _ = server
    response = requests.get(
        f"{mock.base_url}/api/check-balance",
        headers={"Authorization": b"Bearer " + token},
        timeout=10,
    )
    check(response)
    assert response.status_code == (200 if token == mock.api_key.encode() else 401)


@FUZZ
@given(disposition=header_bytes, data=st.binary(max_size=40))
def test_any_content_disposition(server: ServerFixture, disposition: bytes, data: bytes) -> None:
    mock, session, _ = server
    body = b"--b\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n--b--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    check(session.post(f"{mock.base_url}/api/models", data=body, headers=headers, timeout=10))
