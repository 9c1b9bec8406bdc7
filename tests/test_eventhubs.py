"""Azure Event Hubs adapters at the SDK boundary: real azure-eventhub objects, fakes only where the
network would be (the AMQP link to the service), plus live tests against a real namespace."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

pytest.importorskip("azure.eventhub")

from azure.eventhub import EventData  # noqa: E402
from azure.eventhub._pyamqp.message import Message  # noqa: E402  (what the service delivers)
from azure.eventhub.exceptions import (  # noqa: E402
    AuthenticationError,
    ConnectionLostError,
)

from pipeline.errors import UsageError  # noqa: E402
from pipeline.io.hubs import (  # noqa: E402
    OutgoingEvent,
    PartitionProperties,
    eventhubs,  # noqa: E402
    open_hub,
)
from pipeline.io.hubs.eventhubs import (  # noqa: E402
    EventHubsAddress,
    EventHubsClient,
    HubReadError,
    starting_position,
    to_hub_event,
    to_partition_properties,
)
from pipeline.io.hubs.source import ReadFromHub  # noqa: E402
from pipeline.schema import HubEvent, datetime_to_micros  # noqa: E402
from producers.eventhubs import EventHubsPublisher  # noqa: E402

BASE_MS = 1_770_546_600_123  # 2026-02-08T10:30:00.123Z in epoch milliseconds


def received_event(sequence_number: int, body: bytes, partition_key: str | None = None):
    """An EventData exactly as the consumer builds it from the AMQP message the service sends:
    the service stamps the x-opt-* message annotations, the enqueued time in epoch ms."""
    annotations = {
        b"x-opt-sequence-number": sequence_number,
        b"x-opt-offset": str(sequence_number * 512).encode(),
        b"x-opt-enqueued-time": BASE_MS + sequence_number * 1000,
    }
    if partition_key is not None:
        annotations[b"x-opt-partition-key"] = partition_key.encode()
    return EventData._from_message(Message(data=[body], message_annotations=annotations))


def expected_micros(sequence_number: int) -> int:
    return (BASE_MS + sequence_number * 1000) * 1000


class FakeConsumerClient:
    """Stands in for the service behind EventHubConsumerClient: holds partitions of received
    EventData and delivers them to receive_batch's callback as the service would."""

    def __init__(self, partitions: dict[str, list], deliver: bool = True):
        self.partitions = partitions
        self.deliver = deliver
        self.receives: list[dict] = []
        self.closed = threading.Event()

    def get_partition_ids(self):
        return sorted(self.partitions)

    def get_partition_properties(self, partition_id):
        events = self.partitions[partition_id]
        return {
            "eventhub_name": "bookingtopic",
            "id": partition_id,
            "beginning_sequence_number": events[0].sequence_number if events else 0,
            "last_enqueued_sequence_number": events[-1].sequence_number if events else -1,
            "last_enqueued_offset": events[-1].offset if events else "-1",
            "last_enqueued_time_utc": events[-1].enqueued_time if events else None,
            "is_empty": not events,
        }

    def receive_batch(self, on_event_batch, *, partition_id, starting_position, **options):
        self.receives.append({"partition_id": partition_id, "position": starting_position})
        self.receives[-1].update(options)
        inclusive = options.get("starting_position_inclusive", False)
        if starting_position == "-1":
            pending = list(self.partitions[partition_id])
        else:
            pending = [
                event
                for event in self.partitions[partition_id]
                if event.sequence_number > starting_position
                or (inclusive and event.sequence_number == starting_position)
            ]
        size = options["max_batch_size"]
        while self.deliver and pending and not self.closed.is_set():
            on_event_batch(None, pending[:size])
            pending = pending[size:]
        self.closed.wait()  # like the SDK: receive until the client is closed

    def close(self):
        self.closed.set()


def fake_namespace(partitions: dict[str, list], **kwargs):
    clients: list[FakeConsumerClient] = []

    def factory(hub):
        clients.append(FakeConsumerClient(partitions, **kwargs))
        return clients[-1]

    return factory, clients


