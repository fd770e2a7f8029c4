"""A file that changes between its check and its upload fails clearly and costs nothing."""

from __future__ import annotations

import pathlib

import pytest
from conftest import write_photo

from deepmode_async import AsyncClient, DeepModeError
from deepmode_async._uploads import check_files, multipart
from deepmode_async.testing import MockDeepMode, sample_image

pytestmark = [pytest.mark.anyio, pytest.mark.dm(fast=False)]

FIELDS = [("gender", "woman"), ("model_type", "amateur")]


@pytest.fixture
def photo(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_photo(tmp_path / "me.jpg", len(sample_image("jpeg")) + 2_000_000)


async def send(dm: AsyncClient, photo: pathlib.Path, change: str) -> DeepModeError:
    files = await check_files("images", [photo])  # checked here...
    if change == "shrunk":
        photo.write_bytes(sample_image("jpeg"))
    elif change == "rewritten":  # the same size, other bytes
        data = bytearray(photo.read_bytes())
        data[-1000:] = bytes(1000)
        photo.write_bytes(data)
    elif change == "replaced":  # another file of the same size renamed over it
        other = photo.with_name("other.jpg")
        other.write_bytes(photo.read_bytes())
        other.replace(photo)
    else:
        photo.unlink()
    body = multipart(FIELDS, files)  # ...sent after the file changed
    with pytest.raises(DeepModeError) as caught:
        await dm._transport.call(
            "POST", "/api/models", idempotent=False, body=body, timeout=dm.timeout
        )
    return caught.value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("shrunk", "was changed or replaced since it was checked"),
        ("rewritten", "was changed or replaced since it was checked"),
        ("replaced", "was changed or replaced since it was checked"),
        ("deleted", "could not be opened"),
    ],
)
async def test_a_file_that_changes_mid_upload_is_a_clear_error(
    dm: AsyncClient, mock: MockDeepMode, photo: pathlib.Path, change: str, message: str
) -> None:
    error = await send(dm, photo, change)
    assert message in str(error)
    assert "'me.jpg'" in str(error)
    assert mock.ledger == []  # the server saw a body cut short and charged nothing
    assert (await dm.account.balance()).remaining_balance == mock.balance


async def test_a_retry_sends_the_whole_file_again(
    dm: AsyncClient, mock: MockDeepMode, photo: pathlib.Path
) -> None:
    mock.fail("create_model", 429, retry_after=0)
    await dm.models.create(images=[photo], gender="woman", model_type="amateur")
    first, second = (r for r in mock.requests if r.endpoint == "create_model")
    assert first.status == 429
    assert second.status == 200
    assert second.files[0].size == photo.stat().st_size


async def test_a_file_rewritten_in_place_during_its_upload_is_not_sent_as_is(
    dm: AsyncClient, mock: MockDeepMode, photo: pathlib.Path
) -> None:
    size = photo.stat().st_size

    def rewrite_the_rest(progress: object) -> None:  # after the first chunk went out
        if photo.stat().st_size == size and not rewritten:
            with photo.open("r+b") as file:
                file.seek(size // 2)
                file.write(bytes(size - size // 2))
            rewritten.append(True)

    rewritten: list[bool] = []
    with pytest.raises(DeepModeError, match="was changed or replaced while it was uploaded"):
        await dm.models.create(
            images=[photo], gender="woman", model_type="amateur", progress=rewrite_the_rest
        )
    assert rewritten
    assert mock.ledger == []  # the body was cut short: nothing charged
