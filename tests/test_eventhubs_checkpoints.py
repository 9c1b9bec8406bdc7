"""Checkpoint interop on Azurite: what the pipeline commits, the Event Hubs SDK resumes from, and
the other way round.

The pipeline reads Event Hubs through the real SDK (its AMQP link layer replaced by the in-process
service of ``test_eventhubs_sdk``) and commits with ``CommitPositions`` into a blob container on
Azurite; then a real ``EventHubConsumerClient`` with the SDK's own ``BlobCheckpointStore`` over
the same container receives the partition, and must start exactly at the event after the
pipeline's commit. The SDK resumes from a checkpoint's offset (5.15 reads nothing else), so the
checkpoint must name the committed event by its real offset as well as its sequence number.
"""

from __future__ import annotations

import threading

import pytest
from apache_beam.testing.test_pipeline import TestPipeline

pytest.importorskip("azure.eventhub.extensions.checkpointstoreblob")

from azure.eventhub import EventHubConsumerClient  # noqa: E402
from azure.eventhub.extensions.checkpointstoreblob import (  # noqa: E402
    BlobCheckpointStore as SdkBlobStore,
)

from pipeline.io.hubs import checkpoint_scope  # noqa: E402
from pipeline.io.hubs.checkpoints import BlobCheckpointStore, resume_positions  # noqa: E402
from pipeline.io.hubs.progress import CommitPositions  # noqa: E402
from pipeline.io.hubs.source import POSITIONS, ReadFromHub  # noqa: E402
from tests.test_checkpoints import azurite, sdk_store_in_new_container  # noqa: E402, F401
from tests.test_eventhubs_sdk import (  # noqa: E402
    CONNECTION_STRING,
    GROUP,
    HUB,
    NAMESPACE,
    URL,
    FakeEventHubs,
    install,
)

SECOND = 1_000_000


def run_pipeline_commits(connection_string: str, container: str) -> list[tuple[str, str, int]]:
    """A bounded read of the hub whose positions ``CommitPositions`` commits to the container,
    as ``bms run --bounded --checkpoints`` does (no warehouse: nothing holds commits back but
    the join's 120 s)."""
    scope = checkpoint_scope(URL)

    def open_store():
        return BlobCheckpointStore(scope, container, connection_string)

    with TestPipeline(runner="DirectRunner") as pipeline:
        read = pipeline | ReadFromHub(URL, HUB, bounded=True, with_positions=True, batch_size=50)
        _ = (read[POSITIONS],) | CommitPositions(open_store, span=150 * SECOND)
    store = open_store()
    try:
        return sorted(
            (HUB, partition, sequence_number)
            for partition, sequence_number in store.last_processed(HUB).items()
        )
    finally:
        store.close()


def sdk_first_event(connection_string: str, container: str, partition: str, checkpoint: bool):
    """The first event an ``EventHubConsumerClient`` with the SDK's ``BlobCheckpointStore``
    receives from the partition (it starts from the store's checkpoint); with ``checkpoint``
    it then checkpoints that event, as an Azure Function or an SDK processor does."""
    sdk_store = SdkBlobStore.from_connection_string(connection_string, container)
    client = EventHubConsumerClient.from_connection_string(
        CONNECTION_STRING,
        consumer_group=GROUP,
        eventhub_name=HUB,
        checkpoint_store=sdk_store,
        load_balancing_interval=0.2,
    )
    received = []
    done = threading.Event()

    def on_event(context, event):
        if event is not None and not received:
            received.append(event)
            if checkpoint:
                context.update_checkpoint(event)
            done.set()

    thread = threading.Thread(
        target=client.receive,
        kwargs={"on_event": on_event, "partition_id": partition, "starting_position": "-1"},
        daemon=True,
    )
    thread.start()
    try:
        assert done.wait(30), "the SDK consumer received nothing"
    finally:
        client.close()
        thread.join(10)
        sdk_store.close()
    return received[0]


def test_the_sdk_resumes_exactly_after_the_pipelines_commit(azurite, monkeypatch):  # noqa: F811
    service = install(monkeypatch, FakeEventHubs(partitions=2, per_call=50))
    service.append(HUB, "0", 300)  # one a second
    service.append(HUB, "1", 200)  # ends at 199 s: commits stay 120 s behind it (the join)
    sdk_store_in_new_container(azurite, "interop").close()

    assert run_pipeline_commits(azurite, "interop") == [(HUB, "0", 79), (HUB, "1", 79)]

    # The checkpoint blobs name those events by sequence number and real offset.
    offsets = {
        (partition, stored.sequence_number): str(stored.offset)
        for (hub, partition), log in service.events.items()
        for stored in log
    }
    sdk_store = SdkBlobStore.from_connection_string(azurite, "interop")
    listed = sdk_store.list_checkpoints(NAMESPACE, HUB, GROUP)
    sdk_store.close()
    assert sorted((c["partition_id"], c["sequence_number"], c["offset"]) for c in listed) == [
        ("0", 79, offsets[("0", 79)]),
        ("1", 79, offsets[("1", 79)]),
    ]

    # The SDK's own consumer over the same container starts right after them.
    attaches = len(service.attaches)
    first = sdk_first_event(azurite, "interop", "0", checkpoint=True)
    assert (first.sequence_number, first.offset) == (80, offsets[("0", 80)])
    sdk_attach = service.attaches[attaches]
    assert sdk_attach["selector"] == f"amqp.annotation.x-opt-offset > '{offsets[('0', 79)]}'"

    # And the pipeline resumes after what the SDK checkpointed (and after its own commits).
    scope = checkpoint_scope(URL)
    store = BlobCheckpointStore(scope, "interop", azurite)
    try:
        assert resume_positions(store, HUB) == {"0": 81, "1": 80}
    finally:
        store.close()
