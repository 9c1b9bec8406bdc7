"""The local hub: an embedded stand-in for Azure Event Hubs, stored in one SQLite file.

It keeps what the pipeline relies on from Event Hubs: named hubs with a fixed number of
partitions, the partition chosen by hashing the partition key, per-partition sequence numbers
from 0, an enqueued time assigned on append (UTC, microseconds, never going backwards within a
partition), and cheap reads of a partition from a sequence number.

SQLite in WAL mode lets producers append while the pipeline reads, from several processes at
once: an append takes the write lock (``BEGIN IMMEDIATE``) for one batch, readers never block.
"""

from __future__ import annotations

import os
import sqlite3
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from pipeline.io.hub import DEFAULT_HUB_URL, OutgoingEvent, PartitionProperties
from pipeline.schema import HubEvent

DEFAULT_PARTITIONS = 4
_BUSY_TIMEOUT_S = 30.0
_CREATE_ATTEMPTS = 200

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
"""


def partition_for_key(partition_key: str, partitions: int) -> int:
    """The partition index of a key: a stable hash (unlike Python's salted hash()) modulo N."""
    return zlib.crc32(partition_key.encode("utf-8")) % partitions


def _now_micros() -> int:
    return time.time_ns() // 1_000


class LocalHub:
    """The hubs stored in one local file; implements ``pipeline.io.hub.HubClient``.

    Args:
      path: the SQLite file (created with its parent folders if missing).
      partitions: the partition count of hubs this instance creates; an existing hub keeps its own.
    """

    def __init__(
        self, path: str | os.PathLike = DEFAULT_HUB_URL, partitions: int = DEFAULT_PARTITIONS
    ):
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._default_partitions = partitions
        self._partition_counts: dict[str, int] = {}
        self._round_robin = 0
        # Runners call setup, process and teardown from different threads, one at a time.
        self._db = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA synchronous=NORMAL")
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as error:
                # Processes opening a new file at once race for the switch to WAL, which does
                # not wait for the busy timeout.
                if "locked" not in str(error) or attempt == _CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)

    def __repr__(self) -> str:
        return f"LocalHub({str(self.path)!r})"

    def __enter__(self) -> LocalHub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def partition_count(self, hub: str) -> int:
        """The hub's partition count, creating the hub on first use."""
        count = self._partition_counts.get(hub)
        if count is None:
            self._db.execute(
                "INSERT OR IGNORE INTO hubs (name, partitions) VALUES (?, ?)",
                (hub, self._default_partitions),
            )
            (count,) = self._db.execute(
                "SELECT partitions FROM hubs WHERE name = ?", (hub,)
            ).fetchone()
            self._partition_counts[hub] = count
        return count

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
        """Appends events in one transaction; returns (partition, sequence number) of each.

        An event without an enqueued time gets the current time, raised if needed to the
        partition's last enqueued time so times never go backwards within a partition. A given
        enqueued time (a replay) is kept as it is.
        """
        partitions = self.partition_count(hub)
        placed: list[tuple[str, int]] = []
        rows = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
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
                enqueued = event.enqueued_time
                if enqueued is None:
                    enqueued = max(now, last_enqueued[partition])
                    last_enqueued[partition] = enqueued
                rows.append((hub, partition, sequence, enqueued, event.partition_key, event.body))
                placed.append((partition, sequence))
            self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return placed
