"""Where events come from: event hubs, opened by URL, read by one source, with checkpoints.

  - ``base``: the ``HubClient`` interface every adapter implements, and its values;
  - ``local``: the embedded local hub (a SQLite file); ``eventhubs``: Azure Event Hubs;
  - ``source``: ``ReadFromHub``, the Splittable DoFn reading any client into Beam;
  - ``positions``: where a job starts; ``checkpoints``: where it resumes; ``progress``: commits
    of read positions once their rows are written, and the drain; ``lease``: one job per
    checkpoint store.

This module opens a client for a URL and is the only place that imports the adapters (lazily,
so a job reading the local hub never loads the Azure SDK); the adapters import ``base``, never
this module, so there is no import circle. A client is created on the worker from its URL, so
only the URL travels with the pipeline, never a connection.

URLs:
  - a filesystem path, or ``local:PATH``: the local hub in that file (default ``.bms/hub.db``);
  - ``eventhubs://NAMESPACE.servicebus.windows.net``: Azure Event Hubs (credentials from the
    environment, see the README).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io.hubs.base import (
    DEFAULT_HUB_URL,
    HubClient,
    OutgoingEvent,
    PartitionProperties,
    read_all,
)
from pipeline.io.hubs.checkpoints import CheckpointScope

__all__ = [
    "DEFAULT_HUB_URL",
    "HubClient",
    "OutgoingEvent",
    "PartitionProperties",
    "checkpoint_scope",
    "missing_hub",
    "open_hub",
    "read_all",
]


def checkpoint_scope(url: str) -> CheckpointScope:
    """Whose progress a job reading the hubs at this URL keeps: its namespace and consumer group
    (the local hub: its file's absolute path, consumer group ``$Default``)."""
    if url.startswith("eventhubs://"):
        from pipeline.io.hubs.eventhubs import EventHubsAddress

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
        from pipeline.io.hubs.eventhubs import EventHubsClient

        return EventHubsClient.from_url(url)
    from pipeline.io.hubs.local import LocalHub

    return LocalHub(url.removeprefix("local:"))