def test_received_event_becomes_a_hub_event_with_microsecond_utc_enqueued_time():
    event = received_event(7, b'{"order_id": "o1"}', partition_key="o1")
    assert to_hub_event("bookingtopic", "2", event) == HubEvent(
        "bookingtopic", "2", 7, expected_micros(7), "o1", b'{"order_id": "o1"}'
    )
    assert expected_micros(0) == datetime_to_micros(
        dt.datetime(2026, 2, 8, 10, 30, 0, 123000, tzinfo=dt.UTC)
    )


def test_event_without_partition_key_and_with_multi_section_body():
    annotations = {b"x-opt-sequence-number": 0, b"x-opt-enqueued-time": BASE_MS}
    event = EventData._from_message(Message(data=[b"ab", b"cd"], message_annotations=annotations))
    hub_event = to_hub_event("paymentstopic", "0", event)
    assert hub_event.partition_key is None
    assert hub_event.body == b"abcd"


def test_partition_properties_from_the_service_dictionary():
    events = [received_event(n, b"x") for n in (3, 4, 5)]
    client = FakeConsumerClient({"0": events, "1": []})
    assert to_partition_properties(client.get_partition_properties("0")) == PartitionProperties(
        "0", 3, 5, expected_micros(5)
    )
    assert to_partition_properties(client.get_partition_properties("1")) == PartitionProperties(
        "1", 0, -1, None
    )
    expired = {
        "id": "2",
        "beginning_sequence_number": 0,
        "last_enqueued_sequence_number": 41,
        "last_enqueued_time_utc": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "is_empty": True,
    }
    assert to_partition_properties(expired) == PartitionProperties("2", 42, 41, None)


@pytest.mark.parametrize(
    ("sequence_number", "last_known", "expected"),
    [
        (5, 9, {"starting_position": 5, "starting_position_inclusive": True}),
        # At the end: inclusive on the last event (the reader drops that one repeat), never an
        # exclusive filter on it (azure-sdk-for-java #29502).
        (10, 9, {"starting_position": 9, "starting_position_inclusive": True}),
        (0, -1, {"starting_position": "-1", "starting_position_inclusive": False}),
    ],
)
def test_starting_position_never_asks_beyond_the_last_event(sequence_number, last_known, expected):
    assert starting_position(sequence_number, last_known) == expected


def test_reads_in_order_across_batches_with_one_receiver():
    partitions = {"0": [received_event(n, b"%d" % n, "k") for n in range(25)]}
    factory, clients = fake_namespace(partitions)
    client = EventHubsClient(EventHubsAddress("ns"), factory, max_batch_size=4, queue_batches=2)
    try:
        assert client.partition_ids("bookingtopic") == ["0"]
        read, position = [], 0
        while position < 25:
            events = client.read("bookingtopic", "0", position, 7)
            assert 0 < len(events) <= 7
            read += events
            position = events[-1].sequence_number + 1
        assert [e.sequence_number for e in read] == list(range(25))
        assert [e.body for e in read] == [b"%d" % n for n in range(25)]
        receivers = [c for c in clients if c.receives]
        assert len(receivers) == 1  # reading on from where it stopped reuses the receiver
        assert receivers[0].receives[0]["max_batch_size"] == 4
        started = time.monotonic()
        assert client.read("bookingtopic", "0", 25, 7) == []  # caught up: a short wait only
        assert time.monotonic() - started < 3
    finally:
        client.close()
    assert all(c.closed.is_set() for c in clients)


def test_jumping_to_another_sequence_number_restarts_the_receiver_there():
    partitions = {"0": [received_event(n, b"x") for n in range(10)]}
    factory, clients = fake_namespace(partitions)
    client = EventHubsClient(EventHubsAddress("ns"), factory)
    try:
        assert client.read("bookingtopic", "0", 0, 3)[-1].sequence_number == 2
        events = client.read("bookingtopic", "0", 6, 100)
        assert [e.sequence_number for e in events] == [6, 7, 8, 9]
        positions = [c.receives[0]["position"] for c in clients if c.receives]
        assert positions == [0, 6]
        assert clients[1].closed.is_set()  # the first receiver was closed on the jump
    finally:
        client.close()


