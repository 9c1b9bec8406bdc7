"""Publishing to Event Hubs through the real SDK's buffered producer, its AMQP link layer replaced
by the in-process service of ``test_eventhubs_sdk`` (which decodes every batch it is sent)."""

from __future__ import annotations

import io
import random
import re
from collections import defaultdict

import pytest

pytest.importorskip("azure.eventhub")

from azure.eventhub._buffered_producer._partition_resolver import (  # noqa: E402
    PartitionResolver,
)
from azure.eventhub._pyamqp.error import (  # noqa: E402
    AMQPLinkError,
    AuthenticationException,
    ErrorCondition,
)
from azure.eventhub.exceptions import ConnectError, ConnectionLostError  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.errors import UsageError  # noqa: E402
from pipeline.io.hubs import OutgoingEvent  # noqa: E402
from pipeline.schema import HUBS  # noqa: E402
from producers.eventhubs import (  # noqa: E402
    EventHubsPublisher,
    PublishError,
    SendRetries,
    producer_client,
)
from tests.test_eventhubs_sdk import ADDRESS, HUB, SERVER_BUSY, FakeEventHubs, install  # noqa: E402


@pytest.fixture
def service(monkeypatch):
    return install(monkeypatch, FakeEventHubs(partitions=4))


def factory(hub, **callbacks):
    """Buffered SDK producers as the pipeline makes them; the SDK's own retries kept short."""
    return producer_client(
        ADDRESS, hub, retry_total=0, retry_backoff_factor=0.01, max_wait_time=0.2, **callbacks
    )


def publisher(**options) -> EventHubsPublisher:
    options.setdefault("busy_backoff", (0.05, 0.1))
    options.setdefault("backoff", 0.01)
    return EventHubsPublisher(ADDRESS, factory, **options)


def orders(count: int, events_each: int, seed: int = 1) -> list[OutgoingEvent]:
    """Events of ``count`` orders, ``events_each`` per order in order, orders interleaved."""
    pending = {f"order_{n}": 0 for n in range(count)}
    rng = random.Random(seed)
    events = []
    while pending:
        key = rng.choice(sorted(pending))
        events.append(OutgoingEvent(key, f"{key}/{pending[key]}".encode()))
        pending[key] += 1
        if pending[key] == events_each:
            del pending[key]
    return events


def stored_by_key(service: FakeEventHubs, hub: str = HUB) -> dict[str, list[tuple[str, bytes]]]:
    found = defaultdict(list)
    for partition in service.partition_ids:
        for stored in service.events[(hub, partition)]:
            found[stored.partition_key].append((partition, stored.body))
    return found


def test_events_are_batched_per_partition_whatever_the_order_of_their_keys(service):
    events = orders(60, 5)
    report = io.StringIO()
    sender = publisher(report=report)
    for start in range(0, len(events), 50):  # as bms produce hands them over
        sender.send(HUB, events[start : start + 50])
    sender.close()
    # Every event once; an order's events in its key's partition (the service's hash), in order.
    resolver = PartitionResolver(service.partition_ids)
    found = stored_by_key(service)
    assert sum(len(v) for v in found.values()) == 300
    for key, placed in found.items():
        assert {partition for partition, _ in placed} == {
            resolver.get_partition_id_by_partition_key(key)
        }
        assert [body for _, body in placed] == [f"{key}/{n}".encode() for n in range(5)]
    # A handful of round trips, each to one partition: not one per event (keys never repeat
    # back to back).
    sends = [transfer for transfer in service.transfers if transfer[1] is not None]
    assert len(sends) <= 3 * len(service.partition_ids)
    assert sum(count for _, _, count in sends) == 300
    assert sender.sent == {HUB: 300}
    assert re.fullmatch(
        r"Event Hubs accepted 300 events \(bookingtopic 300\) in [\d.]+ s, [\d.]+ events/s\n",
        report.getvalue(),
    )


def test_a_busy_service_is_waited_out_on_send(service):
    """ServerBusy as a link detach (the SDK raises ``ConnectError``) and as a rejected transfer
    (``EventDataSendError``): sent again after a backoff, every event accepted once."""
    service.send_faults = [("detach", SERVER_BUSY)] * 3 + [("reject", SERVER_BUSY)] * 2
    sender = publisher()
    sender.send(HUB, orders(10, 4))
    sender.close()
    assert service.send_faults == []
    found = stored_by_key(service)
    assert sum(len(v) for v in found.values()) == 40
    assert all(len(placed) == 4 for placed in found.values())
    assert sender.sent == {HUB: 40} and not sender.failed


