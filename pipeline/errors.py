"""Errors every layer may raise and the command line reports in one line."""

from __future__ import annotations

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_RUNTIME_FAILURE",
    "EXIT_USAGE",
    "RuntimeFailure",
    "UsageError",
]

#: Exit codes of every bms command (1 is a difference found by bms parity).
EXIT_USAGE = 2
EXIT_RUNTIME_FAILURE = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A user mistake (bad argument, missing credential or driver): printed as one line."""


class RuntimeFailure(Exception):
    """A job that could not go on (a warehouse down past its deadline, a lost lease): one line
    naming the cause and the object, exit code 3."""