def test_events_known_to_exist_but_never_delivered_fail_loudly():
    partitions = {"0": [received_event(n, b"x") for n in range(3)]}
    factory, _ = fake_namespace(partitions, deliver=False)
    client = EventHubsClient(EventHubsAddress("ns"), factory, receive_timeout=0.3)
    try:
        with pytest.raises(HubReadError, match="partition 0 at sequence number 1"):
            client.read("bookingtopic", "0", 1, 10)
    finally:
        client.close()


def test_receiver_failure_is_raised_to_the_reader():
    class Failing(FakeConsumerClient):
        def receive_batch(self, on_event_batch, **options):
            raise ConnectionLostError("link detached")

    client = EventHubsClient(
        EventHubsAddress("ns"), lambda hub: Failing({"0": [received_event(0, b"x")]})
    )
    try:
        with pytest.raises(HubReadError, match="ConnectionLostError: link detached"):
            client.read("bookingtopic", "0", 0, 10)
    finally:
        client.close()


def test_refused_credentials_give_one_line_with_what_to_do():
    class Refusing(FakeConsumerClient):
        def get_partition_ids(self):
            raise AuthenticationError("Unauthorized access. 'Listen' claim(s) are required")

    client = EventHubsClient(EventHubsAddress("ns"), lambda hub: Refusing({}))
    with pytest.raises(UsageError, match="EVENTHUB_CONNECTION_STRING.*az login"):
        client.partition_ids("bookingtopic")


def test_the_hub_source_reads_event_hubs_bounded(monkeypatch):
    """ReadFromHub (the one source) over EventHubsClient, on the Beam runner."""
    partitions = {
        str(p): [received_event(n, b"p%d-%d" % (p, n), f"o{n}") for n in range(p * 3)]
        for p in range(4)
    }
    monkeypatch.setenv(
        eventhubs.CONNECTION_STRING_ENV,
        "Endpoint=sb://ns.example/;SharedAccessKeyName=k;SharedAccessKey=s",
    )
    monkeypatch.setattr(
        eventhubs, "consumer_client", lambda address, hub: FakeConsumerClient(partitions)
    )
    assert isinstance(open_hub("eventhubs://"), EventHubsClient)
    expected = [
        (f"{p}", n, expected_micros(n), b"p%d-%d" % (p, n)) for p in range(4) for n in range(p * 3)
    ]
    with TestPipeline(runner="DirectRunner") as pipeline:
        events = pipeline | ReadFromHub("eventhubs://", "bookingtopic", bounded=True, batch_size=4)
        stamped = events | beam.Map(
            lambda e, t=beam.DoFn.TimestampParam: (e.partition, e.sequence_number, t.micros, e.body)
        )
        assert_that(stamped, equal_to(expected))


