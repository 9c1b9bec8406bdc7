"""The small client interface every event hub adapter implements, and opening one by URL.

One source (``pipeline.io.source``) reads any hub through this interface: the embedded local hub
(``pipeline.io.localhub``) and Azure Event Hubs (``pipeline.io.eventhubs``). A client is created
on the worker from its URL, so only the URL travels with the pipeline, never a connection.

URLs:
  - a filesystem path, or ``local:PATH``: the local hub in that file (default ``.bms/hub.db``);
  - ``eventhubs://NAMESPACE.servicebus.windows.net``: Azure Event Hubs (credentials from the
    environment, see the README).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from pipeline.io.checkpoints import CheckpointScope
from pipeline.schema import HUBS, HubEvent

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


def checkpoint_scope(url: str) -> CheckpointScope:
    """Whose progress a job reading the hubs at this URL keeps: its namespace and consumer group
    (the local hub: its file's absolute path, consumer group ``$Default``)."""
    if url.startswith("eventhubs://"):
        from pipeline.io.eventhubs import EventHubsAddress

        address = EventHubsAddress.parse(url)
        return CheckpointScope(address.checkpoint_namespace(), address.consumer_group)
    return CheckpointScope(str(Path(url.removeprefix("local:")).resolve()), "$Default")


def missing_hub(url: str) -> str | None:
    """Why a local hub URL names no hub (one line), or None. Opening a local hub that does not
    exist would create an empty one: a typo must not read nothing and succeed."""
    if url.startswith("eventhubs://"):
        return None
    path = Path(url.removeprefix("local:"))
    if path.is_file():
        return None
    return f"no hub at {path}: publish events first (bms produce, bms replay) or give --hub"


def open_hub(url: str = DEFAULT_HUB_URL) -> HubClient:
    """The hub client for a URL (see the module docstring)."""
    if url.startswith("eventhubs://"):
        from pipeline.io.eventhubs import EventHubsClient

        return EventHubsClient.from_url(url)
    from pipeline.io.localhub import LocalHub

    return LocalHub(url.removeprefix("local:"))