def test_a_busy_service_is_given_up_after_the_busy_timeout(service):
    service.send_faults = [("detach", SERVER_BUSY)] * 1000
    sender = publisher(busy_timeout=0.3)
    sender.send(HUB, [OutgoingEvent("o1", b"x")])
    with pytest.raises(PublishError, match=r"publishing to bookingtopic failed after \d+ attempt"):
        sender.close()
    assert sender.failed == {HUB: 1}


def test_other_failures_are_retried_a_few_times_then_raised(service):
    service.send_faults = [("reject", ErrorCondition.NotAllowed)] * 10
    sender = publisher(attempts=2)
    sender.send(HUB, [OutgoingEvent("o1", b"x")])
    with pytest.raises(PublishError, match="failed after 2 attempt"):
        sender.close()
    assert len(service.send_faults) == 8


def test_an_event_larger_than_a_message_is_refused_at_once(service):
    service.max_message_size = 1024
    sender = publisher()
    with pytest.raises(PublishError, match="larger than Event Hubs accepts"):
        sender.send(HUB, [OutgoingEvent("o1", b"x" * 5000)])
    sender.close()


def test_ctrl_c_while_waiting_reports_what_was_sent_and_what_was_not(service):
    report = io.StringIO()
    sender = publisher(report=report)
    sender.send(HUB, orders(5, 2))
    sender.flush()
    service.send_faults = [("detach", SERVER_BUSY)] * 1000

    def interrupted(seconds):
        raise KeyboardInterrupt

    sender._sleep = interrupted  # Ctrl-C while it waits for the busy service
    sender.send(HUB, orders(3, 1, seed=2))
    with pytest.raises(KeyboardInterrupt):
        sender.close()
    assert report.getvalue().startswith("Event Hubs accepted 10 events (bookingtopic 10) in ")
    assert report.getvalue().endswith("; 3 handed over were not sent (interrupted)\n")


def test_refused_credentials_say_what_to_do(service):
    service.management_faults = [
        AuthenticationException(ErrorCondition.UnauthorizedAccess, description="Unauthorized")
    ]
    sender = publisher()
    with pytest.raises(UsageError, match="refused to publish to bookingtopic.*az login"):
        sender.send(HUB, [OutgoingEvent("o1", b"x")])
    sender.close()


def test_the_first_hand_over_waits_out_a_busy_service_longer_than_other_failures(service):
    """The first event handed over for a hub makes the SDK ask for its partitions, which can fail
    like a send: a busy service is waited out (its own backoff, for up to the busy timeout)
    even when other failures get one attempt only; a lost link is tried ``attempts`` times."""
    sleeps = []
    service.management_faults = [SERVER_BUSY] * 3
    sender = publisher(attempts=1, sleep=sleeps.append)
    sender.send(HUB, [OutgoingEvent("o1", b"x")])
    sender.close()
    assert sleeps == [0.05, 0.1, 0.1] and sender.sent == {HUB: 1}

    sleeps.clear()
    service.management_faults = [ErrorCondition.LinkDetachForced] * 5
    sender = publisher(attempts=2, sleep=sleeps.append)
    with pytest.raises(PublishError, match="failed after 2 attempt"):
        sender.send(HUB, [OutgoingEvent("o1", b"x")])
    sender.close()
    assert sleeps == [0.01] and len(service.management_faults) == 3


def test_the_retry_policy_waits_longer_for_a_busy_service():
    retries = SendRetries(attempts=3, backoff=1.0, busy_backoff=(4.0, 60.0), busy_timeout=600.0)
    busy = ConnectError("busy", AMQPLinkError(SERVER_BUSY, description="busy"))
    lost = ConnectionLostError("lost")
    assert [retries.after(n, busy, 0.0, 0.0) for n in range(1, 7)] == [4, 8, 16, 32, 60, 60]
    assert [retries.after(n, lost, 0.0, 0.0) for n in range(1, 4)] == [1, 2, None]
    assert retries.after(20, busy, 100.0, 630.0) == 60  # busy for 530 s: one more wait
    assert retries.after(20, busy, 100.0, 650.0) is None  # 550 s + 60 s would pass 600 s


def test_bms_produce_to_event_hubs_reports_what_the_service_accepted_and_the_rate(service, capsys):
    command = ["produce", "--to", "eventhubs", "--count", "40", "--rate", "400", "--seed", "3"]
    assert main(command) == 0
    held = {hub: sum(len(service.events[(hub, p)]) for p in service.partition_ids) for hub in HUBS}
    assert sum(held.values()) == 40
    per_hub = ", ".join(f"{hub} {count}" for hub, count in sorted(held.items()) if count)
    assert re.search(
        rf"^Event Hubs accepted 40 events \({per_hub}\) in [\d.]+ s, [\d.]+ events/s$",
        capsys.readouterr().err,
        re.MULTILINE,
    )
