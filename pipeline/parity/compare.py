"""Comparing two sets of fact rows: counts, missing and extra rows, and per-column mismatches."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.schema import FACT_COLUMN_NAMES

#: A fact row's natural key: one seat of one booking message, paired with one payment.
NATURAL_KEY = ("order_id", "seat_number", "payment_id", "booking_event_time", "payment_event_time")
_KEY_INDEXES = tuple(FACT_COLUMN_NAMES.index(name) for name in NATURAL_KEY)


@dataclass(frozen=True)
class Mismatch:
    """Rows that share a natural key but differ in some columns: (column, left, right)."""

    key: tuple
    differences: tuple[tuple[str, object, object], ...]


@dataclass(frozen=True)
class Comparison:
    left_count: int
    right_count: int
    missing: Counter  # in left, not in right
    extra: Counter  # in right, not in left
    mismatches: list[Mismatch]

    @property
    def equal(self) -> bool:
        return not (self.missing or self.extra or self.mismatches)

    def report(self, left_name: str, right_name: str, show: int = 10) -> str:
        lines = [f"{left_name}: {self.left_count} rows", f"{right_name}: {self.right_count} rows"]
        if self.equal:
            return "\n".join([*lines, "equal: every row matches"])
        for title, rows in (
            (f"missing from {right_name}", self.missing),
            (f"extra in {right_name}", self.extra),
        ):
            lines.append(f"{title}: {sum(rows.values())}")
            lines += [f"  {count} x {_show(row)}" for row, count in list(rows.items())[:show]]
        per_column = Counter(column for m in self.mismatches for column, _, _ in m.differences)
        lines.append(
            f"rows with changed values: {len(self.mismatches)}"
            + "".join(f"\n  {column}: {count}" for column, count in per_column.most_common())
        )
        for mismatch in self.mismatches[:show]:
            changes = "; ".join(
                f"{c}: {left!r} -> {right!r}" for c, left, right in mismatch.differences
            )
            lines.append(f"  key {_show(mismatch.key)}: {changes}")
        return "\n".join(lines)


def _show(row: tuple) -> str:
    return (
        "(" + ", ".join(v.isoformat() if isinstance(v, dt.datetime) else repr(v) for v in row) + ")"
    )


def _key(row: tuple) -> tuple:
    return tuple(row[index] for index in _KEY_INDEXES)


def compare(left: Iterable[tuple], right: Iterable[tuple]) -> Comparison:
    """Compares two multisets of 20-column fact rows.

    Rows only one side has are paired by natural key where possible and reported as changed
    values; the rest are missing (left only) or extra (right only).
    """
    left_rows, right_rows = Counter(map(tuple, left)), Counter(map(tuple, right))
    missing, extra = left_rows - right_rows, right_rows - left_rows
    extra_by_key: dict[tuple, list[tuple]] = {}
    for row in extra.elements():
        extra_by_key.setdefault(_key(row), []).append(row)
    mismatches = []
    for row in list(missing.elements()):
        candidates = extra_by_key.get(_key(row))
        if not candidates:
            continue
        other = candidates.pop()
        missing[row] -= 1
        extra[other] -= 1
        differences = tuple(
            (name, a, b) for name, a, b in zip(FACT_COLUMN_NAMES, row, other, strict=True) if a != b
        )
        mismatches.append(Mismatch(_key(row), differences))
    return Comparison(
        sum(left_rows.values()), sum(right_rows.values()), +missing, +extra, mismatches
    )
