"""What the CLI shows: one-line results, JSON, and progress bars on a terminal."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import pathlib
import sys
from collections.abc import Iterator
from typing import Any, Final

import attrs

from .._errors import OutcomeUnknownError
from .._types import Image, RemixResult
from .._validate import MAX_TRAINING_IMAGES
from ..batch import BatchResult


def one_line(error: BaseException) -> str:
    """An error as one line: what a person reads on stderr."""
    return " ".join(str(error).split()) or type(error).__name__


#: Python phrasing left in SDK messages the CLI cannot say otherwise, and its CLI form.
_IN_CLI_TERMS: Final = (("pass api_key= instead", "give --api-key instead"),)


def in_cli_terms(error: BaseException) -> str:
    """`one_line(error)` with the advice a Python caller gets (`resend_unknown=True`,
    `prepare_training_set`...) given as the command's flags instead; the SDK's own
    messages stay as library users need them."""
    if isinstance(error, OutcomeUnknownError):
        return (
            f"sent at {error.sent_at.isoformat(timespec='seconds')} by an earlier run and "
            f"may have been charged: {error.reason}; it is not sent again unless the "
            "command runs with --resend-unknown"
        )
    prep = sys.modules.get("deepmode_async.prep")  # not loaded: not one of its errors
    if prep is not None and isinstance(error, prep.TrainingSetError):
        training_set = error.training_set
        total = len(training_set.photos) + len(training_set.skipped)
        if training_set.skipped and 1 <= len(training_set.photos) <= MAX_TRAINING_IMAGES:
            reasons = "; ".join(f"{s.source}: {s.reason}" for s in training_set.skipped)
            return (
                f"{len(training_set.skipped)} of {total} photos cannot be used, so nothing "
                f"was sent: {reasons}. Leave them out of the command"
            )
    text = one_line(error)
    for python, cli in _IN_CLI_TERMS:
        text = text.replace(python, cli)
    return text


def say(message: str) -> None:
    """A note on how things go, on stderr, so that stdout holds only the results."""
    print(message, file=sys.stderr, flush=True)


def emit(options: argparse.Namespace, value: Any, text: str) -> None:
    """A result: `value` as JSON with `--json`, else `text`."""
    print(dumps(jsonable(value)) if options.json else text, flush=True)


def dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default)


def jsonable(value: Any) -> Any:
    """Data classes (and lists of them) as JSON-ready values."""
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, BatchResult):
        return {
            "index": value.index,
            "prompt": value.request.prompt,
            "ok": value.ok,
            "generation": jsonable(value.generation) if value.generation else None,
            "paths": jsonable(value.paths) if value.paths is not None else None,
            "error": in_cli_terms(value.error) if value.error is not None else None,
            "error_type": type(value.error).__name__ if value.error is not None else None,
        }
    if isinstance(value, pathlib.Path):
        return str(value)
    if attrs.has(type(value)):
        return attrs.asdict(value, recurse=True)
    return value


def _json_default(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)  # enums are strings already; paths


def image_line(image: Image | RemixResult) -> str:
    return f"{image.id} {image.image_url}"


def describe(result: BatchResult) -> str:
    """One batch result as a line: its paths, its images, or why it failed."""
    if result.error is not None:
        return f"[{result.index}] failed: {in_cli_terms(result.error)}"
    assert result.generation is not None
    if result.paths is not None:
        return f"[{result.index}] " + " ".join(str(path) for path in result.paths)
    return f"[{result.index}] " + " ".join(image_line(image) for image in result.generation.images)


class Bar:
    """One rich progress bar; `update` moves it (and may learn the total late)."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress = progress
        self._task = task

    def update(self, completed: int, total: int | None = None) -> None:
        self._progress.update(self._task, completed=completed, total=total)


@contextlib.contextmanager
def progress_bar(
    options: argparse.Namespace, description: str, total: int | None, *, in_bytes: bool = False
) -> Iterator[Bar | None]:
    """A transient progress bar on stderr when it is a terminal and rich (the `cli`
    extra) is installed; otherwise None, and the command prints plain lines."""
    if options.json or not sys.stderr.isatty():
        yield None
        return
    try:
        from rich import progress
        from rich.console import Console
    except ImportError:
        yield None
        return
    amount = progress.DownloadColumn() if in_bytes else progress.MofNCompleteColumn()
    columns = (
        progress.TextColumn("{task.description}"),
        progress.BarColumn(),
        amount,
        progress.TimeElapsedColumn(),
    )
    # Results printed while the bar shows go above it when stdout is the same terminal,
    # and straight to stdout when it is a file or a pipe.
    bars = progress.Progress(
        *columns,
        transient=True,
        console=Console(stderr=True),
        redirect_stdout=sys.stdout.isatty(),
    )
    with bars:
        yield Bar(bars, bars.add_task(description, total=total))
