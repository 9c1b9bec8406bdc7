"""What every warehouse writer provides, and the checks a row passes before any is written.

A writer (``sqldb.SqlAlchemyWriter`` for SQLite and PostgreSQL, ``synapse.SynapseWriter`` for
Synapse and SQL Server) does one thing: insert a batch of rows, each only if the table does not
hold its row key yet, and say how many it inserted. It does not retry, bisect or validate; the
one sink in ``sink.py`` does that for every target, with one retry policy.

Errors fall in three kinds, which the writer tells apart because only it knows its driver:

  - *transient*: the database is unreachable, restarting, locked, throttling or chose this
    transaction as a deadlock victim. The sink waits them out (see ``sink.py``);
  - *data errors*: the database refuses a value (too long, out of range, a character it cannot
    hold). The sink halves the batch until the refused rows are alone and dead-letters them;
  - anything else (no such table, permission denied): the job stops with one line.

``unstorable`` checks a row against the column types of ``pipeline.schema`` (the Synapse DDL),
so a value no target could hold never reaches a database: the same rows become dead letters on
every target, whether or not that database would have complained (SQLite never does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from pipeline.schema import (
    DEAD_LETTER_COLUMNS,
    FACT_TABLE_COLUMNS,
    NULLABLE_FACT_COLUMNS,
    Column,
    DeadLetter,
    micros_to_datetime,
)

__all__ = [
    "COLUMNS",
    "DEAD_LETTERS",
    "FACTS",
    "WarehouseError",
    "WarehouseUnavailable",
    "WarehouseWriteError",
    "WarehouseWriter",
    "dead_letter_row",
    "describe_error",
    "row_checker",
]

FACTS = "facts"
DEAD_LETTERS = "dead_letters"
#: The columns of each target table, in the order writers receive row values.
COLUMNS: dict[str, tuple[Column, ...]] = {
    FACTS: FACT_TABLE_COLUMNS,
    DEAD_LETTERS: DEAD_LETTER_COLUMNS,
}


class WarehouseWriter(Protocol):
    """Inserts rows of one table; see the module docstring."""

    #: The target for messages, e.g. ``postgresql://bms:***@db/bms table bookings_fact``.
    description: str
    #: Whether the target's text columns can hold the NUL character (PostgreSQL's cannot).
    nul_allowed: bool

    def prepare(self) -> None:
        """Connects, and creates the table where the writer may (or checks it where it may not).
        Raises ``WarehouseWriteError`` in one line if the table cannot be used; the driver's
        error if the database cannot be reached. ``write_batch`` prepares when not yet done."""
        ...

    def write_batch(self, rows: Sequence[tuple]) -> int:
        """Inserts the rows whose row key the table lacks, in one transaction; returns how many
        it inserted. Raises the driver's error, unchanged, when it fails."""
        ...

    def is_transient(self, error: BaseException) -> bool: ...

    def is_data_error(self, error: BaseException) -> bool: ...

    def close(self) -> None: ...


class WarehouseError(RuntimeError):
    """Rows could not be written; the message is one line naming the warehouse and the cause."""


class WarehouseUnavailable(WarehouseError):
    """Transient failures outlasted the retry deadline."""


class WarehouseWriteError(WarehouseError):
    """A failure that retrying cannot fix (no table, no permission, a rejected dead letter)."""


def describe_error(error: BaseException) -> str:
    """The error's type and the first line of the driver's message: never the statement or its
    parameters (SQLAlchemy and pyodbc append them to their messages)."""
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0][:300]}"


def dead_letter_row(letter: DeadLetter) -> tuple:
    """A dead letter as the values of the dead-letter table, in DEAD_LETTER_COLUMNS order."""
    return (*letter[:3], micros_to_datetime(letter.enqueued_time), *letter[4:])


# SQL Server's documented ranges (the Synapse DDL's types), the strictest of every target.
_FLOAT_MAX = 1.79e308
_FLOAT_MIN_POSITIVE = 2.23e-308
_INTEGER_RANGES = {"INT": (-(2**31), 2**31 - 1), "BIGINT": (-(2**63), 2**63 - 1)}

Check = Callable[[object], str | None]


def _text_check(length: int | None, nul_allowed: bool) -> Check:
    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return f"not text ({type(value).__name__})"
        # NVARCHAR(n) holds n UTF-16 code units; a character takes at most 2, so most values
        # need no encoding to be measured.
        if length is not None and len(value) * 2 > length:
            units = len(value.encode("utf-16-le")) // 2
            if units > length:
                return f"{units:,} UTF-16 code units, more than NVARCHAR({length}) holds"
        if not nul_allowed and "\x00" in value:
            return "contains the NUL character, which this warehouse cannot store"
        return None

    return check


def _float_check(value: object) -> str | None:
    if not isinstance(value, float):
        return f"not a number ({type(value).__name__})"
    magnitude = abs(value)
    if math.isnan(value) or magnitude > _FLOAT_MAX or 0 < magnitude < _FLOAT_MIN_POSITIVE:
        return "outside the range of FLOAT (±2.23E-308 to ±1.79E+308, or 0)"
    return None


def _integer_check(sql_type: str) -> Check:
    low, high = _INTEGER_RANGES[sql_type]

    def check(value: object) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"not an integer ({type(value).__name__})"
        if not low <= value <= high:
            return f"outside the range of {sql_type}"
        return None

    return check


def _no_check(value: object) -> str | None:
    # DATETIME2 spans years 1 to 9999, exactly Python's datetime; VARBINARY(MAX) holds any bytes.
    return None


def _column_check(column: Column, nul_allowed: bool) -> Check:
    name, _, size = column.sql_type.partition("(")
    if name == "NVARCHAR":
        length = size.rstrip(")")
        return _text_check(None if length == "MAX" else int(length), nul_allowed)
    if name == "FLOAT":
        return _float_check
    if name in _INTEGER_RANGES:
        return _integer_check(name)
    return _no_check


def row_checker(target: str, *, nul_allowed: bool) -> Callable[[tuple], tuple[str, str] | None]:
    """A function telling why a row of ``target`` cannot be stored: ``(column, reason)``, or
    None when every value fits its column (see the module docstring)."""
    checks = [
        (index, column.name, _column_check(column, nul_allowed))
        for index, column in enumerate(COLUMNS[target])
    ]
    nullable = NULLABLE_FACT_COLUMNS if target == FACTS else frozenset()

    def unstorable(row: tuple) -> tuple[str, str] | None:
        for index, name, check in checks:
            value = row[index]
            if value is None:
                if name not in nullable:
                    return name, "NULL in a NOT NULL column"
                continue
            problem = check(value)
            if problem is not None:
                return name, problem
        return None

    return unstorable
