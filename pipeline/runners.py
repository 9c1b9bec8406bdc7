"""Where the streaming runners' local parts are: the Prism binary.

``scripts/setup-runners`` builds or fetches them into ``$BMS_CACHE`` (default ``~/.cache/bms``);
environment variables override each location.
"""

from __future__ import annotations

import os
from pathlib import Path


class RunnerNotInstalled(RuntimeError):
    """A runner's local part is missing; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("BMS_CACHE", Path.home() / ".cache" / "bms"))


def prism_binary() -> str:
    """The Prism runner binary (built from Beam's Go module by scripts/setup-runners)."""
    path = Path(os.environ.get("PRISM_BIN", cache_dir() / "bin" / "prism"))
    if not path.is_file():
        raise RunnerNotInstalled(
            f"no Prism binary at {path}: run scripts/setup-runners prism (or set PRISM_BIN)"
        )
    return str(path)
