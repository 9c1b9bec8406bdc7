"""The Event Hubs reader against the real azure-eventhub SDK (5.15), with only its AMQP link layer
replaced by an in-process Event Hubs service (``FakeEventHubs``), so nothing touches the network.

The SDK runs as it does against Azure: ``EventHubConsumerClient.receive_batch``, its
``EventProcessor`` and load balancing, ``EventHubConsumer`` with its internal retries and
reconnects at the last event it delivered, the in-memory checkpoint store, management requests,
error translation (pyamqp conditions to ``ConnectionLostError``/``ConnectError``), the producer and
its buffered mode. What is replaced is pyamqp's client at the link (``AMQPClient.open``, ``close``,
``client_ready``, ``mgmt_request``, ``ReceiveClient._client_run``,
``SendClient._send_message_impl``): attaching a link, delivering transfers, detaching with an error
condition, answering management requests. The service holds partitions of events with sequence
numbers, byte offsets and enqueued times, honours the selector filters the SDK sends (sequence
number, offset, enqueued time, inclusive or not), stamps the last-enqueued delivery annotations a
receiver asks for, and enforces the service's reader rules: at most 5 readers per partition and
consumer group, and epochs (a reader with a higher ``owner_level`` disconnects the others with
``amqp:link:stolen``; a lower or no epoch is refused while a higher one is attached).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import Counter, defaultdict
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.transforms.window import TimestampedValue

pytest.importorskip("azure.eventhub")

from azure.eventhub._buffered_producer._partition_resolver import (  # noqa: E402
    PartitionResolver,
)
from azure.eventhub._pyamqp import _decode  # noqa: E402
from azure.eventhub._pyamqp.client import AMQPClient, ReceiveClient, SendClient  # noqa: E402
from azure.eventhub._pyamqp.error import (  # noqa: E402
    AMQPLinkError,
    ErrorCondition,
    MessageException,
)
from azure.eventhub._pyamqp.message import Message  # noqa: E402

from pipeline.io.hubs import eventhubs  # noqa: E402
from pipeline.io.hubs.eventhubs import (  # noqa: E402
    EventHubsAddress,
    EventHubsClient,
    consumer_client,
    error_condition,
    is_server_busy,
    next_owner_level,
)
from pipeline.io.hubs.positions import StartPosition, first_sequence_number  # noqa: E402
from pipeline.io.hubs.progress import PositionMark  # noqa: E402
from pipeline.io.hubs.source import (  # noqa: E402
    PartitionRange,
    _ReadPartitionFn,
    _ReadPartitionUnboundedFn,
    _WatchPartitions,
)
from tests.test_source import watch  # noqa: E402

NAMESPACE = "fake.servicebus.windows.net"
CONNECTION_STRING = f"Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName=k;SharedAccessKey=s"
HUB = "bookingtopic"
GROUP = "bms"
URL = f"eventhubs://?consumer_group={GROUP}"
BASE_MS = 1_770_546_600_000  # 2026-02-08T10:30:00Z
SERVER_BUSY = b"com.microsoft:server-busy"
EPOCH = b"com.microsoft:epoch"
RUNTIME_METRIC = b"com.microsoft:enable-receiver-runtime-metric"
SELECTOR = b"apache.org:selector-filter:string"
RECEIVER_LIMIT = 5


class Stored(NamedTuple):
    sequence_number: int
    offset: int  # byte position in the partition's log: unrelated to the sequence number
    enqueued_ms: int
    partition_key: str | None
    body: bytes


class Link:
    """One receiver link attached to the service."""

    def __init__(self, hub, group, partition, epoch, start, tracking):
        self.hub, self.group, self.partition = hub, group, partition
        self.epoch = epoch
        self.next_index = start  # index into the partition's events
        self.tracking = tracking
        self.stolen = False
        self.error: Exception | None = None  # the attach was refused


class Fault(NamedTuple):
    """A link error the service raises ``times`` times on receives of a partition once it has
    delivered ``after`` events of it (``until``: instead, on every receive until that time)."""

    partition: str
    after: int
    times: int
    condition: bytes
    until: float | None = None


def _selector(source) -> str | None:
    filters = source.filters or {}
    entry = filters.get(SELECTOR)
    if entry is None:
        return None
    value = entry[1]["VALUE"] if isinstance(entry[1], dict) else entry[1]
    return value.decode() if isinstance(value, bytes) else value


class FakeEventHubs:
    """An Event Hubs namespace in memory, at the AMQP link (see the module doc)."""

    def __init__(self, partitions: int = 2, hubs=("bookingtopic", "paymentstopic"), per_call=4):
        self.partition_ids = [str(p) for p in range(partitions)]
        self.hubs = hubs
        self.per_call = per_call  # transfers delivered per receive call, like frames on a socket
        self.changed = threading.Condition()
        self.events: dict[tuple[str, str], list[Stored]] = {
            (hub, p): [] for hub in hubs for p in self.partition_ids
        }
        self.receivers: dict[tuple[str, str, str], list[Link]] = defaultdict(list)
        self.peak: Counter = Counter()  # most receivers attached at once, per key
        self.attaches: list[dict] = []
        self.refusals: list[tuple[tuple[str, str, str], bytes]] = []
        self.delivered: Counter = Counter()  # transfers, per (hub, partition)
        self.faults: list[Fault] = []
        self.management: Counter = Counter()  # requests, per operation
        self.management_faults: list = []  # conditions (a link error), or errors to raise
        self.send_faults: list[tuple[str, bytes]] = []  # ("detach" | "reject", condition)
        self.transfers: list[tuple[str, str, int]] = []  # (hub, partition, events) per send
        self.max_message_size = 1024 * 1024

    # ---- the log ----------------------------------------------------------------------------

    def append(self, hub: str, partition: str, count: int, key: str | None = "k", gap_ms=1000):
        with self.changed:
            log = self.events[(hub, partition)]
            for _ in range(count):
                sequence = log[-1].sequence_number + 1 if log else 0
                offset = log[-1].offset + 37 + len(log[-1].body) * 3 if log else 4096
                when = BASE_MS + sequence * gap_ms
                log.append(
                    Stored(sequence, offset, when, key, f"{hub}-{partition}-{sequence}".encode())
                )
            self.changed.notify_all()

    def _store(self, hub: str, partition: str, key, body: bytes) -> None:
        log = self.events[(hub, partition)]
        sequence = log[-1].sequence_number + 1 if log else 0
        offset = log[-1].offset + 37 + len(log[-1].body) * 3 if log else 4096
        log.append(Stored(sequence, offset, int(time.time() * 1000), key, body))

    def add_partitions(self, count: int) -> None:
        """Grows every hub to ``count`` partitions, as Premium and Dedicated namespaces allow."""
        with self.changed:
            for partition in map(str, range(len(self.partition_ids), count)):
                self.partition_ids.append(partition)
                for hub in self.hubs:
                    self.events[(hub, partition)] = []

    def expire(self, hub: str, partition: str, before: int) -> None:
        with self.changed:
            key = (hub, partition)
            self.events[key] = [e for e in self.events[key] if e.sequence_number >= before]

    def start_index(self, log: list[Stored], selector: str | None) -> int:
        if selector is None:
            return len(log)  # no filter: the service starts at the end
        match = re.fullmatch(r"amqp\.annotation\.x-opt-([a-z-]+) (>=?) '(.*)'", selector)
        field, operator, value = match.groups()
        if field == "offset" and value in ("-1", "@latest"):
            return 0 if value == "-1" else len(log)
        attribute = {
            "offset": "offset",
            "sequence-number": "sequence_number",
            "enqueued-time": "enqueued_ms",
        }[field]
        bound = int(value)
        if (
            field == "sequence-number"
            and log
            and bound > log[-1].sequence_number + (operator == ">")
        ):
            raise AssertionError(f"the service rejects {selector!r}: beyond the last event")
        for index, event in enumerate(log):
            here = getattr(event, attribute)
            if here > bound or (operator == ">=" and here == bound):
                return index
        return len(log)

    # ---- receivers --------------------------------------------------------------------------

    def attach(self, client: ReceiveClient) -> None:
        address = client.source.address
        address = address.decode() if isinstance(address, bytes) else address
        match = re.fullmatch(
            r"amqps://[^/]+/([^/]+)/ConsumerGroups/([^/]+)/Partitions/(.+)", address
        )
        hub, group, partition = match.groups()
        properties = client._link_properties or {}
        epoch = properties.get(EPOCH)
        epoch = epoch["VALUE"] if isinstance(epoch, dict) else epoch
        selector = _selector(client.source)
        tracking = RUNTIME_METRIC in (client._desired_capabilities or [])
        key = (hub, group, partition)
        with self.changed:
            log = self.events[(hub, partition)]
            link = Link(hub, group, partition, epoch, self.start_index(log, selector), tracking)
            self.attaches.append(
                {"key": key, "epoch": epoch, "selector": selector, "tracking": tracking}
            )
            current = self.receivers[key]
            epochs = [other.epoch for other in current if other.epoch is not None]
            refusal = None
            if epoch is None and epochs:
                refusal = (ErrorCondition.LinkStolen, "an epoch receiver is attached")
            elif epoch is None and len(current) >= RECEIVER_LIMIT:
                refusal = (
                    ErrorCondition.ResourceLimitExceeded,
                    "Exceeded the maximum number of allowed receivers per partition in a "
                    "consumer group which is 5",
                )
            elif epoch is not None and epochs and max(epochs) > epoch:
                refusal = (
                    ErrorCondition.LinkStolen,
                    f"a receiver with a higher epoch than {epoch}",
                )
            if refusal is not None:
                link.error = AMQPLinkError(refusal[0], description=refusal[1])
                self.refusals.append((key, refusal[0]))
            else:
                if epoch is not None:
                    for other in current:
                        other.stolen = True
                    current.clear()
                current.append(link)
                self.peak[key] = max(self.peak[key], len(current))
        client._fake_link = link

    def detach(self, client) -> None:
        link = getattr(client, "_fake_link", None)
        if link is None:
            return
        with self.changed:
            current = self.receivers[(link.hub, link.group, link.partition)]
            if link in current:
                current.remove(link)
        client._fake_link = None

    def attached(self, hub: str = HUB, partition: str = "0", group: str = GROUP) -> int:
        with self.changed:
            return len(self.receivers[(hub, group, partition)])

    def receive(self, client: ReceiveClient, batch: int | None) -> bool:
        link: Link = client._fake_link
        if link is None or link.error is not None:
            raise link.error if link else AMQPLinkError(ErrorCondition.LinkDetachForced)
        if link.stolen:
            raise AMQPLinkError(
                ErrorCondition.LinkStolen,
                description="New receiver with higher epoch is created hence current receiver "
                "is getting disconnected",
            )
        key = (link.hub, link.partition)
        with self.changed:
            for index, fault in enumerate(self.faults):
                if fault.partition != link.partition:
                    continue
                if fault.until is not None:
                    if time.monotonic() < fault.until:
                        raise AMQPLinkError(fault.condition, description="the service is busy")
                    continue
                if self.delivered[key] >= fault.after and fault.times > 0:
                    self.faults[index] = fault._replace(times=fault.times - 1)
                    raise AMQPLinkError(fault.condition, description="injected link error")
            log = self.events[key]
            pending = log[link.next_index : link.next_index + min(batch or 300, self.per_call)]
            if not pending:
                self.changed.wait(0.05)
                return True
            link.next_index += len(pending)
            self.delivered[key] += len(pending)
            last = log[-1]
        for stored in pending:
            client._message_received(None, self._message(stored, last if link.tracking else None))
        return True

    @staticmethod
    def _message(stored: Stored, last: Stored | None) -> Message:
        annotations = {
            b"x-opt-sequence-number": stored.sequence_number,
            b"x-opt-offset": str(stored.offset).encode(),
            b"x-opt-enqueued-time": stored.enqueued_ms,
        }
        if stored.partition_key is not None:
            annotations[b"x-opt-partition-key"] = stored.partition_key
        delivery = None
        if last is not None:
            delivery = {
                b"last_enqueued_sequence_number": last.sequence_number,
                b"last_enqueued_offset": str(last.offset).encode(),
                b"last_enqueued_time_utc": last.enqueued_ms,
                b"runtime_info_retrieval_time_utc": int(time.time() * 1000),
            }
        return Message(
            data=[stored.body], message_annotations=annotations, delivery_annotations=delivery
        )

    # ---- management ------------------------------------------------------------------------

    def manage(self, message, operation_type) -> tuple[int, bytes, Any]:
        operation_type = (
            operation_type.decode() if isinstance(operation_type, bytes) else operation_type
        )
        self.management[operation_type] += 1
        if self.management_faults:
            fault = self.management_faults.pop(0)
            raise fault if isinstance(fault, Exception) else AMQPLinkError(fault, description="x")
        properties = message.application_properties
        hub = properties["name"]
        if operation_type == "com.microsoft:eventhub":
            value = {
                b"name": hub.encode(),
                b"created_at": BASE_MS,
                b"partition_ids": [p.encode() for p in self.partition_ids],
            }
        else:
            partition = properties["partition"]
            with self.changed:
                log = self.events[(hub, partition)]
                last = log[-1] if log else None
                value = {
                    b"name": hub.encode(),
                    b"partition": partition.encode(),
                    b"begin_sequence_number": log[0].sequence_number if log else 0,
                    b"last_enqueued_sequence_number": last.sequence_number if last else -1,
                    b"last_enqueued_offset": str(last.offset if last else -1).encode(),
                    b"is_partition_empty": not log,
                    b"last_enqueued_time_utc": last.enqueued_ms if last else 0,
                }
        return 200, b"OK", SimpleNamespace(value=value)

    # ---- senders ---------------------------------------------------------------------------

    def accept(self, client: SendClient, message) -> None:
        target = client.target
        target = target.decode() if isinstance(target, bytes) else target
        match = re.fullmatch(r"amqps://[^/]+/([^/]+)(?:/Partitions/(.+))?", target)
        hub, partition = match.groups()
        if self.send_faults:
            kind, condition = self.send_faults.pop(0)
            if kind == "detach":
                raise AMQPLinkError(condition, description="the service is busy")
            raise MessageException(condition, description="the service is busy")
        if type(message).__name__ == "BatchMessage":
            messages = [_decode.decode_payload(memoryview(bytes(part))) for part in message.data]
        else:
            messages = [message]
        with self.changed:
            for one in messages:
                annotations = one.message_annotations or {}
                key = annotations.get(b"x-opt-partition-key")
                key = key.decode() if isinstance(key, bytes) else key
                into = partition
                if into is None:
                    resolver = PartitionResolver(self.partition_ids)
                    into = resolver.get_partition_id_by_partition_key(key) if key else "0"
                self._store(hub, into, key, b"".join(one.data))
            self.transfers.append((hub, partition, len(messages)))
            self.changed.notify_all()


def install(monkeypatch, service: FakeEventHubs) -> FakeEventHubs:
    """Puts ``service`` behind pyamqp's link layer, and the connection string in the
    environment."""

    def open_(self, connection=None):
        self._shutdown = False
        self._session = True
        if isinstance(self, ReceiveClient):
            service.attach(self)

    def close(self):
        self._shutdown = True
        self._session = None
        service.detach(self)

    def client_ready(self):
        if isinstance(self, ReceiveClient):
            link = getattr(self, "_fake_link", None)
            if link is not None and link.error is not None:
                raise link.error
        if isinstance(self, SendClient):
            self._link = SimpleNamespace(remote_max_message_size=service.max_message_size)
        return True

    def mgmt_request(self, message, *, operation=None, operation_type=None, **kwargs):
        return service.manage(message, operation_type)

    def client_run(self, **kwargs):
        return service.receive(self, kwargs.get("batch"))

    def send_message_impl(self, message, *, timeout=0):
        service.accept(self, message)

    monkeypatch.setattr(AMQPClient, "open", open_)
    monkeypatch.setattr(AMQPClient, "close", close)
    monkeypatch.setattr(AMQPClient, "client_ready", client_ready)
    monkeypatch.setattr(AMQPClient, "mgmt_request", mgmt_request)
    monkeypatch.setattr(ReceiveClient, "_client_run", client_run)
    monkeypatch.setattr(SendClient, "_send_message_impl", send_message_impl)
    monkeypatch.setenv(eventhubs.CONNECTION_STRING_ENV, CONNECTION_STRING)
    return service


@pytest.fixture
def service(monkeypatch):
    return install(monkeypatch, FakeEventHubs())


ADDRESS = EventHubsAddress(None, GROUP)


def sdk_client(**options):
    """A client factory making real SDK consumer clients the way the pipeline does."""
    return lambda hub: consumer_client(ADDRESS, hub, **options)


def drive(fn, element, tracker):
    """One ``process`` call as a runner makes it: (sequence numbers emitted, marks, deferred)."""
    threadsafe = ThreadsafeRestrictionTracker(tracker)
    watermark = ManualWatermarkEstimator(None)
    outputs = list(fn.process(element, RestrictionTrackerView(threadsafe), watermark))
    threadsafe.check_done()
    events = [out.value for out in outputs if isinstance(out, TimestampedValue)]
    marks = [out.value.value for out in outputs if isinstance(out, TaggedOutput)]
    status = threadsafe.deferred_status()
    return events, marks, status[0] if status else None


def read_fn(bounded: bool, client: EventHubsClient | None = None, batch_size: int = 5):
    fn_class = _ReadPartitionFn if bounded else _ReadPartitionUnboundedFn
    fn = fn_class(
        URL,
        batch_size=batch_size,
        poll_interval=0.05,
        idle_allowance=5.0,
        watermark_delay=0.0,
        max_batches_per_call=sys.maxsize if bounded else 10,
    )
    fn.setup()
    if client is not None:
        fn._client.close()
        fn._client = client
    return fn


# ---- 1. redelivery ---------------------------------------------------------------------------


def test_a_lost_link_redelivers_and_the_source_still_claims_each_position_once(service):
    """A ``ConnectionLostError`` mid-stream: the SDK reconnects at its last delivered event,
    inclusive, so that event (and what it had buffered) comes again, behind events the reader
    has queued already. The source must claim strictly increasing positions (Beam's tracker
    raises "Positions claimed should strictly increase" otherwise) and emit each event once."""
    service.append(HUB, "0", 60)
    service.faults = [Fault("0", after=13, times=1, condition=ErrorCondition.LinkDetachForced)]
    fn = read_fn(bounded=True, batch_size=30)
    try:
        assert [e.sequence_number for e in fn._client.read(HUB, "0", 0, 1)] == [0]
        time.sleep(1.0)  # the reader queues batches on both sides of the reconnect meanwhile
        element = PartitionRange(HUB, "0", 1, 60)
        events, marks, deferred = drive(fn, element, OffsetRestrictionTracker(OffsetRange(1, 60)))
    finally:
        fn.teardown()
    assert service.faults[0].times == 0  # it struck
    assert service.delivered[(HUB, "0")] > 60  # and the service sent some events twice
    assert [event.sequence_number for event in events] == list(range(1, 60))
    assert deferred is None and marks[-1].final and marks[-1].sequence_number == 59


def test_a_consumer_made_anew_after_the_sdks_retries_starts_after_the_last_event(service):
    """A partition failing more often than the SDK retries: it drops the consumer and makes a new
    one from its in-memory checkpoint, which the reader moves along with the events it queues,
    so the new consumer starts where the reader was, not at the original position."""
    service.append(HUB, "0", 60)
    service.faults = [
        Fault("0", after=30, times=6, condition=ErrorCondition.LinkDetachForced),  # > retry_total
    ]
    fn = read_fn(bounded=True)
    try:
        element = PartitionRange(HUB, "0", 0, 60)
        events, marks, deferred = drive(fn, element, OffsetRestrictionTracker(OffsetRange(0, 60)))
    finally:
        fn.teardown()
    assert [event.sequence_number for event in events] == list(range(60))
    assert deferred is None and marks[-1].final and marks[-1].sequence_number == 59
    assert service.faults[0].times == 0
    first, *later = service.attaches
    assert first["selector"] == "amqp.annotation.x-opt-sequence-number >= '0'"
    log = service.events[(HUB, "0")]
    later_starts = [service.start_index(log, attach["selector"]) for attach in later]
    assert later and all("x-opt-offset" in attach["selector"] for attach in later)
    assert min(later_starts) >= 25
    assert service.delivered[(HUB, "0")] < 60 + 10  # a few repeats, never the whole log again


def test_a_caught_up_reader_starts_inclusive_on_the_last_event_and_drops_that_repeat(service):
    service.append(HUB, "0", 10)
    client = EventHubsClient(ADDRESS, sdk_client(), idle_wait=0.5)
    try:
        assert client.read(HUB, "0", 10, 100) == []
        assert service.attaches[-1]["selector"] == "amqp.annotation.x-opt-sequence-number >= '9'"
        service.append(HUB, "0", 2)
        events = []
        deadline = time.monotonic() + 10
        while len(events) < 2 and time.monotonic() < deadline:
            events += client.read(HUB, "0", 10 + len(events), 100)
        assert [event.sequence_number for event in events] == [10, 11]
    finally:
        client.close()


def test_received_events_carry_their_offsets_into_the_position_marks(service):
    service.append(HUB, "0", 12)
    fn = read_fn(bounded=True)
    try:
        element = PartitionRange(HUB, "0", 0, 12)
        events, marks, _ = drive(fn, element, OffsetRestrictionTracker(OffsetRange(0, 12)))
    finally:
        fn.teardown()
    offsets = {stored.sequence_number: str(stored.offset) for stored in service.events[(HUB, "0")]}
    assert [event.offset for event in events] == [offsets[n] for n in range(12)]
    read_marks = [mark for mark in marks if not mark.final]  # final marks are never committed
    assert read_marks and all(
        isinstance(mark, PositionMark) and mark.offset == offsets[mark.sequence_number]
        for mark in read_marks
    )


def test_a_caught_up_reader_does_not_poll_partition_properties(service):
    service.append(HUB, "0", 5)
    client = EventHubsClient(ADDRESS, sdk_client(), idle_wait=0.1)
    try:
        assert len(client.read(HUB, "0", 0, 100)) >= 1
        position = 0
        deadline = time.monotonic() + 10
        while position < 5 and time.monotonic() < deadline:
            events = client.read(HUB, "0", position, 100)
            position = events[-1].sequence_number + 1 if events else position
        before = service.management["com.microsoft:partition"]
        started = time.monotonic()
        while time.monotonic() - started < 2.5:  # caught up: reads return nothing
            assert client.read(HUB, "0", 5, 100) == []
        assert service.management["com.microsoft:partition"] == before
        service.append(HUB, "0", 1)  # the last sequence number comes with the event
        deadline = time.monotonic() + 10
        events = []
        while not events and time.monotonic() < deadline:
            events = client.read(HUB, "0", 5, 100)
        assert [event.sequence_number for event in events] == [5]
        assert all(attach["tracking"] for attach in service.attaches)
    finally:
        client.close()


def test_caught_up_pieces_and_pieces_beyond_the_end_ask_the_service_nothing_but_reads(service):
    """Failure mode 6: a caught-up partition asked for its properties up to once a second, and so
    did every piece of its open range split off beyond its end. Now where the partition ends
    comes with the events (the last-enqueued properties): the reading piece asks nothing, and
    the piece beyond the end asks once, since the partition cannot reach it for ages."""
    service.append(HUB, "0", 5)
    fn = read_fn(False, EventHubsClient(ADDRESS, sdk_client(), idle_wait=0.05))
    element = PartitionRange(HUB, "0", 0, None)
    tracker = OffsetRestrictionTracker(OffsetRange(0, sys.maxsize))
    _, residual = tracker.try_split(0.5)  # the runner splits the open range: [2**62, ...) left
    offsets = {stored.sequence_number: str(stored.offset) for stored in service.events[(HUB, "0")]}
    try:
        events, marks, piece = drive(fn, element, tracker)
        # The reader's start asked where the partition ends (the client knew nothing yet).
        assert service.management["com.microsoft:partition"] == 1
        # Caught up: the event's mark, then the one saying the partition's time moves on.
        assert [(mark.sequence_number, mark.offset) for mark in marks] == [(4, offsets[4])] * 2
        seen = [event.sequence_number for event in events]
        started, calls = time.monotonic(), 0
        while time.monotonic() - started < 2.5 or len(seen) < 7:
            events, marks, piece = drive(fn, element, OffsetRestrictionTracker(piece))
            seen += [event.sequence_number for event in events]
            assert drive(fn, element, OffsetRestrictionTracker(residual)) == ([], [], residual)
            calls += 1
            if calls == 10:
                service.append(HUB, "0", 2)
                offsets = {s.sequence_number: str(s.offset) for s in service.events[(HUB, "0")]}
        assert marks[-1].sequence_number == 6 and marks[-1].offset == offsets[6]
    finally:
        fn.teardown()
    assert seen == list(range(7)) and calls > 20
    assert service.management["com.microsoft:partition"] == 2  # the far piece asked once


def test_a_streaming_read_finds_a_partition_added_to_the_namespace(service):
    """Failure mode 6, partitions listed once: an Event Hubs Premium or Dedicated namespace can
    add partitions to a hub; the watcher lists them again, one management request per listing,
    and emits the new one from its first event."""
    service.append(HUB, "0", 3)
    fn = _WatchPartitions(URL, StartPosition.latest(), None, interval=1.0, idle_allowance=5.0)
    fn.setup()
    try:
        watermark = ManualWatermarkEstimator(None)
        first = watch(fn, OffsetRange(0, sys.maxsize), watermark)
        assert [found for found, _ in first.ranges] == [
            PartitionRange(HUB, "0", 3, None),
            PartitionRange(HUB, "1", 0, None),
        ]
        listings = service.management["com.microsoft:eventhub"]
        properties = service.management["com.microsoft:partition"]
        again = watch(fn, first.deferred, ManualWatermarkEstimator(watermark.current_watermark()))
        assert again.ranges == [] and again.deferred == OffsetRange(2, sys.maxsize)
        assert service.management["com.microsoft:eventhub"] == listings + 1
        assert service.management["com.microsoft:partition"] == properties
        listed = watermark.current_watermark()
        service.add_partitions(3)
        service.append(HUB, "2", 2)
        found = watch(fn, again.deferred, watermark)
        assert found.ranges == [(PartitionRange(HUB, "2", 0, None), listed.micros)]
        assert found.deferred == OffsetRange(3, sys.maxsize)
    finally:
        fn.teardown()


# ---- 3. epochs, the 5-reader limit, idle readers, one credential -----------------------------


def test_many_splits_over_many_workers_stay_within_the_reader_limit(service):
    """A long streaming run in which the runner hands pieces of one partition's open range to
    seven DoFn instances in turn (as Dataflow moves residuals between workers): every instance
    keeps its client, nobody tells a reader to go, and the service allows 5 readers per
    partition and consumer group. Epoch readers make the newest win; nothing is refused and
    every event is read once, in order."""
    service.append(HUB, "0", 5)
    workers = [
        read_fn(False, EventHubsClient(ADDRESS, sdk_client(), receive_timeout=5, idle_close=30))
        for _ in range(7)
    ]
    element = PartitionRange(HUB, "0", 0, None)
    piece = OffsetRange(0, sys.maxsize)
    seen = []
    try:
        for turn in range(21):
            fn = workers[turn % len(workers)]
            events, _, deferred = drive(fn, element, OffsetRestrictionTracker(piece))
            seen += [event.sequence_number for event in events]
            piece = deferred
            if turn % 2 == 0:
                service.append(HUB, "0", 3)
        while seen[-1] < service.events[(HUB, "0")][-1].sequence_number:
            events, _, piece = drive(fn, element, OffsetRestrictionTracker(piece))
            seen += [event.sequence_number for event in events]
    finally:
        for fn in workers:
            fn.teardown()
    assert seen == list(range(len(seen))) and len(seen) == 5 + 3 * 11
    assert service.refusals == []
    assert service.peak[(HUB, GROUP, "0")] <= RECEIVER_LIMIT
    epochs = [attach["epoch"] for attach in service.attaches]
    assert None not in epochs and epochs == sorted(epochs)
    assert service.attached() == 0  # every reader closed at teardown


def test_the_newest_reader_wins_and_an_older_one_reads_again_with_a_new_epoch(service):
    service.append(HUB, "0", 6)
    first = EventHubsClient(ADDRESS, sdk_client(), receive_timeout=5)
    second = EventHubsClient(ADDRESS, sdk_client(), receive_timeout=5)
    try:
        assert [e.sequence_number for e in first.read(HUB, "0", 0, 2)] == [0, 1]
        assert [e.sequence_number for e in second.read(HUB, "0", 2, 2)] == [2, 3]
        deadline = time.monotonic() + 5
        while service.attached() != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.attached() == 1  # the first reader was disconnected
        events = []
        while not events and time.monotonic() < deadline:
            events = first.read(HUB, "0", 4, 2)
        assert [e.sequence_number for e in events] == [4, 5]
        assert service.refusals == []
        epochs = [attach["epoch"] for attach in service.attaches]
        assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)
    finally:
        first.close()
        second.close()


def test_idle_readers_are_closed_after_a_few_seconds(service):
    service.append(HUB, "0", 3)
    service.append(HUB, "1", 3)
    client = EventHubsClient(ADDRESS, sdk_client(), idle_close=0.6)
    try:
        assert client.read(HUB, "0", 0, 10)
        assert client.read(HUB, "1", 0, 10)
        assert client.open_readers() == 2
        deadline = time.monotonic() + 5
        while (client.open_readers() or service.attached("bookingtopic", "0")) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert client.open_readers() == 0 and service.attached() == 0
    finally:
        client.close()


def test_one_credential_object_per_process(monkeypatch):
    monkeypatch.delenv(eventhubs.CONNECTION_STRING_ENV, raising=False)
    monkeypatch.setattr(eventhubs, "_credential", None)
    address = EventHubsAddress("ns.servicebus.windows.net")
    credentials = {id(address.client_arguments(hub)["credential"]) for hub in ("a", "b", "a")}
    assert len(credentials) == 1
    clients = [consumer_client(address, hub) for hub in ("a", "b")]
    assert clients[0]._credential is clients[1]._credential
    for client in clients:
        client.close()


def test_epochs_increase_within_a_process():
    levels = [next_owner_level() for _ in range(1000)]
    assert levels == sorted(set(levels))
    assert abs(levels[-1] - time.time_ns() // 1000) < 10_000_000  # microseconds since the epoch


# ---- 4. throttling, datetime starts, clamped starts -------------------------------------------


def test_error_conditions_are_read_from_sdk_and_amqp_errors():
    from azure.eventhub.exceptions import ConnectError, ConnectionLostError, EventDataSendError

    busy = AMQPLinkError(SERVER_BUSY, description="busy")
    assert error_condition(busy) == "server-busy" and is_server_busy(busy)
    assert is_server_busy(ConnectError(str(busy), busy))
    assert is_server_busy(EventDataSendError(str(busy), MessageException(SERVER_BUSY)))
    stolen = AMQPLinkError(ErrorCondition.LinkStolen)
    assert error_condition(ConnectionLostError(str(stolen), stolen)) == "link:stolen"
    assert error_condition(ValueError("x")) is None and not is_server_busy(None)


def test_reads_wait_out_a_busy_service_instead_of_failing(service):
    """ServerBusy on receive (a ``ConnectError`` from a detach with com.microsoft:server-busy)
    for longer than the reader's receive timeout: reads return nothing meanwhile (the source
    polls later) and every event comes once the service lets go."""
    service.append(HUB, "0", 8)
    client = EventHubsClient(
        ADDRESS, sdk_client(), receive_timeout=1.0, idle_wait=0.1, busy_backoff=(0.2, 0.4)
    )
    try:
        assert client.partition_properties(HUB, "0").last_sequence_number == 7
        service.faults = [Fault("0", 0, 0, SERVER_BUSY, until=time.monotonic() + 3.0)]
        read, empty_reads = [], 0
        deadline = time.monotonic() + 20
        while len(read) < 8 and time.monotonic() < deadline:
            events = client.read(HUB, "0", len(read), 100)
            empty_reads += not events
            read += [event.sequence_number for event in events]
        assert read == list(range(8))
        assert empty_reads >= 1
    finally:
        client.close()


def test_partition_properties_wait_out_a_busy_service(service):
    service.append(HUB, "0", 3)
    client = EventHubsClient(
        ADDRESS,
        sdk_client(retry_total=0, retry_backoff_factor=0.01),
        busy_backoff=(0.05, 0.1),
    )
    try:
        service.management_faults = [SERVER_BUSY] * 3
        assert client.partition_properties(HUB, "0").last_sequence_number == 2
        service.management_faults = [ErrorCondition.NotAllowed]  # not throttling: raised
        with pytest.raises(Exception, match="NotAllowed"):
            client.partition_properties(HUB, "0")
        assert service.management["com.microsoft:partition"] == 5
    finally:
        client.close()


def test_an_enqueued_time_start_is_one_receiver_started_at_that_time(service):
    service.append(HUB, "0", 40)  # enqueued at BASE_MS + n seconds
    client = EventHubsClient(ADDRESS, sdk_client())
    try:
        micros = (BASE_MS + 17_000) * 1000 + 500  # half a millisecond after event 17
        assert first_sequence_number(client, HUB, "0", StartPosition.at_time(micros)) == 18
        assert first_sequence_number(client, HUB, "0", StartPosition.at_time(micros - 501)) == 17
        late = (BASE_MS + 99_000) * 1000
        assert first_sequence_number(client, HUB, "0", StartPosition.at_time(late)) == 40
        selectors = [attach["selector"] for attach in service.attaches]
        assert len(selectors) == 2 and all("x-opt-enqueued-time >=" in s for s in selectors)
    finally:
        client.close()


def test_starts_are_clamped_to_the_partition(service):
    service.append(HUB, "0", 10)
    service.expire(HUB, "0", before=4)
    client = EventHubsClient(ADDRESS, sdk_client())
    try:
        beyond = StartPosition.at_sequence_numbers({"0": 500})
        assert first_sequence_number(client, HUB, "0", beyond) == 10
        assert first_sequence_number(client, HUB, "0", StartPosition.latest(), 99) == 10
        assert first_sequence_number(client, HUB, "0", StartPosition.earliest(), 1) == 4
    finally:
        client.close()
