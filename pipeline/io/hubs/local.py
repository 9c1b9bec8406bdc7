"""The local hub: an embedded stand-in for Azure Event Hubs, stored in one SQLite file.

It keeps what the pipeline relies on from Event Hubs: named hubs with a number of partitions
that can grow but never shrink (``add_partitions``, as on Event Hubs Premium and Dedicated), the
partition chosen by hashing the partition key over the current partitions, per-partition
sequence numbers from 0, an enqueued time assigned on append (UTC, microseconds), and cheap reads
of a partition from a sequence number.

Time is honest, as in Event Hubs, where the service stamps each event with its own clock when it
accepts it and no client can set an enqueued time. A live append (an event without an enqueued
time) is stamped with the current time. Enqueued times never go backwards within a partition,
as in Event Hubs: the source's watermark (and so when join windows close and when read
positions may be committed) relies on it, and an event behind it would be late. So an event
whose time (the current time, or an explicit one from ``bms replay`` or ``bms produce
--simulate``) lies before the partition's last event gets that last event's time instead. The
only way to move a partition's clock ahead of now is an explicit future time, which ``bms
replay`` and ``bms produce`` refuse unless ``--allow-future``; live events then share that
future time until it comes, and ``clock_ahead`` (``bms run``, ``bms hub ls``) says so.

SQLite in WAL mode lets producers append while the pipeline reads, from several processes at
once: an append takes the write lock (``BEGIN IMMEDIATE``) for one batch, readers never block.
A writer waits up to ``busy_timeout`` seconds for another writer's lock, then raises ``HubBusy``
with nothing appended.
"""

from __future__ import annotations

import os
import sqlite3
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import RuntimeFailure
from pipeline.io.hubs.base import DEFAULT_HUB_URL, OutgoingEvent, PartitionProperties
from pipeline.schema import HubEvent

