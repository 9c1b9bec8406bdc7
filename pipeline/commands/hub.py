"""``bms hub``: look into a hub and take events out of it.

  - ``bms hub ls``: the event hubs of a hub (a local hub file, or an Event Hubs namespace), their
    partitions, event counts, sequence numbers and enqueued-time ranges, with a warning for a
    partition whose clock is ahead of now;
  - ``bms hub export --hub-name NAME FILE``: every event of one event hub as JSON Lines in the
    format ``bms replay`` reads, so that replaying the file into an empty hub gives the same
    events: bodies, partition keys and enqueued times byte for byte, and sequence numbers too
    (see ``export_lines``).
  - ``bms hub grow --hub-name NAME --partition-count N``: gives one event hub of a local hub N
    partitions, as Event Hubs Premium and Dedicated allow (``az eventhubs eventhub update
    --partition-count N``); a streaming job reading it finds them within seconds.

Flags: ``--hub`` is where the hubs are (a local hub file or ``eventhubs://NAMESPACE``, default
``BMS_HUB`` or ``.bms/hub.db``), as in ``bms run``, ``bms parity`` and ``bms produce``;
``--hub-name`` names one event hub in it (``bookingtopic``, ``paymentstopic``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import heapq
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import orjson

from pipeline.errors import RuntimeFailure, UsageError
from pipeline.io.hubs import HubClient, open_hub
from pipeline.options import add_flag, add_hub_flag
from pipeline.schema import HUBS, HubEvent, datetime_to_micros, micros_to_datetime

READ_PAGE = 1000
PIPE_WIDTH = 200
_LOG = logging.getLogger(__name__)


# ---- command line ----


class _StrictParser(argparse.ArgumentParser):
    """An action's parser that refuses an option it does not know itself, with a did-you-mean
    from its own options (``bms`` checks leftovers against ``bms hub``'s, which has none)."""

    def parse_known_args(self, args=None, namespace=None):
        from pipeline.cli import _unknown_option

        namespace, extra = super().parse_known_args(args, namespace)
        if extra:
            known = [
                option
                for action in self._actions
                if action.help is not argparse.SUPPRESS
                for option in action.option_strings
            ]
            self.error(_unknown_option(extra, known) or f"unexpected argument {extra[0]}")
        return namespace, extra


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.cli import _add_verbosity

    parser = subparsers.add_parser(
        "hub",
        help="list a hub's event hubs and partitions (ls), export events as JSON Lines, or add "
        "partitions (grow)",
        description="Look into a hub: bms hub ls lists its event hubs and partitions; bms hub "
        "export writes one event hub's events as JSON Lines that bms replay reads; bms hub grow "
        "gives an event hub of a local hub more partitions.",
    )
    actions = parser.add_subparsers(
        dest="hub_action",
        required=True,
        metavar="ACTION",
        parser_class=functools.partial(_StrictParser, allow_abbrev=False),
    )
    ls = actions.add_parser(
        "ls",
        help="event hubs, partitions, event counts and enqueued-time ranges",
        description="List the event hubs of --hub with, per partition, the event count, the "
        "sequence numbers, the enqueued times of the first and last events, and a warning when "
        "a partition holds events enqueued after now (a streaming job writes their rows only "
        "once that time has come).",
    )
    export = actions.add_parser(
        "export",
        help="write one event hub's events as JSON Lines (bms replay's format)",
        description="Write every event of one event hub, as it is now, to FILE as JSON Lines: "
        '{"enqueued_time": ISO-8601 UTC, "partition_key": string or null, "body": the body '
        "as a string}, the format bms replay reads. Partitions are merged in enqueued-time "
        "order, each partition's events in sequence order, so replaying FILE into an empty hub "
        "with as many partitions gives each event the same partition and sequence number "
        "(events with no partition key are placed round robin by the hub instead). Bodies "
        "must be UTF-8 text; the file is written whole or not at all.",
    )
    grow = actions.add_parser(
        "grow",
        help="give an event hub of a local hub more partitions",
        description="Give one event hub of a local hub --partition-count partitions, as Event "
        "Hubs Premium and Dedicated allow (az eventhubs eventhub update --partition-count): "
        "events already held stay where they are, later ones hash over the new count, and a "
        "streaming bms run reading the hub finds the new partitions within seconds. Partitions "
        "are never removed.",
    )
    for action in (ls, export, grow):
        add_hub_flag(action)
    add_flag(ls, "--hub-name", metavar="NAME", help="only this event hub (default: all)")
    add_flag(grow, "--hub-name", metavar="NAME", help="the event hub to grow; required")
    add_flag(
        grow,
        "--partition-count",
        metavar="N",
        type=int,
        help="the partitions it is to have (no fewer than it has); required",
    )
    grow.set_defaults(func=run_grow)
    add_flag(
        export,
        "--hub-name",
        metavar="NAME",
        help=f"the event hub to export ({' or '.join(HUBS)}); required",
    )
    export.add_argument("file", metavar="FILE", help="JSON Lines file to write, or - for stdout")
    ls.set_defaults(func=run_ls)
    export.set_defaults(func=run_export)
    for action in (ls, export, grow):
        _add_verbosity(action, default=argparse.SUPPRESS)


# ---- reading a hub ----


def _is_local(url: str) -> bool:
    return not url.startswith("eventhubs://")


def open_existing_hub(url: str) -> HubClient:
    """The client for ``url``; a local hub file must exist (looking never creates one)."""
    if _is_local(url):
        path = Path(url.removeprefix("local:"))
        if not path.is_file():
            hint = (
                f"; --hub is the hub file or eventhubs:// URL: name the event hub with "
                f"--hub-name {url}"
                if url in HUBS
                else ": publish events first (bms produce, bms replay) or give --hub"
            )
            raise UsageError(f"no hub at {path}{hint}")
    return open_hub(url)


def hub_names(client: HubClient, url: str, only: str | None = None) -> list[str]:
    """The event hubs to look at: those of a local hub file (all, or ``only``, which must be
    there), or for Event Hubs ``only`` or the pipeline's two."""
    from pipeline.io.hubs.local import LocalHub

    if isinstance(client, LocalHub):
        names = client.hubs()
        if only is not None:
            if only not in names:
                raise UsageError(
                    f"no event hub {only!r} in {url} (it has: {', '.join(names) or 'none'})"
                )
            return [only]
        return names
    return [only] if only is not None else list(HUBS)


class PartitionInfo(NamedTuple):
    hub: str
    partition: str
    events: int
    first_sequence_number: int | None
    last_sequence_number: int | None
    first_enqueued: int | None  # µs since the epoch: the first event's (by sequence number)
    last_enqueued: int | None  # the latest enqueued time in the partition
    ahead_by: float | None  # seconds the partition's clock is ahead of now, past the tolerance


def list_partitions(
    client: HubClient, names: list[str], now_micros: int | None = None
) -> list[PartitionInfo]:
    """Per partition of each hub: what ``bms hub ls`` shows."""
    from pipeline.io.hubs.local import FUTURE_TOLERANCE_S, LocalHub

    now = datetime_to_micros(dt.datetime.now(dt.UTC)) if now_micros is None else now_micros
    latest = client.latest_enqueued_times() if isinstance(client, LocalHub) else {}
    tolerance = int(FUTURE_TOLERANCE_S * 1_000_000)
    listing = []
    for hub in names:
        for partition in client.partition_ids(hub):
            props = client.partition_properties(hub, partition)
            if props.last_sequence_number < props.first_sequence_number:
                listing.append(PartitionInfo(hub, partition, 0, None, None, None, None, None))
                continue
            first = client.read(hub, partition, props.first_sequence_number, 1)
            last = max(
                (t for t in (props.last_enqueued_time, latest.get((hub, partition))) if t),
                default=None,
            )
            ahead = (last - now) / 1e6 if last is not None and last - now > tolerance else None
            listing.append(
                PartitionInfo(
                    hub,
                    partition,
                    props.last_sequence_number - props.first_sequence_number + 1,
                    props.first_sequence_number,
                    props.last_sequence_number,
                    first[0].enqueued_time if first else None,
                    last,
                    ahead,
                )
            )
    return listing


def _iso(micros: int | None) -> str:
    if micros is None:
        return "—"
    return (
        micros_to_datetime(micros).isoformat(timespec="microseconds").removesuffix(".000000") + "Z"
    )


def run_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipeline.io.hubs.local import describe_duration

    with contextlib.closing(open_existing_hub(args.hub)) as client:
        names = hub_names(client, args.hub, args.hub_name)
        listing = list_partitions(client, names)
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:  # a pipe or a file: no width to fit, so do not squeeze
        console.width = max(console.width, PIPE_WIDTH)
    if not names:
        console.print(f"{args.hub}: no event hubs yet (bms produce or bms replay makes them)")
        return 0
    table = Table(title=f"event hubs in {args.hub}", title_justify="left")
    for heading, justify in (
        ("hub", "left"),
        ("partition", "right"),
        ("events", "right"),
        ("sequence numbers", "right"),
        ("first enqueued (UTC)", "left"),
        ("last enqueued (UTC)", "left"),
        ("", "left"),
    ):
        table.add_column(heading, justify=justify)
    for hub in names:
        rows = [info for info in listing if info.hub == hub]
        for info in rows:
            table.add_row(
                info.hub,
                info.partition,
                f"{info.events:,}",
                "—"
                if info.events == 0
                else f"{info.first_sequence_number}–{info.last_sequence_number}",
                _iso(info.first_enqueued),
                _iso(info.last_enqueued),
                f"clock {describe_duration(info.ahead_by)} ahead of now" if info.ahead_by else "",
            )
        total = sum(info.events for info in rows)
        firsts = [i.first_enqueued for i in rows if i.first_enqueued is not None]
        lasts = [i.last_enqueued for i in rows if i.last_enqueued is not None]
        table.add_row(
            f"{hub} (all)",
            f"all {len(rows)}",
            f"{total:,}",
            "",
            _iso(min(firsts, default=None)),
            _iso(max(lasts, default=None)),
            "",
            end_section=True,
        )
    console.print(table)
    for hub in names:
        ahead = sorted(
            (info for info in listing if info.hub == hub and info.ahead_by),
            key=lambda info: -info.ahead_by,
        )
        if ahead:
            first = ahead[0]
            others = f" (and {len(ahead) - 1} other partitions)" if len(ahead) > 1 else ""
            _LOG.warning(
                "partition %s of %s%s is %s ahead of now (last enqueued %s): events were "
                "published with future enqueued times; a streaming job will not write their "
                "rows until then",
                first.partition,
                hub,
                others,
                describe_duration(first.ahead_by),
                _iso(first.last_enqueued),
            )
    return 0


# ---- grow ----


def run_grow(args: argparse.Namespace) -> int:
    if not _is_local(args.hub):
        raise UsageError(
            "bms hub grow changes a local hub; an Event Hubs namespace (Premium or Dedicated) "
            "takes az eventhubs eventhub update --partition-count N"
        )
    if args.hub_name is None or args.partition_count is None:
        raise UsageError(
            "name the event hub with --hub-name and its partitions with --partition-count"
        )
    with contextlib.closing(open_existing_hub(args.hub)) as client:
        (name,) = hub_names(client, args.hub, args.hub_name)
        before = len(client.partition_ids(name))
        try:
            client.add_partitions(name, args.partition_count)
        except ValueError as error:
            raise UsageError(str(error)) from None
    print(f"{name} in {args.hub}: {before} partitions, now {args.partition_count}")
    return 0


# ---- export ----


def _partition_events(client: HubClient, hub: str, partition: str) -> Iterator[HubEvent]:
    """The partition's events as it is now, in sequence order, read in pages."""
    props = client.partition_properties(hub, partition)
    sequence, last = props.first_sequence_number, props.last_sequence_number
    while sequence <= last:
        page = client.read(hub, partition, sequence, min(READ_PAGE, last - sequence + 1))
        if not page:
            return
        yield from page
        sequence = page[-1].sequence_number + 1


def hub_events(client: HubClient, hub: str) -> Iterator[HubEvent]:
    """Every event of the hub, partitions merged by enqueued time; within a partition, sequence
    order always (even where its times go backwards); ties go to the lower partition."""
    streams = [_partition_events(client, hub, p) for p in client.partition_ids(hub)]
    return heapq.merge(*streams, key=lambda event: event.enqueued_time)


def export_line(event: HubEvent) -> bytes:
    """One event as a line of ``bms replay``'s JSON Lines (with its newline)."""
    try:
        body = event.body.decode("utf-8")
    except UnicodeDecodeError:
        raise RuntimeFailure(
            f"{event.hub} partition {event.partition} sequence {event.sequence_number}: the "
            "body is not UTF-8 text, which the replay format (the body as a JSON string) cannot "
            "hold"
        ) from None
    record = {
        "enqueued_time": _iso(event.enqueued_time),
        "partition_key": event.partition_key,
        "body": body,
    }
    return orjson.dumps(record) + b"\n"


def export(client: HubClient, hub: str, write: Callable[[bytes], object]) -> ExportTotals:
    """Writes the hub's events as replay lines, in the order of ``hub_events``: replayed into an
    empty local hub with as many partitions, each keyed event lands in the partition its key
    hashes to, after the same events as before, so with the sequence number it had (from a local
    hub; Event Hubs hashes keys its own way)."""
    count, first, last = 0, None, None
    for event in hub_events(client, hub):
        write(export_line(event))
        count += 1
        moment = event.enqueued_time
        first = moment if first is None else min(first, moment)
        last = moment if last is None else max(last, moment)
    return ExportTotals(count, first, last)


class ExportTotals(NamedTuple):
    events: int
    first_enqueued: int | None
    last_enqueued: int | None


def run_export(args: argparse.Namespace) -> int:
    with contextlib.closing(open_existing_hub(args.hub)) as client:
        if args.hub_name is None:
            raise UsageError(f"name the event hub to export with --hub-name ({' or '.join(HUBS)})")
        (name,) = hub_names(client, args.hub, args.hub_name)
        if args.file == "-":
            totals = export(client, name, sys.stdout.buffer.write)
            sys.stdout.flush()
        else:
            totals = _write_whole(Path(args.file), lambda write: export(client, name, write))
    span = (
        f", enqueued {_iso(totals.first_enqueued)} to {_iso(totals.last_enqueued)}"
        if totals.events
        else ""
    )
    where = "standard output" if args.file == "-" else args.file
    print(f"exported {totals.events} events of {name}{span} to {where}", file=sys.stderr)
    return 0


def _write_whole(path: Path, produce: Callable[[Callable[[bytes], object]], ExportTotals]):
    """Runs ``produce`` on a temporary file next to ``path``, then renames it: all or nothing."""
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: no folder {path.parent}")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            result = produce(file.write)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return result
