"""`dm.images.generate_many`: a batch of `generate` calls, optionally journalled."""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Sequence
from typing import TYPE_CHECKING, overload

from .. import _validate as check
from .._downloads import DOWNLOAD_CONCURRENCY, Downloader, check_destination
from .._errors import ValidationError
from .._journal import BatchJournal, open_journal
from .._requests import GenerateRequest
from .._timeout import Timeout
from .._types import Generation, Image
from ..batch import (
    BatchDownloaded,
    BatchFailure,
    BatchProgressCallback,
    BatchSuccess,
    run_batch,
)
from ..stores import Store
from ._base import Resource


class Batching(Resource):
    """`generate_many` of `dm.images`, on its `generate` and `retrieve` calls."""

    _downloader: Downloader

    if TYPE_CHECKING:  # what `Images` provides

        async def _generate(
            self, request: GenerateRequest, timeout: Timeout | float | None
        ) -> Generation: ...

        async def retrieve(
            self, image_id: str, *, timeout: Timeout | float | None = None
        ) -> Image: ...

    @overload
    def generate_many(
        self,
        requests: Iterable[GenerateRequest] | AsyncIterable[GenerateRequest],
        *,
        concurrency: int = 8,
        download_to: None = None,
        progress: BatchProgressCallback | None = None,
        timeout: Timeout | float | None = None,
        journal: str | os.PathLike[str] | Store | None = None,
        resend_unknown: bool = False,
    ) -> AsyncGenerator[BatchSuccess | BatchFailure, None]: ...

    @overload
    def generate_many(
        self,
        requests: Iterable[GenerateRequest] | AsyncIterable[GenerateRequest],
        *,
        concurrency: int = 8,
        download_to: str | os.PathLike[str],
        progress: BatchProgressCallback | None = None,
        timeout: Timeout | float | None = None,
        journal: str | os.PathLike[str] | Store | None = None,
        resend_unknown: bool = False,
    ) -> AsyncGenerator[BatchDownloaded | BatchFailure, None]: ...

    async def generate_many(
        self,
        requests: Iterable[GenerateRequest] | AsyncIterable[GenerateRequest],
        *,
        concurrency: int = 8,
        download_to: str | os.PathLike[str] | None = None,
        progress: BatchProgressCallback | None = None,
        timeout: Timeout | float | None = None,
        journal: str | os.PathLike[str] | Store | None = None,
        resend_unknown: bool = False,
    ) -> AsyncGenerator[BatchSuccess | BatchDownloaded | BatchFailure, None]:
        """Generate for many requests at once; yield a `BatchResult` as each completes.

        `requests` (`GenerateRequest`s, from an iterable or an async iterable) are taken
        one by one as slots free up, so an endless generator works, and at most
        `concurrency` are in flight. Every request yields exactly one result: a failure
        is its result's `.error` and never stops the others. A 429 slows the whole
        batch down (it waits as the server asks, and fewer requests go at once for a
        while) instead of every request retrying on its own. Results are
        `BatchSuccess` (`BatchDownloaded` with `download_to`) or `BatchFailure`, so
        `if result.ok:` narrows `result.generation` (and `result.paths`) for a type
        checker.

        With `download_to`, each generation's images are downloaded into that directory
        as soon as it completes (`.paths`), atomically, as `download` does. `progress`
        is called with a `BatchProgress` as requests start and finish; if it raises, no
        more requests start, those in flight are yielded, and then it raises
        `ProgressCallbackError`.

        `journal` (a path: an SQLite file; or a `Store`, or a store URL such as
        `redis://...`) makes the batch resumable: each request is recorded before it is
        sent and its outcome when it ends, yielded or not. Run the batch again with the
        same input and journal after a crash, a kill or Ctrl+C: recorded results are
        yielded again without a call (`resumed=True`; with `download_to`, missing files
        are downloaded again through `retrieve`, free); a request sent with no recorded
        answer (it may have been charged) yields `OutcomeUnknownError` and is not sent
        again unless `resend_unknown=True`; one that failed where the server surely did
        not act is sent again. An input that differs from the journal's records raises
        `ValidationError` naming the first index that differs, before any call of that
        stretch of the input (the first `512` requests: before any call at all). A
        journal holds one batch: use a new file (or store) for a new batch. Resumed
        images carry the URLs recorded with them, which expire: `retrieve` signs anew.
        A journal that cannot record a request before it is sent (its file locked past
        the store's timeout, its Redis down) fails that request with `StoreError`
        (nothing sent), starts no more, and raises `StoreError` once those in flight
        have yielded.

        Breaking out of the loop, or cancelling it, cancels what is in flight and waits
        for it to clean up; use `contextlib.aclosing` around the iterator for this to
        happen at the `break` itself rather than when the iterator is collected (the
        blocking `Client` does it at the `break`). An input that fails (or holds
        something other than a `GenerateRequest`) starts no more requests; those in
        flight still yield, then its error is raised. A plain iterable is read on the
        event loop, so it should not block; arguments are checked when iteration starts.
        """
        concurrency = check.positive("concurrency", concurrency)
        if progress is not None and not callable(progress):
            raise ValidationError("progress must be a callable or None")
        directory = check_destination(download_to) if download_to is not None else None
        call_timeout = self._timeout(timeout)

        async def generate(request: GenerateRequest) -> Generation:
            return await self._generate(request, call_timeout)

        async def download(images: Sequence[Image]) -> list[pathlib.Path]:
            assert directory is not None
            # `directory` was checked once for the batch; should it go away later,
            # writing into it fails as a `DownloadError` ("cannot write"), the
            # generation kept.
            return await self._downloader.download(
                images,
                directory,
                concurrency=DOWNLOAD_CONCURRENCY,
                overwrite=False,
                progress=None,
                timeout=call_timeout,
            )

        recorder = None
        if journal is not None:
            check.boolean("resend_unknown", resend_unknown)
            store, owned = open_journal(journal)

            async def refresh(image_id: str) -> Image:
                return await self.retrieve(image_id, timeout=call_timeout)

            recorder = BatchJournal(
                store,
                owned=owned,
                resend_unknown=resend_unknown,
                refresh=refresh,
                directory=directory,
            )
        results = run_batch(
            requests,
            generate=generate,
            download=download if directory is not None else None,
            concurrency=concurrency,
            progress=progress,
            journal=recorder,
        )
        async with contextlib.aclosing(results):
            async for result in results:
                yield result
