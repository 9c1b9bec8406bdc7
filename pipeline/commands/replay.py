"""``bms replay``: append recorded events to a hub, keeping their enqueued times.

A file goes in whole or not at all: every line is checked first, then every event is appended
in one transaction of the local hub. Events enqueued in the future are refused unless
``--allow-future``: the hub stamps live events with the real time, and a partition holding
future events makes a streaming job wait for them (see ``pipeline.io.hubs.local``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Iterable

import orjson

from pipeline import rules
from pipeline.errors import RuntimeFailure, UsageError
from pipeline.io.hubs import DEFAULT_HUB_URL, OutgoingEvent
from pipeline.io.hubs.local import (
    DEFAULT_BUSY_TIMEOUT_S,
    FUTURE_TOLERANCE_S,
    HubBusy,
    LocalHub,
    describe_duration,
)
from pipeline.options import HUB_ENV, env_default
from pipeline.schema import HUBS, datetime_to_micros, micros_to_datetime


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


def read_replay_file(lines: Iterable[str | bytes]) -> list[tuple[int, OutgoingEvent]]:
    """Every record of a replay file with its line number; blank lines are skipped. Raises
    ReplayError on a bad one."""
    return [
        (number, parse_replay_line(line, number))
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
        "The file goes in as one transaction: a bad line, a time in the future or a hub busy "
        "for longer than --wait, and nothing is appended.",
    )
    hub = env_default(HUB_ENV, DEFAULT_HUB_URL)
    parser.add_argument(
        "--hub-name", required=True, choices=HUBS, help="the event hub to append to"
    )
    parser.add_argument(
        "--hub", default=hub, help=f"the local hub file (default: {hub}; env {HUB_ENV})"
    )
    parser.add_argument(
        "--allow-future",
        action="store_true",
        help=f"append events enqueued more than {FUTURE_TOLERANCE_S:g} s after now (refused "
        "by default: they move a partition's clock ahead, and a streaming job writes their rows "
        "only once that time has come)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_BUSY_TIMEOUT_S,
        metavar="SECONDS",
        help="how long to wait for another process writing to the hub (default: %(default)g)",
    )
    parser.add_argument("file", metavar="FILE", help="JSON Lines file, or - for stdin")
    parser.set_defaults(func=run)


def future_events(events: list[OutgoingEvent], now_micros: int) -> list[int]:
    """Indexes of the events enqueued more than FUTURE_TOLERANCE_S after now."""
    limit = now_micros + int(FUTURE_TOLERANCE_S * 1_000_000)
    return [n for n, event in enumerate(events) if event.enqueued_time > limit]


def run(args: argparse.Namespace) -> int:
    if args.wait < 0:
        raise UsageError("--wait must be 0 or more seconds")
    try:
        if args.file == "-":
            lines = read_replay_file(sys.stdin.buffer)
        else:
            with open(args.file, "rb") as file:
                lines = read_replay_file(file)
    except OSError as error:
        raise UsageError(f"cannot read {args.file}: {error.strerror}") from None
    except ReplayError as error:
        raise UsageError(f"{args.file}: {error}; nothing was appended") from None
    events = [event for _, event in lines]
    now = datetime_to_micros(dt.datetime.now(dt.UTC))
    future = future_events(events, now)
    if future and not args.allow_future:
        latest = max(future, key=lambda n: events[n].enqueued_time)
        raise UsageError(
            f"{args.file}: {len(future)} of {len(events)} events are enqueued in the future "
            f"(line {lines[latest][0]}: {_iso(events[latest].enqueued_time)}, "
            f"{describe_duration((events[latest].enqueued_time - now) / 1e6)} from now); they "
            "would move partitions of the hub ahead of now, and a streaming job would write "
            "their rows only then; pass --allow-future to append them anyway; nothing was "
            "appended"
        )
    if args.hub in HUBS:
        raise UsageError(
            f"--hub is the hub file (as for every command): name the event hub with "
            f"--hub-name {args.hub}"
        )
    path = args.hub.removeprefix("local:")
    try:
        with LocalHub(path, busy_timeout=args.wait) as hub:
            hub.append(args.hub_name, events)
    except HubBusy as error:
        raise RuntimeFailure(
            f"{error}; nothing from {args.file} was appended: run the same command again"
        ) from None
    span = (
        f" (enqueued {_iso(min(e.enqueued_time for e in events))} to "
        f"{_iso(max(e.enqueued_time for e in events))})"
        if events
        else ""
    )
    print(f"appended {len(events)} events to {args.hub_name} in {path}{span}", file=sys.stderr)
    return 0


def _iso(micros: int) -> str:
    moment = micros_to_datetime(micros)
    return moment.isoformat(timespec="microseconds").removesuffix(".000000") + "Z"
