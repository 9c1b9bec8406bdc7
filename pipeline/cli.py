"""The ``bms`` command: one subcommand per module, each registering itself.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed arguments and returning the exit code. A command that runs a pipeline
sets ``beam_args_allowed=True`` and receives the arguments it does not know (``--runner`` and
other Beam options) in ``args.beam_args``. Modules are imported lazily by
name so that ``bms --help`` stays fast and optional dependencies load only when used.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.errors import EXIT_RUNTIME_FAILURE, EXIT_USAGE, RuntimeFailure, UsageError

COMMAND_MODULES = (
    "pipeline.commands.demo",
    "producers.cli",
    "pipeline.commands.replay",
    "pipeline.commands.run",
    "pipeline.commands.parity",
)


class _HideGcpNotice(logging.Filter):
    """Beam warns on import that Google Cloud client libraries are missing; we never use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bms",
        description="BookMyShow booking/payment streaming join: an Apache Beam alternative "
        "to the Azure Stream Analytics job.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_HideGcpNotice())
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "beam_args_allowed", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.beam_args = extra
    try:
        return args.func(args)
    except UsageError as error:
        print(f"bms {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeFailure as error:
        print(f"bms {args.command}: {error}", file=sys.stderr)
        return EXIT_RUNTIME_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
