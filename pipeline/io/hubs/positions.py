"""Where a job starts reading each partition: earliest, latest, an enqueued time, or sequence
numbers.

``StartPosition`` is a small value type the source can carry to its workers;
``first_sequence_number`` turns it into a sequence number for one partition through any
``HubClient``, after a checkpoint (a restarted job resumes where it stopped, whatever it was told
to start from). Whatever it comes from, a start lies within the partition: from its first retained
event to the one it will hold next.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import NamedTuple

from pipeline.io.hubs.base import HubClient
from pipeline.schema import datetime_to_micros

EARLIEST = "earliest"
LATEST = "latest"
ENQUEUED_TIME = "enqueued_time"
SEQUENCE_NUMBERS = "sequence_numbers"
_LOG = logging.getLogger(__name__)


class StartPosition(NamedTuple):
    """Where to start: ``kind`` is one of earliest, latest, enqueued_time, sequence_numbers.

    ``enqueued_time`` (µs UTC) is the first enqueued time to read for ``enqueued_time``;
    ``sequence_numbers`` holds ``(partition, sequence number)`` pairs for ``sequence_numbers``
    (partitions not listed start at their earliest event).
    """

    kind: str = EARLIEST
    enqueued_time: int | None = None
    sequence_numbers: tuple[tuple[str, int], ...] = ()

    @classmethod
    def earliest(cls) -> StartPosition:
        return cls(EARLIEST)

    @classmethod
    def latest(cls) -> StartPosition:
        return cls(LATEST)

    @classmethod
    def at_time(cls, micros: int) -> StartPosition:
        return cls(ENQUEUED_TIME, enqueued_time=micros)

    @classmethod
    def at_sequence_numbers(cls, positions: Mapping[str, int]) -> StartPosition:
        return cls(SEQUENCE_NUMBERS, sequence_numbers=tuple(sorted(positions.items())))

    @classmethod
    def parse(cls, text: str) -> StartPosition:
        """``earliest``, ``latest``, an ISO 8601 time (UTC if no offset), or ``0:120,1:97``."""
        text = text.strip()
        if text in (EARLIEST, LATEST):
            return cls(text)
        if ":" in text and "T" not in text and "-" not in text:
            try:
                pairs = (item.split(":") for item in text.split(","))
                return cls.at_sequence_numbers({p.strip(): int(n) for p, n in pairs})
            except ValueError:
                pass
        else:
            try:
                moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
                return cls.at_time(datetime_to_micros(moment))
            except ValueError:
                pass
        raise ValueError(
            f"not a start position: {text!r}; use earliest, latest, an ISO 8601 time such as "
            "2026-02-08T10:00:00Z, or partition:sequence pairs such as 0:120,1:97"
        )


def first_sequence_number(
    client: HubClient,
    hub: str,
    partition: str,
    start: StartPosition,
    resume_at: int | None = None,
) -> int:
    """The first sequence number to read from a partition.

    ``resume_at`` (from a checkpoint) wins over ``start``. Positions before the partition's
    first retained event are moved up to it; positions beyond the event it will hold next (a
    checkpoint or a sequence number from another hub of the same name, or from before the hub
    was made anew) are moved down to that one, with a warning: reading would otherwise wait
    for events that may never come, and skip those that do.

    An enqueued-time start asks the client (``first_sequence_number_at``, Event Hubs: one
    receiver started at that time) or, for a client without it, binary-searches the partition.
    """
    properties = client.partition_properties(hub, partition)
    first, end = properties.first_sequence_number, properties.last_sequence_number + 1
    if resume_at is not None:
        position = resume_at
    elif start.kind == EARLIEST:
        position = first
    elif start.kind == LATEST:
        position = end
    elif start.kind == SEQUENCE_NUMBERS:
        position = dict(start.sequence_numbers).get(partition, first)
    elif start.kind == ENQUEUED_TIME:
        at_time = getattr(client, "first_sequence_number_at", None)
        if at_time is not None:
            position = at_time(hub, partition, start.enqueued_time)
            end = max(end, position)  # events came since the properties were read
        else:
            position = _first_enqueued_at_or_after(client, hub, partition, first, end, start)
    else:
        raise ValueError(f"unknown start position kind {start.kind!r}")
    if position > end:
        _LOG.warning(
            "partition %s of hub %r: start at sequence number %d lies beyond its next event "
            "(%d); starting there instead",
            partition,
            hub,
            position,
            end,
        )
        position = end
    return max(position, first)


def _first_enqueued_at_or_after(
    client: HubClient, hub: str, partition: str, low: int, high: int, start: StartPosition
) -> int:
    """Binary search on sequence numbers: enqueued times never decrease within a partition."""
    while low < high:
        middle = (low + high) // 2
        events = client.read(hub, partition, middle, 1)
        if not events:  # expired while we searched: what is left starts later
            low = middle + 1
        elif events[0].enqueued_time < start.enqueued_time:
            low = events[0].sequence_number + 1
        else:
            high = min(middle, events[0].sequence_number)
    return low
