"""A ``Report`` as aligned terminal tables (rich), CSV or JSON."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any, TextIO

import orjson
from rich.console import Console
from rich.table import Table

from pipeline.report.queries import Column, Report, Section

__all__ = ["format_value", "heading_lines", "to_csv", "to_json", "to_terminal"]

PIPE_WIDTH = 200


def iso(moment: dt.datetime | None) -> str | None:
    """A naive UTC datetime as ISO 8601 with a Z; microseconds only when there are any."""
    if moment is None:
        return None
    return moment.isoformat(timespec="microseconds").removesuffix(".000000") + "Z"


def format_value(value: Any, column: Column) -> str:
    """A value as the terminal and the HTML page show it."""
    if value is None:
        return "—"
    if column.kind == "count":
        return f"{value:,}"
    if column.kind == "money":
        return f"{value:,.2f}"
    if column.kind == "share":
        return f"{value:.1%}"
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value)


def describe_range(report: Report) -> str:
    """The requested booking_event_time range, in words."""
    if report.start is None and report.end is None:
        return "all rows"
    start = iso(report.start) or "the first row"
    end = iso(report.end) or "the last row"
    return f"booking_event_time from {start} (inclusive) to {end} (exclusive)"


def heading_lines(report: Report) -> list[str]:
    """What the report covers: warehouse, range, counts (the top of every format but CSV)."""
    s = report.summary
    span = (
        f"{format_value(s.first_booking_event_time, Column('', ''))} to "
        f"{format_value(s.last_booking_event_time, Column('', ''))} UTC"
        if s.rows
        else "no rows"
    )
    revenue = "—" if s.seat_price_sum is None else f"{s.seat_price_sum:,.2f}"
    return [
        f"{report.table} in {report.warehouse}",
        f"range: {describe_range(report)}; rows' booking_event_time: {span}",
        f"rows ((seat, payment) pairs): {s.rows:,}; orders (distinct order_id): {s.orders:,}; "
        f"payments (distinct payment_id): {s.payments:,}; seat_price sum over rows: {revenue}",
        f"generated {iso(report.generated_at)}",
    ]


def _rich_table(section: Section) -> Table:
    table = Table(title=section.title, title_justify="left", caption=section.note)
    table.caption_justify = "left"
    for column in section.columns:
        numeric = column.kind in ("count", "money", "share")
        table.add_column(column.heading, justify="right" if numeric else "left")
    for row in section.rows:
        table.add_row(*(format_value(v, c) for v, c in zip(row, section.columns, strict=True)))
    if not section.rows:
        table.add_row("no rows", *("" for _ in section.columns[1:]))
    return table


def to_terminal(report: Report, file: TextIO | None = None) -> None:
    """Aligned tables, one per query, under the heading lines. Colours only on a terminal."""
    console = Console(file=file, highlight=False, soft_wrap=False)
    if not console.is_terminal:  # a pipe or a file: no width to fit, so do not squeeze
        console.width = max(console.width, PIPE_WIDTH)
    for line in heading_lines(report):
        console.print(line, markup=False)
    for section in report.sections:
        console.print()
        console.print(_rich_table(section))


def _jsonable(value: Any) -> Any:
    return iso(value) if isinstance(value, dt.datetime) else value


def to_json(report: Report) -> bytes:
    """One JSON object: what was read (warehouse, table, range), the summary, and per query its
    title, note and rows as objects keyed by column."""
    s = report.summary
    document = {
        "warehouse": report.warehouse,
        "table": report.table,
        "from": iso(report.start),
        "to": iso(report.end),
        "generated_at": iso(report.generated_at),
        "summary": {
            "rows": s.rows,
            "orders": s.orders,
            "payments": s.payments,
            "seat_price_sum": s.seat_price_sum,
            "first_booking_event_time": iso(s.first_booking_event_time),
            "last_booking_event_time": iso(s.last_booking_event_time),
        },
        "queries": {
            section.name: {
                "title": section.title,
                "note": section.note,
                "rows": [
                    {key: _jsonable(value) for key, value in record.items()}
                    for record in section.records()
                ],
            }
            for section in report.sections
        },
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"


def to_csv(report: Report) -> str:
    """CSV: with one query, a plain table (header, rows); with several, one block per query, each
    starting with a ``# NAME`` line, separated by blank lines."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    several = len(report.sections) > 1
    for index, section in enumerate(report.sections):
        if several:
            if index:
                out.write("\n")
            out.write(f"# {section.name}\n")
        writer.writerow([column.key for column in section.columns])
        for row in section.rows:
            writer.writerow(["" if v is None else _jsonable(v) for v in row])
    return out.getvalue()