@pytest.mark.parametrize(
    ("url", "environment", "expected"),
    [
        (
            "eventhubs://ns.servicebus.windows.net",
            {},
            EventHubsAddress("ns.servicebus.windows.net"),
        ),
        (
            "eventhubs://ns.servicebus.windows.net?consumer_group=bms",
            {},
            EventHubsAddress("ns.servicebus.windows.net", "bms"),
        ),
        (
            "eventhubs://",
            {"EVENTHUB_CONNECTION_STRING": "Endpoint=sb://x/"},
            EventHubsAddress(None),
        ),
    ],
)
def test_address_from_url(monkeypatch, url, environment, expected):
    monkeypatch.delenv(eventhubs.CONNECTION_STRING_ENV, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert EventHubsAddress.parse(url) == expected


def test_address_errors_say_what_to_do(monkeypatch):
    monkeypatch.delenv(eventhubs.CONNECTION_STRING_ENV, raising=False)
    with pytest.raises(UsageError, match="names no namespace.*EVENTHUB_CONNECTION_STRING"):
        EventHubsAddress.parse("eventhubs://")
    with pytest.raises(UsageError, match="unknown option"):
        EventHubsAddress.parse("eventhubs://ns?group=x")
    monkeypatch.setenv(
        eventhubs.CONNECTION_STRING_ENV,
        "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=s;"
        "EntityPath=bookingtopic",
    )
    with pytest.raises(UsageError, match="namespace-level connection string") as error:
        EventHubsAddress.parse("eventhubs://").client_arguments("bookingtopic")
    assert "SharedAccessKey=s" not in str(error.value)  # the secret is never echoed
    monkeypatch.setenv(
        eventhubs.CONNECTION_STRING_ENV,
        "Endpoint=sb://other.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=s",
    )
    with pytest.raises(UsageError, match="is for other.servicebus.windows.net"):
        EventHubsAddress("ns.servicebus.windows.net").client_arguments("bookingtopic")


def test_namespace_without_connection_string_uses_default_azure_credential(monkeypatch):
    monkeypatch.delenv(eventhubs.CONNECTION_STRING_ENV, raising=False)
    arguments = EventHubsAddress("ns.servicebus.windows.net").client_arguments("paymentstopic")
    assert type(arguments["credential"]).__name__ == "DefaultAzureCredential"
    assert arguments["eventhub_name"] == "paymentstopic"
    client = eventhubs.consumer_client(EventHubsAddress("ns.servicebus.windows.net"), "x")
    assert client.eventhub_name == "x"  # a real SDK client; nothing connects until it is used
    client.close()


def test_missing_sdk_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "azure.eventhub", None)
    with pytest.raises(UsageError, match=r"pip install -e '\.\[azure\]' in the bms checkout"):
        EventHubsClient.from_url("eventhubs://ns.servicebus.windows.net")


def test_importing_the_pipeline_does_not_need_azure_libraries():
    code = (
        "import sys, pipeline.io.hubs, pipeline.io.hubs.eventhubs, pipeline.io.hubs.checkpoints, "
        "pipeline.io.hubs.positions, producers.eventhubs, pipeline.pipeline, pipeline.cli\n"
        "loaded = [m for m in sys.modules if m.startswith(('azure.eventhub', 'pyodbc'))]\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# Publishing (the SDK's buffered producer) is tested in test_eventhubs_producer.py.


live = pytest.mark.skipif(
    not os.environ.get("EVENTHUB_CONNECTION_STRING") and not os.environ.get("EVENTHUB_NAMESPACE"),
    reason="live Event Hubs test: set EVENTHUB_CONNECTION_STRING (or EVENTHUB_NAMESPACE with an "
    "Azure identity) to a namespace holding bookingtopic",
)


@pytest.mark.live
@live
def test_live_publish_then_read_back():
    url = "eventhubs://" + os.environ.get("EVENTHUB_NAMESPACE", "")
    group = os.environ.get("EVENTHUB_CONSUMER_GROUP")
    if group:
        url += f"?consumer_group={group}"
    marker = uuid.uuid4().hex.encode()
    client = EventHubsClient.from_url(url)
    publisher = EventHubsPublisher.from_url(url)
    try:
        partitions = client.partition_ids("bookingtopic")
        before = {p: client.partition_properties("bookingtopic", p) for p in partitions}
        publisher.send("bookingtopic", [OutgoingEvent("live-test", marker)])
        found = []
        for partition in partitions:
            position = before[partition].last_sequence_number + 1
            found += [
                e for e in client.read("bookingtopic", partition, position, 100) if e.body == marker
            ]
        assert len(found) == 1
        assert found[0].partition_key == "live-test"
        assert abs(found[0].enqueued_time - time.time_ns() // 1000) < 600_000_000
    finally:
        publisher.close()
        client.close()
