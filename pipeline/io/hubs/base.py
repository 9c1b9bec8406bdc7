"""What every event hub adapter implements, and the values they exchange; imports no adapter.

Adapters: the embedded local hub (``local``) and Azure Event Hubs (``eventhubs``). The source
(``source``) reads any of them through ``HubClient``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from pipeline.schema import HUBS, HubEvent

__all__ = ["DEFAULT_HUB_URL", "HubClient", "OutgoingEvent", "PartitionProperties", "read_all"]

DEFAULT_HUB_URL = ".bms/hub.db"


class PartitionProperties(NamedTuple):
    """What a partition holds right now. ``last_sequence_number`` is -1 when it is empty."""

    partition: str
    first_sequence_number: int
    last_sequence_number: int
    last_enqueued_time: int | None  # microseconds since the epoch, UTC


class HubClient(Protocol):
    """Read access to the partitions of the hubs (event hubs) in one namespace."""

    def partition_ids(self, hub: str) -> list[str]: ...

    def partition_properties(self, hub: str, partition: str) -> PartitionProperties: ...

    def known_end(self, hub: str, partition: str) -> int:
        """A sequence number the partition's next event will have at least, from what the client
        has learned without asking the service (0 when it knows nothing): sequence numbers only
        grow, so what a client learned once stays a lower bound."""
        ...

    def read(
        self, hub: str, partition: str, from_sequence_number: int, max_events: int
    ) -> Sequence[HubEvent]:
        """Up to max_events events with sequence number >= from_sequence_number, in order."""
        ...

    def close(self) -> None: ...


class OutgoingEvent(NamedTuple):
    """An event to publish. ``enqueued_time`` (µs, UTC) is set only by replays; else the hub's."""

    partition_key: str | None
    body: bytes
    enqueued_time: int | None = None


def read_all(client: HubClient, hubs: Sequence[str] = HUBS) -> list[HubEvent]:
    """Every event the hubs hold now, partition by partition (tools and tests, not the job)."""
    return [
        event
        for hub in hubs
        for partition in client.partition_ids(hub)
        for event in client.read(hub, partition, 0, 2**62)
    ]
