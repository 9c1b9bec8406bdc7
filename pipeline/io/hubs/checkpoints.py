"""Checkpoint stores: how far each partition has been read *and its rows written*, to resume from.

A checkpoint names the last event of a partition that is fully processed, by sequence number and
offset, as the Event Hubs SDKs do; a restarted job reads on from the next sequence number.
Checkpoints are scoped by namespace, event hub and consumer group, so two jobs with different
consumer groups keep separate progress.

  - ``FileCheckpointStore``: one small JSON file per partition under a folder (the local hub's
    choice, and any single-machine run). Each commit writes a temporary file and renames it over
    the old one, so a crash leaves the old checkpoint or the new one, never a torn file.
  - ``BlobCheckpointStore``: Azure Blob Storage through azure-eventhub-checkpointstoreblob, in the
    same blob layout (``NS/HUB/GROUP/checkpoint/PARTITION`` with ``offset`` and
    ``sequencenumber`` metadata) the SDK's own EventProcessor uses, with the event's real offset:
    an ``EventHubConsumerClient`` with the SDK's ``BlobCheckpointStore`` over the same container
    (an Azure Function, another job) resumes exactly after the pipeline's last committed event,
    and the pipeline resumes after the SDK's. A commit without an offset (none should come) is
    skipped with a warning rather than written with a wrong one.

Commits only ever move a partition forward: a late commit of an older position is ignored.
``open_checkpoint_store`` picks the store from a location (``bms run --checkpoints``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

from pipeline.io.azure import (
    default_credential,
    import_extra,
    storage_connection_string,
)

_LOG = logging.getLogger(__name__)


class CheckpointScope(NamedTuple):
    """Whose progress: a namespace (``local`` for the local hub) and a consumer group."""

    namespace: str
    consumer_group: str


class CheckpointStore(Protocol):
    def last_processed(self, hub: str) -> dict[str, int]:
        """Partition -> sequence number of the last fully processed event, for partitions that
        have a checkpoint."""
        ...

    def commit(
        self, hub: str, partition: str, sequence_number: int, offset: str | None = None
    ) -> None:
        """Records that every event of the partition up to sequence_number is processed;
        ``offset`` is the hub's offset of that event."""
        ...

    def close(self) -> None: ...


def resume_positions(store: CheckpointStore, hub: str) -> dict[str, int]:
    """Partition -> the sequence number to read next, from the checkpoints."""
    return {partition: last + 1 for partition, last in store.last_processed(hub).items()}


def _safe_name(text: str) -> str:
    return quote(text, safe="") or "_"


class FileCheckpointStore:
    """Checkpoints as ``FOLDER/NAMESPACE/CONSUMER_GROUP/HUB/PARTITION.json``."""

    def __init__(self, folder: str | os.PathLike, scope: CheckpointScope):
        self._folder = Path(folder, _safe_name(scope.namespace), _safe_name(scope.consumer_group))

    def __repr__(self) -> str:
        return f"FileCheckpointStore({str(self._folder)!r})"

    def _path(self, hub: str, partition: str) -> Path:
        return self._folder / _safe_name(hub) / f"{_safe_name(partition)}.json"

    def last_processed(self, hub: str) -> dict[str, int]:
        folder = self._folder / _safe_name(hub)
        if not folder.is_dir():
            return {}
        checkpoints = {}
        for path in folder.glob("*.json"):
            try:
                record = json.loads(path.read_text())
                checkpoints[record["partition"]] = int(record["sequence_number"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"checkpoint file {path} is unreadable ({type(error).__name__}: {error}); "
                    "delete it to read that partition from --start again"
                ) from None
        return checkpoints

    def _read(self, path: Path) -> int | None:
        try:
            return json.loads(path.read_text())["sequence_number"]
        except FileNotFoundError:
            return None

    def commit(
        self, hub: str, partition: str, sequence_number: int, offset: str | None = None
    ) -> None:
        path = self._path(hub, partition)
        current = self._read(path)
        if current is not None and current >= sequence_number:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"hub": hub, "partition": partition, "sequence_number": sequence_number}
        if offset is not None:
            record["offset"] = offset
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(record, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        """Nothing to release: each call opens and closes its own files."""


class BlobCheckpointStore:
    """Checkpoints in an Azure Blob Storage container (the Event Hubs SDK's blob layout).

    Args:
      scope: the Event Hubs namespace (fully qualified host name) and consumer group.
      container: the container's URL, ``https://ACCOUNT.blob.core.windows.net/CONTAINER``
        (DefaultAzureCredential, role "Storage Blob Data Contributor"), or its name when
        ``connection_string`` is given.
      connection_string: a storage account connection string (from an environment variable).
    """

    def __init__(
        self,
        scope: CheckpointScope,
        container: str,
        connection_string: str | None = None,
        store: Any = None,
    ):
        self._scope = scope
        if store is None:
            blob = import_extra("azure.eventhub.extensions.checkpointstoreblob", "azure")
            if connection_string:
                store = blob.BlobCheckpointStore.from_connection_string(
                    connection_string, container
                )
            else:
                account, _, name = container.rstrip("/").rpartition("/")
                store = blob.BlobCheckpointStore(account, name, credential=default_credential())
        self._store = store

    def last_processed(self, hub: str) -> dict[str, int]:
        return {
            str(checkpoint["partition_id"]): int(checkpoint["sequence_number"])
            for checkpoint in self._store.list_checkpoints(
                self._scope.namespace, hub, self._scope.consumer_group
            )
        }

    def commit(
        self, hub: str, partition: str, sequence_number: int, offset: str | None = None
    ) -> None:
        current = self.last_processed(hub).get(partition)
        if current is not None and current >= sequence_number:
            return
        if offset is None:
            # The SDK resumes from the offset alone: a wrong one would make every SDK reader of
            # this checkpoint start elsewhere. Skipping leaves the previous checkpoint (safe: the
            # next commit moves on, and reading again is idempotent).
            _LOG.warning(
                "not committing %s partition %s at sequence number %d: its offset is unknown",
                hub,
                partition,
                sequence_number,
            )
            return
        self._store.update_checkpoint(
            {
                "fully_qualified_namespace": self._scope.namespace,
                "eventhub_name": hub,
                "consumer_group": self._scope.consumer_group,
                "partition_id": partition,
                "sequence_number": sequence_number,
                "offset": offset,
            }
        )

    def close(self) -> None:
        self._store.close()


def open_checkpoint_store(location: str, scope: CheckpointScope) -> CheckpointStore:
    """The checkpoint store at a location.

    ``https://ACCOUNT.blob.core.windows.net/CONTAINER`` is a blob container reached with
    DefaultAzureCredential; ``blob:CONTAINER`` one in the account of the connection string in
    ``AZURE_STORAGE_CONNECTION_STRING``; anything else is a local folder.
    """
    if location.startswith("https://"):
        return BlobCheckpointStore(scope, location)
    if location.startswith("blob:"):
        connection_string = storage_connection_string(location)
        return BlobCheckpointStore(scope, location.removeprefix("blob:"), connection_string)
    return FileCheckpointStore(location, scope)
