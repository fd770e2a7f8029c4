"""`deepmode generate`'s batches: prompts streamed from their file, results counted.

A batch of a million prompts must not hold a million requests or results: the prompts
file is read twice, once to count and check every request before any call (a bad line
costs nothing), once as the batch goes; results are printed as they come and counted,
and kept only where all of them are needed at the end (`--json`, the demo).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import pathlib
import stat
import sys
from collections.abc import Iterable, Iterator

import attrs

from .._client import AsyncClient
from .._errors import OutcomeUnknownError, StoreError, ValidationError
from .._requests import GenerateRequest
from ..batch import BatchResult
from ._terminal import describe, dumps, image_line, jsonable, progress_bar, say


class Requests:
    """The requests of `generate`: `--prompt` `--count` times, or a `--prompts-file` a
    call a line (blank lines skipped, lines split as `str.splitlines` does). Every one
    is checked when this is made; iterating makes them again, as they are needed. A
    prompts file that is not a regular file (a pipe, `/dev/stdin`) can be read once
    only: its prompts are kept."""

    def __init__(self, options: argparse.Namespace) -> None:
        self._options = options
        self._file: pathlib.Path | None = None
        self._kept: list[str] | None = None
        if options.prompts_file is not None:
            if options.prompt is not None:
                raise ValidationError("give --prompt or --prompts-file, not both")
            if options.count != 1:
                raise ValidationError("--count is for --prompt; --prompts-file makes a call a line")
            self._file = pathlib.Path(options.prompts_file)
            try:
                regular = stat.S_ISREG(self._file.stat().st_mode)
            except OSError as exc:
                raise ValidationError(f"cannot read --prompts-file: {exc}") from None
            if not regular:
                self._kept = list(self._lines())
            requests = map(self._request, self._prompts())
            first = next(requests, None)
            if first is None:
                raise ValidationError("--prompts-file has no prompts (one a line)")
            self.first: GenerateRequest = first
            self.count = 1 + sum(1 for _ in requests)
            return
        if options.prompt is None:
            raise ValidationError("give --prompt or --prompts-file")
        if options.count < 1:
            raise ValidationError(f"--count must be at least 1, not {options.count}")
        self.first = self._request(options.prompt)  # the same request each time
        self.count = options.count

    def __iter__(self) -> Iterator[GenerateRequest]:
        if self._file is None:
            return itertools.repeat(self.first, self.count)
        return map(self._request, self._prompts())

    def _prompts(self) -> Iterable[str]:
        return self._kept if self._kept is not None else self._lines()

    def _request(self, prompt: str) -> GenerateRequest:
        options = self._options
        return GenerateRequest(
            model_id=options.model_id,
            prompt=prompt,
            negative_prompt=options.negative_prompt,
            num_images=options.num_images,
            upscale=options.upscale,
            ratio=options.ratio,
        )

    def _lines(self) -> Iterator[str]:
        """The file's prompts, read a line at a time (bytes, so that a line that is not
        UTF-8 is named by its number)."""
        assert self._file is not None
        try:
            with self._file.open("rb") as lines:
                for number, raw in enumerate(lines, 1):
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise ValidationError(
                            f"cannot read --prompts-file: line {number} is not UTF-8 text "
                            f"({exc.reason} at byte {exc.start + 1} of the line)"
                        ) from None
                    for line in text.splitlines():
                        if prompt := line.strip():
                            yield prompt
        except OSError as exc:
            raise ValidationError(f"cannot read --prompts-file: {exc}") from None


@attrs.define
class Tally:
    """What a batch's results came to, counted as they arrive; the results themselves
    are kept only with `keep`."""

    keep: bool
    kept: list[BatchResult] = attrs.Factory(list)
    total: int = 0
    failed: int = 0
    resumed: int = 0
    unknown: int = 0
    #: Failed before they were sent: the journal could not record them (the batch then
    #: stops; a rerun sends them).
    unsent: int = 0

    def add(self, result: BatchResult) -> None:
        self.total += 1
        self.failed += not result.ok
        self.resumed += result.resumed
        self.unknown += isinstance(result.error, OutcomeUnknownError)
        self.unsent += isinstance(result.error, StoreError) and not result.resumed
        if self.keep:
            self.kept.append(result)

    @property
    def results(self) -> list[BatchResult]:
        """The results kept, in the order of the requests."""
        return sorted(self.kept, key=lambda result: result.index)

    def journal_summary(self) -> str:
        """How a journalled batch went: results resumed, calls sent, unknown and failed
        (an unknown one is resumed and failed too: counted as unknown only; failed
        counts the resumed and sent that failed, and those not sent)."""
        resumed = self.resumed - self.unknown
        sent = self.total - resumed - self.unknown - self.unsent
        failed = self.failed - self.unknown
        text = f"journal: {resumed} resumed, {sent} sent, "
        if self.unsent:
            text += f"{self.unsent} not sent (the journal could not record them), "
        text += f"{self.unknown} unknown, {failed} failed"
        if self.unknown:
            text += " (unknown: sent earlier, may have been charged; --resend-unknown sends them)"
        return text


async def generate_batch(
    options: argparse.Namespace,
    dm: AsyncClient,
    requests: Iterable[GenerateRequest],
    *,
    total: int,
    keep: bool,
) -> Tally:
    """Run `requests` (`total` of them) through `generate_many`, a line (or a bar) per
    result; `keep` keeps the results in the tally.

    With `--journal`, a summary (resumed, sent, unknown, failed) goes to stderr at the
    end, also when the batch is interrupted, saying how to resume it.
    """
    tally = Tally(keep=keep)
    journal = getattr(options, "journal", None)
    try:
        with progress_bar(options, "generating", total) as bar:
            report = None if bar is None else lambda p: bar.update(p.completed)
            async with contextlib.aclosing(
                dm.images.generate_many(
                    requests,
                    concurrency=options.concurrency,
                    download_to=options.out,
                    progress=report,
                    journal=journal,
                    resend_unknown=getattr(options, "resend_unknown", False),
                )
            ) as stream:
                async for result in stream:
                    tally.add(result)
                    if options.json:
                        continue
                    if not result.ok and result.generation is not None:
                        # Paid for, its download failed: the images (ids, URLs) still
                        # go out, so that `deepmode download ID` can fetch them.
                        images = " ".join(map(image_line, result.generation.images))
                        print(f"[{result.index}] {images}", flush=True)
                    # A failure's detail goes with the other failure lines, on stderr.
                    where = sys.stdout if result.ok else sys.stderr
                    print(describe(result), file=where, flush=True)
    except BaseException as error:
        # Stopped by a signal (a cancel inside the loop), or failed part way: what was
        # paid for so far is shown still, as JSON too.
        if options.json and tally.total:
            print(dumps(jsonable(tally.results)))
        if journal is not None and (tally.total or isinstance(error, asyncio.CancelledError)):
            say(f"{tally.journal_summary()}; interrupted: run the same command to resume")
        raise
    if journal is not None:
        say(tally.journal_summary())
    return tally
