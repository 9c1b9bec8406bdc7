"""``bms parity``: compare two fact tables, or the warehouse with the ASA query over the hub."""

from __future__ import annotations

import argparse
import datetime as dt
from collections import Counter
from pathlib import Path

from pipeline import rules
from pipeline.errors import UsageError
from pipeline.io.hub import DEFAULT_HUB_URL, open_hub
from pipeline.io.warehouses import DEFAULT_WAREHOUSE_URL, read_dead_letters, read_facts
from pipeline.parity.compare import compare
from pipeline.parity.evaluator import DEFAULT_QUERY, UnsupportedConstruct, evaluate
from pipeline.schema import (
    DEAD_LETTER_TABLE,
    FACT_COLUMN_NAMES,
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
        "and changed values; exits 1 on any difference, 0 when equal.",
    )
    parser.add_argument("left", nargs="?", metavar="LEFT_URL", help="warehouse URL (expected)")
    parser.add_argument("right", nargs="?", metavar="RIGHT_URL", help="warehouse URL (actual)")
    parser.add_argument("--left-table", default=FACT_TABLE, help="default: %(default)s")
    parser.add_argument("--right-table", default=FACT_TABLE, help="default: %(default)s")
    parser.add_argument(
        "--from", dest="start", metavar="TIME", help="only rows with booking_event_time >= TIME"
    )
    parser.add_argument(
        "--to", dest="end", metavar="TIME", help="only rows with booking_event_time < TIME"
    )
    parser.add_argument("--show", type=int, default=10, help="rows shown per kind of difference")
    parser.add_argument(
        "--events",
        action="store_true",
        help="compare --warehouse (its facts and dead letters) with the ASA query evaluated "
        "over the events in --hub",
    )
    parser.add_argument(
        "--hub", default=DEFAULT_HUB_URL, help="with --events (default: %(default)s)"
    )
    parser.add_argument(
        "--warehouse", default=DEFAULT_WAREHOUSE_URL, help="with --events (default: %(default)s)"
    )
    parser.add_argument(
        "--query", type=Path, default=DEFAULT_QUERY, help="the ASA query file (with --events)"
    )
    parser.set_defaults(func=run)


def _time(text: str | None, flag: str) -> dt.datetime | None:
    if text is None:
        return None
    moment = rules.try_cast_datetime(text)
    if moment is None:
        raise UsageError(f"{flag} {text!r} is not an ISO 8601 time")
    return moment


def _hub_events(url: str) -> list[HubEvent]:
    """Every event the hub holds now, read partition by partition in pages."""
    client = open_hub(url)
    events: list[HubEvent] = []
    try:
        for hub in HUBS:
            for partition in client.partition_ids(hub):
                page = client.read(hub, partition, 0, READ_PAGE)
                while page:
                    events += page
                    page = client.read(hub, partition, page[-1].sequence_number + 1, READ_PAGE)
    finally:
        client.close()
    return events


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
    evaluation = evaluate(_hub_events(args.hub), args.query)
    expected = [row for row in evaluation.rows if _in_range(row[BOOKED], start, end)]
    letters = read_dead_letters(args.warehouse)
    # Rows the warehouse could not store are in dead letters: ASA would have computed them too.
    unstored = [
        row
        for row in (decode_fact_row(letter.body)[:FACT_COLUMNS] for letter in letters
                    if letter.is_fact_row)
        if _in_range(row[BOOKED], start, end)
    ]  # fmt: skip
    actual = read_facts(args.warehouse, args.right_table, start, end) + unstored
    comparison = compare(expected, actual)
    print(comparison.report(f"ASA query over {args.hub}", args.warehouse, show=args.show))
    if unstored:
        print(f"of which in {DEAD_LETTER_TABLE} as unstorable fact rows: {len(unstored)}")
    dropped = _positions(evaluation.dropped, start, end)
    dead = _positions([letter for letter in letters if not letter.is_fact_row], start, end)
    print(_dead_letter_report(dropped, dead, args.show))
    return 0 if comparison.equal and dropped == dead else 1


def run(args: argparse.Namespace) -> int:
    start, end = _time(args.start, "--from"), _time(args.end, "--to")
    try:
        if args.events:
            return _compare_with_events(args, start, end)
        if not (args.left and args.right):
            raise UsageError("give two warehouse URLs (LEFT_URL RIGHT_URL), or --events")
        expected = read_facts(args.left, args.left_table, start, end)
        actual = read_facts(args.right, args.right_table, start, end)
    except (ValueError, UnsupportedConstruct) as error:
        raise UsageError(str(error)) from None
    comparison = compare(expected, actual)
    names = (f"{args.left} {args.left_table}", f"{args.right} {args.right_table}")
    print(comparison.report(*names, show=args.show))
    return 0 if comparison.equal else 1
