"""`dm.models.create(prepare=True)` and `deepmode models create --prepare`: photos go
through `deepmode_async.prep` before any byte is sent, or nothing is sent at all."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from conftest import make_client
from test_prep import oriented, photo, with_metadata

from deepmode_async import Client, ValidationError
from deepmode_async.prep import TrainingSetError, prepare_photo
from deepmode_async.testing import MockDeepMode

pytestmark = pytest.mark.anyio

DEEPMODE = pathlib.Path(sys.executable).with_name("deepmode")


def photos(directory: pathlib.Path) -> list[pathlib.Path]:
    """A rotated landscape photo and one carrying GPS, XMP and ICC, as files."""
    paths = [directory / "IMG_0001.JPG", directory / "IMG_0002.jpeg"]
    paths[0].write_bytes(oriented(6))
    paths[1].write_bytes(with_metadata())
    return paths


async def test_prepare_uploads_the_prepared_photos(
    mock: MockDeepMode, tmp_path: pathlib.Path
) -> None:
    paths = photos(tmp_path)
    async with make_client(mock) as dm:
        created = await dm.models.create(
            images=paths, prepare=True, gender="woman", model_type="amateur"
        )
    assert created.message
    (request,) = mock.requests
    assert [(f.filename, f.content_type, f.format) for f in request.files] == [
        ("IMG_0001.jpg", "image/jpeg", "jpeg"),
        ("IMG_0002.jpg", "image/jpeg", "jpeg"),
    ]
    # The bytes sent are exactly what prepare_photo makes (JPEG encoding is repeatable).
    assert [f.size for f in request.files] == [len(prepare_photo(path)) for path in paths]
    assert [f.size for f in request.files] != [path.stat().st_size for path in paths]
    assert [(c.endpoint, c.cost) for c in mock.ledger] == [("create_model", 50)]


async def test_an_unusable_photo_sends_nothing(mock: MockDeepMode, tmp_path: pathlib.Path) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(photo(1))
    tiny = tmp_path / "tiny.jpg"
    tiny.write_bytes(photo(2, size=(1, 1)))
    again = tmp_path / "again.jpg"
    again.write_bytes(photo(1))
    async with make_client(mock) as dm:
        with pytest.raises(TrainingSetError) as caught:
            await dm.models.create(
                images=[good, tiny, again], prepare=True, gender="woman", model_type="amateur"
            )
    message = str(caught.value)
    assert message.startswith("2 of 3 photos cannot be used, so nothing was sent:")
    assert f"{tiny}: 1 x 1 is below the minimum side of 256 px" in message
    assert f"{again}: a duplicate of {good}" in message
    assert [photo.source for photo in caught.value.training_set.photos] == [str(good)]
    assert mock.requests == []
    assert mock.ledger == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"image_urls": ["https://photos.example/1.jpg"], "prepare": True}, "image_urls"),
        ({"images": [b"x"], "prepare": "yes"}, "prepare must be True or False"),
    ],
)
async def test_prepare_arguments_are_checked_first(
    mock: MockDeepMode, arguments: dict[str, object], message: str
) -> None:
    async with make_client(mock) as dm:
        with pytest.raises(ValidationError, match=message):
            await dm.models.create(**arguments, gender="woman", model_type="amateur")  # type: ignore[call-overload]
    assert mock.requests == []


def test_the_blocking_client_prepares_too(tmp_path: pathlib.Path) -> None:
    paths = photos(tmp_path)
    with MockDeepMode() as mock, Client(mock.api_key, base_url=mock.base_url) as dm:
        dm.models.create(images=paths, prepare=True, gender="woman", model_type="amateur")
        (request,) = mock.requests
    assert [f.size for f in request.files] == [len(prepare_photo(path)) for path in paths]


def test_the_cli_prepares_with_prepare(tmp_path: pathlib.Path) -> None:
    paths = photos(tmp_path)
    tiny = tmp_path / "tiny.jpg"
    tiny.write_bytes(photo(2, size=(1, 1)))
    with MockDeepMode() as mock:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPMODE_")}
        env |= {"DEEPMODE_API_KEY": mock.api_key, "DEEPMODE_BASE_URL": mock.base_url}
        base = [str(DEEPMODE), "models", "create", "--gender", "man", "--model-type", "amateur"]
        refused, done = (
            subprocess.run(  # noqa: S603 (our own entry point)
                [*base, *map(str, files), "--prepare"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            for files in ([*paths, tiny], paths)
        )
        requests = list(mock.requests)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: 1 of 3 photos cannot be used, so nothing was sent")
    # In CLI terms: no Python call to make instead.
    assert refused.stderr.rstrip().endswith("Leave them out of the command"), refused.stderr
    assert "deepmode_async" not in refused.stderr
    assert done.returncode == 0, done.stderr
    (request,) = requests
    assert [f.size for f in request.files] == [len(prepare_photo(path)) for path in paths]
