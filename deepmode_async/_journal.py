"""The journal of a resumable batch (`generate_many(..., journal=...)`).

One record per request, under its index in the input, in a store: written before
the request is sent (so a crash after sending is never taken for "not sent"), and again
with its outcome when it ends, whether or not the consumer ever sees it. A rerun with
the same input reads the records a window at a time as the input advances (a journal
of a million requests is never loaded whole), and for each request decides: yield the
recorded result again, send it (never recorded, or failed where the server surely did
not act), or report that its outcome is unknown.

Writes from concurrent requests are grouped: whatever is waiting while one write is
in flight goes in the next, as one `put_many` (one SQLite transaction, one Redis round
trip), so a batch of any concurrency costs about one store trip per completion wave; a
request waits for the group commit it is in.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeAlias

import attrs

from ._convert import converter, structure
from ._downloads import file_names
from ._errors import (
    DeepModeError,
    OutcomeUnknownError,
    ResponseValidationError,
    StoreError,
    ValidationError,
)
from ._requests import GenerateRequest, generate_body
from ._retry import server_may_have_acted
from ._types import Generation, Image
from .stores import MemoryStore, SQLiteStore, Store, as_store

#: The store namespace of a batch's records.
NAMESPACE: Final = "journal"
#: Records read in one trip; also how far ahead of the batch the input is read to check
#: it against them (only where the journal has records).
WINDOW: Final = 512

#: What `journal=` accepts: a path (an SQLite file), a store, or a store URL.
JournalTarget: TypeAlias = "str | os.PathLike[str] | Store"
#: A fresh `Image` by id (`images.retrieve`): free, for files to be downloaded again.
Refresh: TypeAlias = Callable[[str], Awaitable[Image]]

#: The latest time a record can say it was sent (the end of year 9999).
_LATEST: Final = 253402300799.0

_log = logging.getLogger("deepmode_async")
_dumps: Final = json.JSONEncoder(separators=(",", ":")).encode  # made once: a record a call


@attrs.frozen
class Entry:
    """One request's record: what was sent and when, and its outcome once it ended."""

    request: dict[str, Any]
    sent_at: float
    generation: dict[str, Any] | None = None
    paths: tuple[str, ...] | None = None
    error: str | None = None
    acted: bool | None = None
    #: `request` and `sent_at` encoded: every record of a request starts with them, so
    #: they are encoded once, with the first.
    head: bytes = attrs.field(default=b"", eq=False, repr=False, kw_only=True)

    def encode(self) -> bytes:
        record = [self.head or self.encoded_head()]
        if self.generation is not None:
            record += b',"g":', _dumps(self.generation).encode()
        if self.paths is not None:
            record += b',"p":', _dumps(list(self.paths)).encode()
        if self.error is not None:
            record += b',"e":', _dumps(self.error).encode(), b',"a":', _dumps(self.acted).encode()
        record.append(b"}")
        return b"".join(record)

    def encoded_head(self) -> bytes:
        return _head(self.request, self.sent_at)

    def evolve(
        self,
        *,
        generation: dict[str, Any] | None = None,
        paths: tuple[str, ...] | None = None,
        error: str | None = None,
        acted: bool | None = None,
    ) -> Entry:
        """This record with those fields set (the others kept); cheaper than
        `attrs.evolve`, on every request's path."""
        return Entry(
            self.request,
            self.sent_at,
            self.generation if generation is None else generation,
            self.paths if paths is None else paths,
            self.error if error is None else error,
            self.acted if acted is None else acted,
            head=self.head or self.encoded_head(),
        )

    @classmethod
    def decode(cls, index: int, value: bytes) -> Entry:
        try:
            record = json.loads(value)
            paths, sent_at = record.get("p"), float(record["t"])
            if not 0.0 <= sent_at <= _LATEST:  # NaN too: a time datetime can show
                raise ValueError(sent_at)
            return cls(
                request=dict(record["q"]),
                sent_at=sent_at,
                generation=record.get("g"),
                paths=None if paths is None else tuple(str(path) for path in paths),
                error=record.get("e"),
                acted=record.get("a"),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            raise StoreError(
                f"the journal's record of requests[{index}] is not readable: the journal "
                "was written by something else, or damaged"
            ) from None

    def unknown_reason(self) -> str | None:
        """Why the server may have acted on this request with no recorded answer (None:
        the answer is recorded, or the server surely did not act)."""
        if self.generation is not None:
            return None
        if self.error is None:
            return "the run that sent it stopped before its answer was recorded"
        if self.acted:
            return f"it failed in a way that does not say whether it was carried out ({self.error})"
        return None


def _head(request: dict[str, Any], sent_at: float) -> bytes:
    # A finite float is written as its repr by `json` too; that spares the encoder's
    # slow path for a number.
    when = repr(sent_at) if math.isfinite(sent_at) else _dumps(sent_at)
    return b'{"q":%s,"t":%s' % (_dumps(request).encode(), when.encode())


def _is_file_in(path: pathlib.Path, directory: pathlib.Path) -> bool:
    return path.parent.resolve() == directory and path.is_file()


def _retrieve(done: asyncio.Future[None]) -> None:
    """A done-callback for a write no one awaits: its failure is logged, not left."""
    if not done.cancelled() and (error := done.exception()) is not None:
        _log.warning("journal: a record was not written: %s", error)


def open_journal(journal: object) -> tuple[Store, bool]:
    """The store of `journal=`, and whether the batch owns it (and so closes it)."""
    if isinstance(journal, Store):
        return journal, False
    if isinstance(journal, str) and "://" in journal:
        store = as_store(journal)
        if isinstance(store, MemoryStore):  # a new one each run: nothing would resume
            raise ValidationError(
                "journal='memory://' would be a new, empty MemoryStore for every run, so a "
                "rerun could never resume: pass a path (an SQLite file), another store's "
                "URL, or one MemoryStore() object that the runs share"
            )
        return store, True
    if isinstance(journal, str | os.PathLike):
        return SQLiteStore(journal), True
    raise ValidationError(
        "journal must be a path (an SQLite file), a Store or a store URL, not "
        f"{type(journal).__name__}"
    )


class BatchJournal:
    """A batch's journal: its records by index, grouped writes, and the resume rules."""

    def __init__(
        self,
        store: Store,
        *,
        owned: bool,
        resend_unknown: bool,
        refresh: Refresh,
        directory: pathlib.Path | None = None,
    ) -> None:
        self.store = store
        self.owned = owned
        self.resend_unknown = resend_unknown
        self.refresh = refresh
        #: Where this run downloads (`download_to`): a recorded file elsewhere is not one.
        self.directory = directory
        self._pending: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        #: Set when a request could not be recorded as sent: the batch starts no more
        #: (each would wait for the store and fail the same way) and raises it at the end.
        self.failure: StoreError | None = None

    # ------------------------------------------------------------------ reading

    async def window(self, start: int) -> dict[int, Entry]:
        """The records of requests `start` to `start + WINDOW - 1`, by index."""
        values = await self.store.get_many(
            NAMESPACE, [str(index) for index in range(start, start + WINDOW)]
        )
        return {
            start + offset: Entry.decode(start + offset, value)
            for offset, value in enumerate(values)
            if value is not None
        }

    @staticmethod
    def check(index: int, request: GenerateRequest, entry: Entry) -> None:
        """Refuse an input whose request `index` is not the one recorded there."""
        given = generate_body(request)
        if given != entry.request:
            differs = sorted(
                name
                for name in given.keys() | entry.request.keys()
                if given.get(name) != entry.request.get(name)
            )
            raise ValidationError(
                f"requests[{index}] is not the request this journal recorded at index "
                f"{index} (different {', '.join(differs)}): resume with the same input in "
                "the same order, or use a new journal for a new batch"
            )

    def unknown(self, index: int, request: GenerateRequest, entry: Entry) -> DeepModeError | None:
        """The `OutcomeUnknownError` to yield instead of sending again, if any."""
        reason = entry.unknown_reason()
        if reason is None or self.resend_unknown:
            return None
        sent_at = dt.datetime.fromtimestamp(entry.sent_at, dt.UTC)
        return OutcomeUnknownError(
            f"requests[{index}] (prompt {request.prompt!r}) was sent at "
            f"{sent_at.isoformat(timespec='seconds')} and may have been charged: {reason}; "
            "it is not sent again unless the batch runs with resend_unknown=True",
            index=index,
            request=request,
            sent_at=sent_at,
            reason=reason,
        )

    @staticmethod
    def recorded(index: int, entry: Entry) -> Generation | None:
        """The generation recorded for a request, if it has one. Raises `StoreError`
        when the record holds something that is not one (it was paid for: the request
        is not sent again)."""
        if entry.generation is None:
            return None
        try:
            return structure(entry.generation, Generation, f"requests[{index}]")
        except ResponseValidationError as error:
            raise StoreError(
                f"the journal's record of requests[{index}] holds an answer that is not "
                f"readable ({error}); it was answered once, so it is not sent again: the "
                "journal was written by something else, or damaged"
            ) from None

    async def missing_files(
        self,
        generation: Generation,
        paths: tuple[str, ...] | None,
        download: Callable[[Sequence[Image]], Awaitable[list[pathlib.Path]]],
    ) -> tuple[pathlib.Path, ...]:
        """The files of a recorded generation in this run's directory, those missing
        downloaded again (with fresh URLs from `refresh`: no charge).

        A file is there if it is the one recorded, or else (none recorded: a run whose
        download of another image failed records none; or recorded elsewhere) if one
        has the name the download gives it: downloads are atomic, so it is complete.
        """
        images = generation.images
        assert self.directory is not None, "files without a download directory"
        here = self.directory.resolve()
        recorded = [pathlib.Path(path) for path in paths] if paths is not None else []
        if len(recorded) != len(images):
            recorded = []
        found: list[pathlib.Path | None] = []
        for position, name in enumerate(file_names(images)):
            candidates = [recorded[position]] if recorded else []
            candidates.append(self.directory / name)
            found.append(next((path for path in candidates if _is_file_in(path, here)), None))
        wanted = [position for position, path in enumerate(found) if path is None]
        if wanted:
            fresh = [await self.refresh(images[position].id) for position in wanted]
            for position, path in zip(wanted, await download(fresh), strict=True):
                found[position] = path
        return tuple(path for path in found if path is not None)

    # ------------------------------------------------------------------ writing

    async def sent(self, index: int, request: GenerateRequest) -> Entry:
        """Record that request `index` is about to be sent; returns once it is durable.
        The request must go out only once this has returned."""
        body, now = generate_body(request), time.time()
        entry = Entry(body, now, head=_head(body, now))
        try:
            await self._write(index, entry)
        except StoreError as error:
            if self.failure is None:
                self.failure = StoreError(
                    f"the batch stopped: its journal could not record requests[{index}] "
                    f"before sending it ({error}), so it was not sent, and no request was "
                    "started after it (those in flight finished). Run the batch again with "
                    "the same journal to resume once the store works"
                )
            raise
        except asyncio.CancelledError:
            # Stopped before it was sent: the record, written all the same, is followed
            # by one that says so, or a rerun would take it for "may have been charged".
            stopped = entry.evolve(error="stopped before it was sent", acted=False)
            self._enqueue(index, stopped).add_done_callback(_retrieve)  # none waits for it
            raise
        return entry

    async def ended(self, index: int, entry: Entry) -> None:
        """Record a request's outcome. A store that fails is logged, not raised: the
        result is paid for and is yielded all the same (a rerun reports it unknown)."""
        try:
            await self._write(index, entry)
        except StoreError as error:
            _log.warning("journal: the outcome of requests[%d] was not recorded: %s", index, error)

    @staticmethod
    def succeeded(entry: Entry, generation: Generation) -> Entry:
        return entry.evolve(generation=converter.unstructure(generation))

    @staticmethod
    def failed(entry: Entry, error: DeepModeError) -> Entry:
        text = f"{type(error).__name__}: {error}"
        return entry.evolve(error=text, acted=server_may_have_acted(error))

    @staticmethod
    def downloaded(entry: Entry, paths: tuple[pathlib.Path, ...]) -> Entry:
        return entry.evolve(paths=tuple(str(path) for path in paths))

    async def _write(self, index: int, entry: Entry) -> None:
        # A waiter cancelled here cancels only its future: the record is written anyway.
        await self._enqueue(index, entry)

    def _enqueue(self, index: int, entry: Entry) -> asyncio.Future[None]:
        """Queue a record for the next group write (after those queued before it)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((str(index), entry.encode(), done))
        if self._writer is None:
            self._writer = loop.create_task(self._write_pending())
        return done

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                # The writes made in this turn of the loop join this one; those made
                # while it is in flight go in the next. A timed wait to gather more
                # would delay every request by as much, for fewer trips only when few
                # requests are in flight, where a trip costs little.
                await asyncio.sleep(0)
                group, self._pending = self._pending, []
                latest = {key: value for key, value, _ in group}  # one write per key
                try:
                    await self.store.put_many(NAMESPACE, list(latest.items()))
                except Exception as error:
                    for *_, done in group:
                        if not done.done():
                            done.set_exception(error)
                    continue
                for *_, done in group:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._writer = None

    async def aclose(self) -> None:
        """Wait for the writes under way, then close the store if the batch opened it."""
        writer = self._writer
        if writer is not None:
            await asyncio.gather(writer, return_exceptions=True)
        if self.owned:
            await self.store.aclose()
