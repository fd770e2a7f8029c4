"""`deepmode`, the command line: the SDK's calls from a shell (also `python -m deepmode_async`).

Options mirror the Python parameter names with dashes (`--model-id`, `--num-images`).
The key and base URL come from `--api-key` / `--base-url` or the same environment
variables as `AsyncClient`. `--json` prints machine-readable output on stdout. A failure
prints one line on stderr and exits non-zero (1 for an API failure, 2 for bad
arguments, 130 when interrupted, 143 on SIGTERM); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Final, NoReturn

from .._errors import DeepModeError, ValidationError
from .._mock_options import add_mock_options
from .._types import Gender, ModelType, Ratio, RemixMode
from .._version import __version__
from . import _commands, _demo
from ._hub import add_hub_options
from ._signals import Terminated
from ._terminal import in_cli_terms, one_line

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "add_mock_options", "main"]

#: Exit codes: an API or network failure, arguments refused before any request, Ctrl+C.
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

#: `deepmode mock serve`'s port: not 8000, which uvicorn (and so the FastAPI example) takes.
MOCK_SERVE_PORT: Final = 8765


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run one command and exit with its status."""
    parser = _parser()
    options = parser.parse_args(argv)
    if options.run is None:
        parser.print_help(sys.stderr)
        sys.exit(EXIT_USAGE)
    log = logging.getLogger("deepmode_async")
    if options.debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    elif "DEEPMODE_LOG" not in os.environ:
        # Retry warnings would otherwise reach stderr through logging's last resort,
        # breaking the one-line error; DEEPMODE_LOG or --debug show them.
        log.addHandler(logging.NullHandler())
    try:
        if options.makes_client:
            _commands.check_client_options(options)
        options.run(options)
    except KeyboardInterrupt:
        if options.debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Terminated as stop:
        if options.debug:
            raise
        print(one_line(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except BrokenPipeError:
        # The reader went away (`deepmode generate ... | head`): stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILED)
    except DeepModeError as error:  # before OSError: CallbackTimeoutError is a TimeoutError
        if options.debug:
            raise
        if isinstance(error, ValidationError):
            print(f"error: {_as_option(in_cli_terms(error), options.parser)}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        print(f"error: {in_cli_terms(error)}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except OSError as error:  # the output cannot be written (`> /dev/full`: a full disk)
        if options.debug:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: cannot write the output: {error.strerror or error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    sys.exit(0)


#: SDK parameters whose option has another name.
_OPTION_DESTS: Final = {"dest": "out", "public_base_url": "public_url"}
#: Where a command has no option of the parameter's name: the one that gives it.
_FALLBACK_DESTS: Final = {"images": "photos"}  # `demo --photo`


def _as_option(message: str, parser: argparse.ArgumentParser) -> str:
    """An SDK `ValidationError` message, which starts with the parameter at fault, with
    that parameter named as the command's option: `image_urls[0] must be...` becomes
    `--image-url #1 must be...`, `images: '...' does not exist` becomes `PHOTO: ...`."""
    found = re.match(r"([a-z_]+)(?:\[(\d+)\])?", message)
    if found is None:
        return message
    dest = _OPTION_DESTS.get(found[1], found[1])
    dests = {action.dest for action in parser._actions}
    if dest not in dests:
        dest = _FALLBACK_DESTS.get(dest, dest)
    for action in parser._actions:
        if action.dest == dest and action.help != argparse.SUPPRESS:
            name = max(action.option_strings, key=len) if action.option_strings else None
            name = name or str(action.metavar or dest.upper())
            number = f" #{int(found[2]) + 1}" if found[2] is not None else ""
            return name + number + message[found.end() :]
    return message


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, unless its help says it already or there is
    none worth showing (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if (
            "(default" in (action.help or "")
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
        ):
            return action.help
        return super()._get_help_string(action)


def _common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The client's options. The top-level parser holds their defaults; a command's copy
    has none (SUPPRESS), so that `deepmode --api-key K balance` is not undone by the
    command's own default, and the one given after the command wins."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--api-key", default=default(None), help="API key (default: $DEEPMODE_API_KEY)"
    )
    parser.add_argument(
        "--base-url",
        default=default(None),
        help="API base URL (default: $DEEPMODE_BASE_URL, else https://api.deepmode.ai)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(None),
        metavar="SECONDS",
        help="longest wait for each piece of an answer (default: 600)",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=default(None),
        metavar="N",
        help="tries after the first (default: 2)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable output"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="show tracebacks and requests",
    )


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, defaults=False)

    parser = argparse.ArgumentParser(
        prog="deepmode",
        description="The DeepMode image API from the command line. The options above the "
        "commands go before or after the command.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common_options(parser, defaults=True)
    parser.set_defaults(run=None, makes_client=False)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        run: object,
        help: str,
        *,
        with_common: bool = True,
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(
            name,
            parents=[common] if with_common else [],
            help=help,
            description=help,
            formatter_class=_HelpFormatter,
        )
        sub.set_defaults(run=run, parser=sub, makes_client=with_common)
        return sub

    command(commands, "balance", _commands.balance, "remaining credits")

    models = commands.add_parser(
        "models", help="train and extend personal models", formatter_class=_HelpFormatter
    )
    models.set_defaults(run=None)
    model_commands = models.add_subparsers(title="models commands", metavar="COMMAND")
    create = command(
        model_commands, "create", _commands.models_create, "train a model (50 credits)"
    )
    create.add_argument("images", nargs="*", metavar="PHOTO", help="1-30 photos (paths)")
    create.add_argument(
        "--image-url",
        dest="image_urls",
        action="append",
        default=[],
        metavar="URL",
        help="a public photo URL instead of files (repeat for each)",
    )
    _add_model_options(create, required=True)
    create.add_argument("--name", help="a name for the model")
    create.add_argument(
        "--prepare",
        action="store_true",
        help="make the photos upright 640x640 JPEGs without metadata first (images extra)",
    )
    create.add_argument("--callback", metavar="URL", help="where the API POSTs the model")
    create.add_argument(
        "--wait", action="store_true", help="wait for training; print the model (its id)"
    )
    create.add_argument(
        "--wait-timeout", type=float, default=3 * 3600.0, metavar="SECONDS", help="with --wait"
    )
    add_hub_options(create)
    extend = command(model_commands, "extend", _commands.models_extend, "30 more days (20 credits)")
    extend.add_argument("model_id", metavar="MODEL_ID")

    generate = command(
        commands, "generate", _commands.generate, "generate images (one call, or a batch)"
    )
    generate.add_argument("--model-id", required=True, help="a trained model's id")
    generate.add_argument("--prompt", help="what to paint")
    generate.add_argument("--negative-prompt", help="what to keep out")
    generate.add_argument("--num-images", type=int, default=1, help="1-8 a call")
    generate.add_argument("--upscale", action="store_true", help="upscale the images too")
    generate.add_argument(
        "--ratio",
        choices=[ratio.value for ratio in Ratio],
        default="portrait",
        help="the images' shape",
    )
    generate.add_argument("--count", type=int, default=1, help="calls with --prompt")
    generate.add_argument("--prompts-file", help="one prompt a line, one call each")
    generate.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    generate.add_argument("--out", help="download the images into this directory")
    generate.add_argument("--callback", metavar="URL", help="callback mode: one call only")
    generate.add_argument(
        "--journal",
        metavar="FILE",
        help="record the batch in this SQLite file (or store URL); run again to resume",
    )
    generate.add_argument(
        "--resend-unknown",
        action="store_true",
        help="with --journal: send again requests whose outcome was never recorded",
    )

    upscale = command(commands, "upscale", _commands.upscale, "upscale an image x4 (3 credits)")
    upscale.add_argument("image_id", metavar="IMAGE_ID")
    upscale.add_argument("--out", help="download the upscaled image into this directory")
    upscale.add_argument("--callback", metavar="URL", help="callback mode")

    remix = command(
        commands,
        "remix",
        _commands.remix,
        "paint a model's subject (--model-id) or a face (--identity-image) into artwork",
    )
    remix.add_argument("--model-id", help="a trained model (remix)")
    remix.add_argument("--identity-image", metavar="PHOTO", help="a face (face-id remix)")
    remix.add_argument("--artwork-image", required=True, metavar="IMAGE")
    remix.add_argument("--mask-image", required=True, metavar="IMAGE", help="white: repaint")
    remix.add_argument("--prompt", default="", help="what to paint")
    remix.add_argument("--negative-prompt", default="", help="what to keep out")
    remix.add_argument(
        "--mode",
        choices=[mode.value for mode in RemixMode],
        default="sync",
        help="async: answer before the image is ready",
    )
    remix.add_argument("--out", help="download the result into this directory")

    download = command(
        commands, "download", _commands.download, "download images by id (fresh signed URLs)"
    )
    download.add_argument("image_ids", nargs="+", metavar="IMAGE_ID")
    download.add_argument("--out", default=".", help="directory (default: here)")
    download.add_argument("--concurrency", type=int, default=16, help="downloads at a time")
    download.add_argument("--overwrite", action="store_true", help="replace files of the same name")

    demo = command(
        commands, "demo", _demo.demo, "the whole flow against the embedded mock (or --live)"
    )
    demo.add_argument("--out", default="deepmode-demo", help="where the images go")
    demo.add_argument(
        "--live", action="store_true", help="against the real API: spends your credits"
    )
    demo.add_argument(
        "--photo",
        dest="photos",
        action="append",
        default=[],
        metavar="PATH",
        help="with --live: a photo to train from (repeat, 1-30)",
    )
    _add_model_options(demo, required=False)
    demo.add_argument("--yes", action="store_true", help="with --live: do not ask")
    add_hub_options(demo)

    mock = commands.add_parser("mock", help="the embedded mock API", formatter_class=_HelpFormatter)
    mock.set_defaults(run=None)
    mock_commands = mock.add_subparsers(title="mock commands", metavar="COMMAND")
    serve = command(
        mock_commands,
        "serve",
        _commands.mock_serve,
        "serve the mock on 127.0.0.1; prints the base URL and the key",
        with_common=False,
    )
    # Not uvicorn's 8000 (the FastAPI example's), so both can run side by side.
    # `deepmode --api-key K mock serve` sets the key too: the command's default must
    # not undo the one given before it (mock_serve falls back to the mock's key). An
    # action's SUPPRESS, not set_defaults', which would store the marker itself.
    add_mock_options(serve, port=MOCK_SERVE_PORT, api_key=argparse.SUPPRESS)
    return parser


def _add_model_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    defaults = {} if required else {"gender": "woman", "model_type": "amateur"}
    parser.add_argument(
        "--gender",
        required=required,
        choices=[gender.value for gender in Gender],
        default=defaults.get("gender"),
        help="the subject's",
    )
    parser.add_argument(
        "--model-type",
        required=required,
        choices=[model_type.value for model_type in ModelType],
        default=defaults.get("model_type"),
        help="the kind of photos the model makes",
    )
