"""``bms replay``: append recorded events to a hub, keeping their enqueued times."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

import orjson

from pipeline import rules
from pipeline.errors import UsageError
from pipeline.io.hub import DEFAULT_HUB_URL, OutgoingEvent
from pipeline.schema import HUBS, datetime_to_micros

_BATCH = 1000


class ReplayError(ValueError):
    """A line of a replay file that cannot be read; the message names the line."""


def parse_replay_line(line: str | bytes, number: int) -> OutgoingEvent:
    """One JSON Lines record ``{"enqueued_time", "partition_key", "body"}`` as an OutgoingEvent."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        raise ReplayError(f"line {number}: not JSON ({error})") from None
    if not isinstance(record, dict):
        raise ReplayError(f"line {number}: expected a JSON object")
    enqueued = record.get("enqueued_time")
    moment = rules.try_cast_datetime(enqueued)
    if moment is None:
        raise ReplayError(f"line {number}: enqueued_time {enqueued!r} is not an ISO 8601 time")
    key = record.get("partition_key")
    if key is not None and not isinstance(key, str):
        raise ReplayError(f"line {number}: partition_key must be a string or null")
    if "body" not in record:
        raise ReplayError(f"line {number}: no body")
    body = record["body"]
    raw = body.encode("utf-8") if isinstance(body, str) else orjson.dumps(body)
    return OutgoingEvent(key, raw, datetime_to_micros(moment))


def read_replay_file(lines: Iterable[str | bytes]) -> list[OutgoingEvent]:
    """Every record of a replay file; blank lines are skipped. Raises ReplayError on a bad one."""
    return [
        parse_replay_line(line, number)
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="append recorded events (JSON Lines) to a hub",
        description="Append recorded events to a hub of the local hub. FILE holds one JSON "
        'object per line: {"enqueued_time": "<ISO-8601 UTC>", "partition_key": "<string or '
        'null>", "body": "<raw body as a string>" or a JSON object}. Enqueued times are kept; '
        "bodies are stored as they are, malformed or not (the pipeline dead-letters them). "
        "The whole file is checked first: one bad line and nothing is appended.",
    )
    parser.add_argument("--hub", required=True, choices=HUBS, help="the hub to append to")
    parser.add_argument(
        "--hub-url", default=DEFAULT_HUB_URL, help="local hub file (default: %(default)s)"
    )
    parser.add_argument("file", metavar="FILE", help="JSON Lines file, or - for stdin")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.io.localhub import LocalHub

    try:
        if args.file == "-":
            events = read_replay_file(sys.stdin.buffer)
        else:
            with open(args.file, "rb") as lines:
                events = read_replay_file(lines)
    except OSError as error:
        raise UsageError(f"cannot read {args.file}: {error.strerror}") from None
    except ReplayError as error:
        raise UsageError(f"{args.file}: {error}; nothing was appended") from None
    with LocalHub(args.hub_url.removeprefix("local:")) as hub:
        for start in range(0, len(events), _BATCH):
            hub.append(args.hub, events[start : start + _BATCH])
    print(f"appended {len(events)} events to {args.hub}", file=sys.stderr)
    return 0
