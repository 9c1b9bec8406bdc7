"""Flex Template entry point: the template's parameters are ``bms run`` flags.

The launcher runs this file with the template parameters and Dataflow's own options (--project,
--region, --temp_location, --setup_file, ...) as ``--name=value`` arguments. ``bms run`` keeps the
flags it knows and hands the rest to Beam, so this file only has to name the subcommand, plus one
safeguard: without ``--runner``, ``bms run`` would pick the local Prism runner, which this image
neither has nor should use, so DataflowRunner is the default here.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

DEFAULT_RUNNER = "DataflowRunner"


def bms_run_argv(argv: list[str]) -> list[str]:
    """The ``bms`` command line for the launcher's arguments: ``run`` and, if none, a runner."""
    given = any(arg == "--runner" or arg.startswith("--runner=") for arg in argv)
    return ["run", *([] if given else [f"--runner={DEFAULT_RUNNER}"]), *argv]


if __name__ == "__main__":
    sys.exit(main(bms_run_argv(sys.argv[1:])))