DEFAULT_PARTITIONS = 4
DEFAULT_BUSY_TIMEOUT_S = 30.0
# How far ahead of now a partition's clock may be and still be "now": the clocks of processes on
# one machine, a simulated history that ended a moment ago. Beyond it, live appends ignore the
# partition's clock, and replays and simulations into the future need --allow-future.
FUTURE_TOLERANCE_S = 5.0
_RETRY_PAUSE_S = 0.05
_SQLITE_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hubs (
    name TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    hub TEXT NOT NULL,
    partition TEXT NOT NULL,
    sequence_number INTEGER NOT NULL,
    enqueued_time INTEGER NOT NULL,
    partition_key TEXT,
    body BLOB NOT NULL,
    PRIMARY KEY (hub, partition, sequence_number)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS producer_runs (
    run INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at INTEGER NOT NULL
);
"""


class HubBusy(RuntimeFailure):
    """Another process held the hub's write lock for longer than this one would wait."""


def _is_busy(error: sqlite3.Error) -> bool:
    return getattr(error, "sqlite_errorcode", None) in _SQLITE_BUSY_CODES or "locked" in str(error)


def partition_for_key(partition_key: str, partitions: int) -> int:
    """The partition index of a key: a stable hash (unlike Python's salted hash()) modulo N."""
    return zlib.crc32(partition_key.encode("utf-8")) % partitions


def _now_micros() -> int:
    return time.time_ns() // 1_000


class LocalHub:
    """The hubs stored in one local file; implements ``pipeline.io.hubs.HubClient``.

    Args:
      path: the SQLite file (created with its parent folders if missing).
      partitions: the partition count of hubs this instance creates; an existing hub keeps its own.
      busy_timeout: seconds a write waits for another process's write lock before ``HubBusy``.
    """

    def __init__(
        self,
        path: str | os.PathLike = DEFAULT_HUB_URL,
        partitions: int = DEFAULT_PARTITIONS,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
    ):
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must not be negative, got {busy_timeout}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout = busy_timeout
        self._default_partitions = partitions
        self._round_robin = 0
        # Runners call setup, process and teardown from different threads, one at a time.
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA synchronous=NORMAL")
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as error:
                # Processes opening a new file at once race for the switch to WAL, which does
                # not wait for the busy timeout: retry until the timeout has passed.
                if not _is_busy(error):
                    self._db.close()
                    raise
                if time.monotonic() >= deadline:
                    self._db.close()
                    raise self._busy() from None
                time.sleep(_RETRY_PAUSE_S)

    def __repr__(self) -> str:
        return f"LocalHub({str(self.path)!r})"

    def __enter__(self) -> LocalHub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _busy(self) -> HubBusy:
        return HubBusy(
            f"the local hub {self.path} is busy: another process held its write lock for more "
            f"than {self.busy_timeout:g} s"
        )

    def _write(self, sql: str, parameters: Sequence = ()) -> sqlite3.Cursor:
        """One statement that may wait for the write lock: HubBusy once the wait is over."""
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.OperationalError as error:
            if _is_busy(error):
                raise self._busy() from None
            raise

    def partition_count(self, hub: str) -> int:
        """The hub's partition count now (another process may add partitions), creating the hub
        on first use."""
        row = self._db.execute("SELECT partitions FROM hubs WHERE name = ?", (hub,)).fetchone()
        if row is None:
            self._write(
                "INSERT OR IGNORE INTO hubs (name, partitions) VALUES (?, ?)",
                (hub, self._default_partitions),
            )
            row = self._db.execute("SELECT partitions FROM hubs WHERE name = ?", (hub,)).fetchone()
        return row[0]

    def add_partitions(self, hub: str, count: int) -> None:
        """Grows the hub to ``count`` partitions, as Event Hubs Premium and Dedicated allow (no
        tier removes partitions). Events already held stay where they are; keys hash over the
        new count from the next append on, so a key's later events may land elsewhere, as on
        Event Hubs."""
        current = self.partition_count(hub)
        if count < current:
            raise ValueError(f"hub {hub!r} has {current} partitions: none can be removed")
        self._write(
            "UPDATE hubs SET partitions = ? WHERE name = ? AND partitions < ?", (count, hub, count)
        )

    def next_run_number(self) -> int:
        """A number no earlier call on this hub file returned (1, 2, ...): producers put it in
        their order ids so that ids of different runs never collide."""
        cursor = self._write("INSERT INTO producer_runs (started_at) VALUES (?)", (_now_micros(),))
        return cursor.lastrowid

    def latest_enqueued_times(self) -> dict[tuple[str, str], int]:
        """The latest enqueued time (µs) in each non-empty partition, by (hub, partition)."""
        return {
            (hub, partition): latest
            for hub, partition, latest in self._db.execute(
                "SELECT hub, partition, MAX(enqueued_time) FROM events GROUP BY hub, partition"
            )
        }

    def hubs(self) -> list[str]:
        return [name for (name,) in self._db.execute("SELECT name FROM hubs ORDER BY name")]

    def partition_ids(self, hub: str) -> list[str]:
        return [str(index) for index in range(self.partition_count(hub))]

    def partition_properties(self, hub: str, partition: str) -> PartitionProperties:
        first, last, last_enqueued = self._db.execute(
            "SELECT MIN(sequence_number), MAX(sequence_number),"
            " (SELECT enqueued_time FROM events WHERE hub = ?1 AND partition = ?2"
            "  ORDER BY sequence_number DESC LIMIT 1)"
            " FROM events WHERE hub = ?1 AND partition = ?2",
            (hub, partition),
        ).fetchone()
        if last is None:
            return PartitionProperties(partition, 0, -1, None)
        return PartitionProperties(partition, first, last, last_enqueued)

    def known_end(self, hub: str, partition: str) -> int:
        """The sequence number the partition's next event will have: exact, and cheap to ask."""
        (last,) = self._db.execute(
            "SELECT MAX(sequence_number) FROM events WHERE hub = ? AND partition = ?",
            (hub, partition),
        ).fetchone()
        return 0 if last is None else last + 1

    def read(
        self, hub: str, partition: str, from_sequence_number: int, max_events: int
    ) -> list[HubEvent]:
        rows = self._db.execute(
            "SELECT sequence_number, enqueued_time, partition_key, body FROM events"
            " WHERE hub = ? AND partition = ? AND sequence_number >= ?"
            " ORDER BY sequence_number LIMIT ?",
            (hub, partition, from_sequence_number, max_events),
        ).fetchall()
        return [
            HubEvent(hub, partition, seq, enqueued, key, body) for seq, enqueued, key, body in rows
        ]

    def append(self, hub: str, events: Sequence[OutgoingEvent]) -> list[tuple[str, int]]:
        """Appends events in one transaction, all or nothing; returns (partition, sequence
        number) of each.

        An event gets its given enqueued time (a replay, a simulation) or the current time, but
        never one before the partition's last event: times do not go backwards within a
        partition (see the module docstring). Raises
        ``HubBusy``, with nothing appended, when another process holds the write lock for
        longer than ``busy_timeout``.
        """
        placed: list[tuple[str, int]] = []
        rows = []
        self._write("BEGIN IMMEDIATE")
        try:
            partitions = self.partition_count(hub)
            next_sequence: dict[str, int] = {}
            last_enqueued: dict[str, int] = {}
            now = _now_micros()
            for event in events:
                if event.partition_key is None:
                    index = self._round_robin % partitions
                    self._round_robin += 1
                else:
                    index = partition_for_key(event.partition_key, partitions)
                partition = str(index)
                if partition not in next_sequence:
                    last_seq, last_time = self._db.execute(
                        "SELECT sequence_number, enqueued_time FROM events"
                        " WHERE hub = ? AND partition = ? ORDER BY sequence_number DESC LIMIT 1",
                        (hub, partition),
                    ).fetchone() or (-1, 0)
                    next_sequence[partition] = last_seq + 1
                    last_enqueued[partition] = last_time
                sequence = next_sequence[partition]
                next_sequence[partition] = sequence + 1
                enqueued = now if event.enqueued_time is None else event.enqueued_time
                enqueued = max(enqueued, last_enqueued[partition])
                last_enqueued[partition] = enqueued
                rows.append((hub, partition, sequence, enqueued, event.partition_key, event.body))
                placed.append((partition, sequence))
            self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return placed


def clock_ahead(
    hub_url: str, now_micros: int | None = None, tolerance: float = FUTURE_TOLERANCE_S
) -> str | None:
    """One line warning that a partition of the local hub at ``hub_url`` holds events enqueued
    more than ``tolerance`` seconds after now, or None (also for Event Hubs, whose service
    stamps every event with its own clock, and for a hub file that does not exist yet).

    A streaming job holds such events until the watermark reaches their time, so it writes
    their rows only then; ``bms run`` says so at start rather than stay silent.
    """
    if hub_url.startswith("eventhubs://"):
        return None
    path = Path(hub_url.removeprefix("local:"))
    if not path.is_file():
        return None
    now = _now_micros() if now_micros is None else now_micros
    try:
        # A plain read: nothing is created, and in WAL mode no writer blocks it.
        db = sqlite3.connect(path, timeout=1.0)
        try:
            latest = db.execute(
                "SELECT hub, partition, MAX(enqueued_time) FROM events GROUP BY hub, partition"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error:  # not a hub file, or unreadable: the run itself will say why
        return None
    ahead = sorted(
        ((time_ - now, hub, partition) for hub, partition, time_ in latest),
        reverse=True,
    )
    ahead = [entry for entry in ahead if entry[0] > tolerance * 1_000_000]
    if not ahead:
        return None
    lead, hub, partition = ahead[0]
    others = f" (and {len(ahead) - 1} other partitions)" if len(ahead) > 1 else ""
    return (
        f"partition {partition} of {hub}{others} is {describe_duration(lead / 1e6)} ahead of "
        "now: events were published with future enqueued times (bms produce --simulate or "
        "bms replay with --allow-future?); a streaming job will not write their rows until then"
    )


def describe_duration(seconds: float) -> str:
    """A duration for people: "45 seconds", "79 minutes", "5 hours", "1,498 days"."""
    seconds = abs(seconds)
    if seconds < 120:
        return f"{round(seconds)} seconds"
    if seconds < 120 * 60:
        return f"{round(seconds / 60)} minutes"
    if seconds < 48 * 3600:
        return f"{round(seconds / 3600)} hours"
    return f"{round(seconds / 86400):,} days"
