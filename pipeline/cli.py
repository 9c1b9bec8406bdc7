"""The ``bms`` command: one subcommand per module, each registering itself.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed arguments and returning the exit code. A command that runs a pipeline
sets ``beam_args_allowed=True`` and receives Apache Beam's own options (``--runner``,
``--flink_master``, ...) in ``args.beam_args``. Modules are imported lazily by name so that
``bms --help`` stays fast and optional dependencies load only when used.

Arguments are strict: an option no parser knows is an error (exit 2) with a did-you-mean, and
no option may be abbreviated, so a typo never starts a different job.

Exit codes, the same for every subcommand: 0 success, 1 a difference found (``bms parity``),
2 a usage error, 3 a runtime failure (a database down past its deadline, a lost lease...),
130 interrupted. Errors are one line; ``-v`` adds the full trace and Beam's logs.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import logging
import sys
import traceback
from importlib import metadata

from pipeline.errors import (
    EXIT_INTERRUPTED,
    EXIT_RUNTIME_FAILURE,
    EXIT_USAGE,
    RuntimeFailure,
    UsageError,
)

COMMAND_MODULES = (
    "pipeline.commands.demo",
    "producers.cli",
    "pipeline.commands.replay",
    "pipeline.commands.run",
    "pipeline.commands.parity",
    "pipeline.commands.status",
    "pipeline.commands.report",
    "pipeline.commands.hub",
)


class _HideGcpNotice(logging.Filter):
    """Beam warns on import that Google Cloud client libraries are missing; we never use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def _version() -> str:
    try:
        return metadata.version("bms-streaming")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bms",
        description="BookMyShow booking/payment streaming join: an Apache Beam alternative "
        "to the Azure Stream Analytics job.",
        epilog="exit codes: 0 ok, 1 difference found (parity), 2 usage error, 3 runtime "
        "failure, 130 interrupted",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"bms {_version()}")
    _add_verbosity(parser, default=0)
    subparsers = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False),
    )
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for subparser in subparsers.choices.values():
        # Also after the subcommand (bms run -v); absent there, the value before it holds.
        _add_verbosity(subparser, default=argparse.SUPPRESS)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const=1,
        dest="verbosity",
        default=default,
        help="full traces on errors, and Apache Beam's and the runner's logs",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        default=default,
        help="errors only",
    )


def _configure_logging(verbosity: int) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_HideGcpNotice())
    level = {1: logging.INFO, 0: logging.WARNING, -1: logging.ERROR}[verbosity]
    logging.getLogger().setLevel(level)
    # Beam's own warnings (runner internals, option parsing) are noise unless asked for.
    logging.getLogger("apache_beam").setLevel(level if verbosity > 0 else logging.ERROR)


def beam_options_parser() -> argparse.ArgumentParser:
    """A parser of every option Apache Beam knows (and ours, which are Beam options too), built
    as Beam builds it."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    import pipeline.options  # noqa: F401  (registers BmsOptions with Beam)

    parser = _BeamArgumentParser(allow_abbrev=False)
    seen = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)
    return parser


def _did_you_mean(option: str, known: list[str]) -> str:
    close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown_option(extra: list[str], known: list[str]) -> str | None:
    """The first of ``extra`` that names no option in ``known``, as a one-line message."""
    for argument in extra:
        if argument == "--":
            return None
        if argument.startswith("-"):
            option = argument.split("=", 1)[0]
            if option not in known:
                return f"unknown option {option}{_did_you_mean(option, known)}"
    return None


def _check_extra(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]):
    command = parser._subparsers._group_actions[0].choices[args.command]
    ours = list(command._option_string_actions)
    if not getattr(args, "beam_args_allowed", False):
        problem = _unknown_option(extra, ours) or f"unexpected argument {extra[0]}"
        command.error(problem)
    beam = beam_options_parser()
    known, unknown = beam.parse_known_args(extra)
    problem = _unknown_option(unknown, [*ours, *beam._option_string_actions])
    if problem is None and unknown:
        problem = f"unexpected argument {unknown[0]}"
    if problem:
        command.error(f"{problem} (Apache Beam's options are accepted too: see {command.prog} -h)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _configure_logging(args.verbosity)
    if extra:
        _check_extra(parser, args, extra)
    args.beam_args = extra
    try:
        return args.func(args)
    except UsageError as error:
        print(f"bms {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeFailure as error:
        _print_failure(args, error)
        return EXIT_RUNTIME_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:  # a failure nobody foresaw: still one line, the trace with -v
        _print_failure(args, f"{type(error).__name__}: {_first_line(error)}", error)
        return EXIT_RUNTIME_FAILURE


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _print_failure(args: argparse.Namespace, message, error: BaseException | None = None) -> None:
    """One line; for an error nobody foresaw, with -v its full trace before it."""
    hint = ""
    if error is not None:
        if args.verbosity > 0:
            traceback.print_exception(error, file=sys.stderr)
        else:
            hint = " (-v shows the full trace)"
    print(f"bms {args.command}: {message}{hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
