"""``bms report``: the original project's analytics over the warehouse, as tables or a chart page.

See ``pipeline.report``. Tables on the terminal by default; ``--format csv|json`` for scripts;
``--html FILE`` writes one self-contained page (``--refresh N`` rewrites it every N seconds until
Ctrl-C, and the page reloads itself as often).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import RuntimeFailure, UsageError
from pipeline.options import add_flag, add_time_range_flags, add_warehouse_flag, time_flag
from pipeline.schema import FACT_TABLE

_LOG = logging.getLogger(__name__)

FORMATS = ("table", "csv", "json")


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.report.queries import DEFAULT_RECENT, QUERY_NAMES

    parser = subparsers.add_parser(
        "report",
        help="the original project's analytics over the warehouse: tables, CSV, JSON or a "
        "chart page",
        description="Run the original project's analytics queries (recent bookings; bookings "
        "and revenue by event category; payments by type and method; bookings by hour) and "
        "bookings by day of week and payments per order (retries) against the fact table, "
        "optionally for a booking_event_time range. Rows are (seat, payment) pairs, orders are "
        "distinct order_ids: every table shows both.",
        epilog="examples: bms report; bms report --from 2026-02-08 --to 2026-02-09 --format "
        "json; bms report --query categories --format csv; bms report --html report.html; "
        "bms report --html live.html --refresh 10",
    )
    add_warehouse_flag(parser)
    add_flag(
        parser,
        "--table",
        default=FACT_TABLE,
        help="the fact table, NAME or SCHEMA.NAME (schema bookymyshow except on SQLite; "
        "default: %(default)s)",
    )
    add_time_range_flags(parser)
    add_flag(
        parser,
        "--query",
        action="append",
        choices=QUERY_NAMES,
        help="run only this query (repeatable; default: all, in the order "
        f"{', '.join(QUERY_NAMES)})",
    )
    add_flag(
        parser,
        "--recent",
        type=int,
        default=DEFAULT_RECENT,
        metavar="N",
        help="rows in recent bookings (default: %(default)s; the original shows 100)",
    )
    add_flag(
        parser,
        "--format",
        choices=FORMATS,
        help="what to print: aligned tables (default without --html), csv (one block per query, "
        "each after a '# NAME' line) or json",
    )
    add_flag(
        parser,
        "--html",
        type=Path,
        metavar="FILE",
        help="write one self-contained HTML page with a chart per query and the tables "
        "(opens offline); prints nothing else unless --format is given",
    )
    add_flag(
        parser,
        "--refresh",
        type=float,
        metavar="SECONDS",
        help="with --html: rewrite the page every SECONDS until Ctrl-C, and make it reload "
        "itself as often (a live view while a stream runs)",
    )
    parser.set_defaults(func=run)


def write_atomically(path: Path, text: str) -> None:
    """Replaces the file in one step: a browser reloading it never sees half a page."""
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"--html {path}: no folder {folder}")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    from pipeline.report import html, render
    from pipeline.report.queries import QUERY_NAMES, run_report

    start, end = time_flag(args.start, "--from"), time_flag(args.end, "--to")
    if start is not None and end is not None and end <= start:
        raise UsageError("--to must be after --from")
    if args.recent < 1:
        raise UsageError("--recent must be 1 or more")
    if args.refresh is not None:
        if args.html is None:
            raise UsageError("--refresh rewrites the --html page: give --html FILE too")
        if args.refresh <= 0:
            raise UsageError("--refresh must be more than 0 seconds")
    output = args.format or (None if args.html else "table")
    queries = args.query or QUERY_NAMES

    def produce():
        return run_report(args.warehouse, args.table, start, end, args.recent, queries)

    report = produce()
    if output == "table":
        render.to_terminal(report)
    elif output == "csv":
        sys.stdout.write(render.to_csv(report))
    elif output == "json":
        sys.stdout.buffer.write(render.to_json(report))
        sys.stdout.flush()
    if args.html is None:
        return 0
    write_atomically(args.html, html.to_html(report, args.refresh))
    print(
        f"wrote {args.html}: {report.summary.rows:,} rows, {report.summary.orders:,} orders"
        + (f"; rewriting it every {args.refresh:g} s until Ctrl-C" if args.refresh else ""),
        file=sys.stderr,
    )
    if args.refresh is None:
        return 0
    try:
        while True:
            time.sleep(args.refresh)
            try:
                report = produce()
            except RuntimeFailure as error:  # a warehouse hiccup: keep the last page, retry
                _LOG.warning("%s; keeping the last page, trying again in %g s", error, args.refresh)
                continue
            write_atomically(args.html, html.to_html(report, args.refresh))
    except KeyboardInterrupt:
        return 0
