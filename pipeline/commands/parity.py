"""``bms parity``: compare two fact tables, or the warehouse with the ASA query over the hub."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import duckdb
import sqlalchemy as sa

from pipeline.errors import RuntimeFailure, UsageError
from pipeline.io.hubs import open_hub
from pipeline.io.warehouses import (
    SECRET_KEY,
    create_engine,
    driver_hint,
    masked_url,
    odbc_settings,
    read_dead_letters,
    read_facts,
    synapse,
)
from pipeline.io.warehouses.base import describe_error
from pipeline.options import add_hub_flag, add_time_range_flags, add_warehouse_flag, time_flag
from pipeline.parity import evaluator
from pipeline.parity.compare import Comparison, compare
from pipeline.parity.evaluator import DEFAULT_QUERY, UnsupportedConstruct, evaluate
from pipeline.schema import (
    DEAD_LETTER_TABLE,
    FACT_COLUMN_NAMES,
    FACT_SCHEMA,
    FACT_TABLE,
    HUBS,
    DeadLetter,
    HubEvent,
    decode_fact_row,
    micros_to_datetime,
)

BOOKED = FACT_COLUMN_NAMES.index("booking_event_time")
FACT_COLUMNS = len(FACT_COLUMN_NAMES)
READ_PAGE = 10_000  # events per hub read


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "parity",
        help="compare fact tables, or the warehouse with the ASA query",
        description="Compare two fact tables row for row (for example the one ASA wrote in "
        "Synapse and the one this pipeline wrote), or with --events the warehouse with what the "
        "kept ASA query gives on the events in the hub. Prints counts, missing and extra rows "
        "and changed values. Exit status: 0 equal, 1 a difference, 2 a usage error (a bad URL, "
        "a missing table or file), 3 a runtime failure (a database that cannot be reached).",
    )
    parser.add_argument("left", nargs="?", metavar="LEFT_URL", help="warehouse URL (expected)")
    parser.add_argument("right", nargs="?", metavar="RIGHT_URL", help="warehouse URL (actual)")
    parser.add_argument("--left-table", default=FACT_TABLE, help="default: %(default)s")
    parser.add_argument("--right-table", default=FACT_TABLE, help="default: %(default)s")
    add_time_range_flags(parser)
    parser.add_argument("--show", type=int, default=10, help="rows shown per kind of difference")
    parser.add_argument(
        "--events",
        action="store_true",
        help="compare --warehouse (its facts and dead letters) with the ASA query evaluated "
        "over the events in --hub",
    )
    add_hub_flag(parser, "with --events: ")
    add_warehouse_flag(parser, "with --events: ")
    parser.add_argument(
        "--query", type=Path, default=DEFAULT_QUERY, help="the ASA query file (with --events)"
    )
    parser.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="the report: text (default) or json, for scripts and CI gates",
    )
    parser.set_defaults(func=run)


def _hub_events(url: str) -> Iterator[HubEvent]:
    """Every event the hub holds now, read partition by partition in pages (a generator: the
    evaluator loads them as they come)."""
    if not url.startswith("eventhubs://"):
        path = Path(url.removeprefix("local:"))
        if not path.is_file():  # opening it would create an empty hub
            raise UsageError(f"no hub at {path}: give --hub (a local hub file or eventhubs://)")
    try:
        client = open_hub(url)
        try:
            for hub in HUBS:
                for partition in client.partition_ids(hub):
                    page = client.read(hub, partition, 0, READ_PAGE)
                    while page:
                        yield from page
                        page = client.read(hub, partition, page[-1].sequence_number + 1, READ_PAGE)
        finally:
            client.close()
    except (UsageError, RuntimeFailure):
        raise
    except Exception as error:
        raise RuntimeFailure(
            f"cannot read the hub {_shown_hub(url)}: {_scrub(describe_error(error), url)}"
        ) from None


# -- warehouse URLs: printed without secrets, errors classified -------------------------------

_IN_MEMORY = (None, "", ":memory:")  # SQLite database names of no file
_MISSING_ODBC_DRIVER = re.compile(r"Can't open lib|\bIM002\b|Data source name not found")


def _is_odbc_string(url: str) -> bool:
    return synapse.is_odbc_target(url) and not url.startswith("mssql")


def _shown_hub(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return url


def _secrets(url: str) -> list[str]:
    """The secret substrings of a URL or ODBC string: its password and secret parameters."""
    found = [value for key, value in odbc_settings(url).items() if SECRET_KEY.search(key)]
    with contextlib.suppress(sa.exc.ArgumentError, ValueError):
        parsed = sa.make_url(url)
        found.append(parsed.password or "")
        for key, value in parsed.query.items():
            if SECRET_KEY.search(key):
                found += [value] if isinstance(value, str) else list(value)
                found += [v for k, v in odbc_settings(str(value)).items() if SECRET_KEY.search(k)]
    with contextlib.suppress(ValueError):
        found.append(urlsplit(url).password or "")
    return sorted({secret.strip("{}") for secret in found if secret.strip("{}")}, key=len)[::-1]


def _scrub(message: str, *urls: str) -> str:
    """A message without any secret of the URLs (defence in depth: drivers' messages)."""
    for url in urls:
        for secret in _secrets(url):
            message = message.replace(secret, "***")
    return message


def _table_name(table: str, engine: sa.Engine) -> tuple[str | None, str]:
    """(schema, name) as ``read_facts`` resolves ``schema.table`` or ``table``."""
    schema, _, name = table.rpartition(".")
    if not schema and engine.dialect.name != "sqlite":
        schema = FACT_SCHEMA
    return schema or None, name


@contextlib.contextmanager
def _reading(url: str, what: str) -> Iterator[None]:
    """Turns what goes wrong reading a warehouse into one line without its secrets: a usage
    error (2) for what the user can fix in the command, else a runtime failure (3)."""
    shown = f"{what} {masked_url(url)}"
    try:
        yield
    except (UsageError, RuntimeFailure) as error:
        raise type(error)(_scrub(str(error), url)) from None
    except ValueError as error:  # read_facts: a table without the fact columns, or none
        raise UsageError(_scrub(f"{what}: {error}", url)) from None
    except ImportError:
        hint = driver_hint(url)
        raise UsageError(f"{shown}: its database driver is not installed; {hint}") from None
    except sa.exc.NoSuchModuleError:
        raise UsageError(
            f"{shown}: SQLAlchemy has no dialect {sa.make_url(url).drivername!r} (a typo, or a "
            f"driver that is not installed: {driver_hint(url)})"
        ) from None
    except sa.exc.DBAPIError as error:
        if not _MISSING_ODBC_DRIVER.search(str(error.orig)):
            raise RuntimeFailure(
                f"cannot read {shown}: {_scrub(describe_error(error), url)}"
            ) from None
        raise UsageError(
            f"{shown}: its ODBC driver is not installed ({_scrub(describe_error(error), url)}); "
            f"{driver_hint(url)}"
        ) from None
    except sa.exc.ArgumentError:
        raise UsageError(
            f"{what} is not a database URL SQLAlchemy can use ({masked_url(url)}); "
            "for example sqlite:///path/to/warehouse.db or postgresql+psycopg://USER@HOST/DB"
        ) from None
    except Exception as error:
        raise RuntimeFailure(f"cannot read {shown}: {_scrub(describe_error(error), url)}") from None


def _check_warehouse(url: str, what: str, tables: list[str]) -> None:
    """Fails in one line, before anything is read, when the URL names no database bms can
    read, a SQLite file that does not exist (it is not created), or a database without these
    tables; reaching the database is the only thing that may fail as a runtime failure."""
    if _is_odbc_string(url):
        raise UsageError(
            f"{what}: an ODBC connection string; bms parity reads through SQLAlchemy: give "
            "mssql+pyodbc://USER:PASSWORD@SERVER/DB?driver=ODBC+Driver+18+for+SQL+Server, or "
            "mssql+pyodbc:///?odbc_connect= and the connection string URL-encoded"
        )
    with _reading(url, what):
        parsed = sa.make_url(url)
        database = parsed.database
        sqlite_file = parsed.get_backend_name() == "sqlite" and database not in _IN_MEMORY
        if sqlite_file and not Path(database).is_file():  # connecting would create it, empty
            raise UsageError(f"{what}: no SQLite database at {database}")
        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                inspector = sa.inspect(connection)
                for table in tables:
                    schema, name = _table_name(table, engine)
                    if not inspector.has_table(name, schema=schema):
                        raise UsageError(f"no table {table} in {what} {masked_url(url)}")
        except sa.exc.DatabaseError as error:
            if parsed.get_backend_name() == "sqlite" and "not a database" in str(error.orig):
                raise UsageError(f"{what}: {database} is not a SQLite database") from None
            raise
        finally:
            engine.dispose()


def _read_facts(url: str, what: str, table: str, start, end) -> list[tuple]:
    _check_warehouse(url, what, [table])
    with _reading(url, what):
        return read_facts(url, table, start, end)


def _in_range(moment: dt.datetime, start: dt.datetime | None, end: dt.datetime | None) -> bool:
    return (start is None or moment >= start) and (end is None or moment < end)


def _positions(letters: list[DeadLetter], start, end) -> Counter:
    """Where in the hubs the letters' events are, for those enqueued in [start, end)."""
    return Counter(
        (letter.hub, letter.partition, letter.sequence_number)
        for letter in letters
        if _in_range(micros_to_datetime(letter.enqueued_time), start, end)
    )


def _dead_letter_report(dropped: Counter, dead: Counter, show: int) -> str:
    """Events the ASA query drops against the warehouse's dead letters, by hub position."""
    lines = [f"events ASA would drop: {sum(dropped.values())}; dead letters: {sum(dead.values())}"]
    for title, positions in (
        ("dropped by ASA, not dead-lettered", dropped - dead),
        ("dead-lettered, not dropped by ASA", dead - dropped),
    ):
        if positions:
            lines.append(f"{title}: {sum(positions.values())}")
            lines += [f"  {hub} partition {p} sequence {n}" for hub, p, n in list(positions)[:show]]
    return "\n".join(lines)


def _compare_with_events(args: argparse.Namespace, start, end) -> int:
    """The warehouse against the ASA query over the hub: fact rows, then dead letters."""
    if args.left or args.right:
        raise UsageError("give either two warehouse URLs or --events, not both")
    if not args.query.is_file():
        raise UsageError(f"no ASA query at {args.query}; pass --query PATH")
    where = "--warehouse"
    _check_warehouse(args.warehouse, where, [args.right_table, DEAD_LETTER_TABLE])
    evaluator.translate(args.query.read_text())  # an unsupported query fails before reading
    try:
        evaluation = evaluate(_hub_events(args.hub), args.query)
    except duckdb.OutOfMemoryException as error:
        raise RuntimeFailure(
            f"evaluating the ASA query needs more memory than DuckDB may use here "
            f"({evaluator.MEMORY_LIMIT}): {str(error).splitlines()[0]}"
        ) from None
    expected = [row for row in evaluation.rows if _in_range(row[BOOKED], start, end)]
    with _reading(args.warehouse, where):
        letters = read_dead_letters(args.warehouse)
    # Rows the warehouse could not store are in dead letters: ASA would have computed them too.
    unstored = [
        row
        for row in (decode_fact_row(letter.body)[:FACT_COLUMNS] for letter in letters
                    if letter.is_fact_row)
        if _in_range(row[BOOKED], start, end)
    ]  # fmt: skip
    actual = _read_facts(args.warehouse, where, args.right_table, start, end) + unstored
    comparison = compare(expected, actual)
    names = (f"ASA query over {_shown_hub(args.hub)}", masked_url(args.warehouse))
    dropped = _positions(evaluation.dropped, start, end)
    dead = _positions([letter for letter in letters if not letter.is_fact_row], start, end)
    equal = comparison.equal and dropped == dead
    if args.output == "json":
        print(
            json.dumps(
                {
                    **_comparison_json(comparison, *names),
                    "equal": equal,
                    "unstorable_rows": len(unstored),
                    "dead_letters": {
                        "dropped_by_asa": sum(dropped.values()),
                        "dead_lettered": sum(dead.values()),
                        "equal": dropped == dead,
                    },
                },
                indent=2,
            )
        )
        return 0 if equal else 1
    print(comparison.report(*names, show=args.show))
    if unstored:
        print(f"of which in {DEAD_LETTER_TABLE} as unstorable fact rows: {len(unstored)}")
    print(_dead_letter_report(dropped, dead, args.show))
    return 0 if equal else 1


def _comparison_json(comparison: Comparison, left: str, right: str) -> dict:
    """A comparison as numbers (``--output json``), for scripts and CI gates."""
    return {
        "equal": comparison.equal,
        "left": {"name": left, "rows": comparison.left_count},
        "right": {"name": right, "rows": comparison.right_count},
        "missing_from_right": sum(comparison.missing.values()),
        "extra_in_right": sum(comparison.extra.values()),
        "changed": len(comparison.mismatches),
    }


def run(args: argparse.Namespace) -> int:
    """0 equal, 1 a difference; raises UsageError (exit 2) or RuntimeFailure (exit 3)."""
    start, end = time_flag(args.start, "--from"), time_flag(args.end, "--to")
    try:
        if args.events:
            return _compare_with_events(args, start, end)
    except UnsupportedConstruct as error:
        raise UsageError(f"{args.query}: {error}") from None
    if not (args.left and args.right):
        raise UsageError("give two warehouse URLs (LEFT_URL RIGHT_URL), or --events")
    expected = _read_facts(args.left, "LEFT_URL", args.left_table, start, end)
    actual = _read_facts(args.right, "RIGHT_URL", args.right_table, start, end)
    comparison = compare(expected, actual)
    names = (
        f"{masked_url(args.left)} {args.left_table}",
        f"{masked_url(args.right)} {args.right_table}",
    )
    if args.output == "json":
        print(json.dumps(_comparison_json(comparison, *names), indent=2))
    else:
        print(comparison.report(*names, show=args.show))
    return 0 if comparison.equal else 1
