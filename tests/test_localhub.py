"""The local hub: partitions, sequence numbers, enqueued times, and several processes at once."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time

import pytest

from pipeline.errors import RuntimeFailure
from pipeline.io.hubs import OutgoingEvent, open_hub, read_all
from pipeline.io.hubs.local import (
    FUTURE_TOLERANCE_S,
    HubBusy,
    LocalHub,
    clock_ahead,
    describe_duration,
    partition_for_key,
)

SECOND = 1_000_000


def events(keys, prefix="e"):
    return [OutgoingEvent(key, f"{prefix}{n}".encode()) for n, key in enumerate(keys)]


def test_partition_follows_a_stable_hash_of_the_key(tmp_path):
    with LocalHub(tmp_path / "hub.db") as hub:
        placed = hub.append("bookingtopic", events(["order_1", "order_2", "order_1"]))
    assert placed[0][0] == placed[2][0] == str(partition_for_key("order_1", 4))
    # crc32 is the same in every process, unlike Python's salted hash()
    assert partition_for_key("order_1", 4) == 3  # crc32("order_1") = 4256851099


def test_sequence_numbers_count_from_zero_per_partition(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=2) as hub:
        placed = hub.append("paymentstopic", events([f"k{n}" for n in range(20)]))
        placed += hub.append("paymentstopic", events([f"k{n}" for n in range(20)]))
        for partition in hub.partition_ids("paymentstopic"):
            sequences = [seq for p, seq in placed if p == partition]
            assert sequences == list(range(len(sequences)))
            properties = hub.partition_properties("paymentstopic", partition)
            assert properties.first_sequence_number == 0
            assert properties.last_sequence_number == len(sequences) - 1


def now_micros():
    return time.time_ns() // 1_000


def test_live_events_get_the_current_time(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        before = now_micros()
        hub.append("bookingtopic", events(["k", "k"]))
        after = now_micros()
        times = [e.enqueued_time for e in hub.read("bookingtopic", "0", 0, 10)]
    assert before <= times[0] == times[1] <= after


def test_a_partition_slightly_ahead_keeps_live_times_from_going_backwards(tmp_path):
    ahead = now_micros() + 2 * SECOND  # within FUTURE_TOLERANCE_S: another clock, a moment ago
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        hub.append("bookingtopic", [OutgoingEvent("k", b"x", enqueued_time=ahead)])
        hub.append("bookingtopic", events(["k", "k"]))
        times = [e.enqueued_time for e in hub.read("bookingtopic", "0", 0, 10)]
    assert times == [ahead, ahead, ahead]


@pytest.mark.parametrize("lead", [FUTURE_TOLERANCE_S + 1, 79 * 60])
def test_a_partition_ahead_keeps_its_time_and_says_so(tmp_path, lead):
    # Only an explicit future time (--allow-future) puts a partition ahead; live events then
    # share that time, as times never go backwards in a partition, and clock_ahead warns.
    future = now_micros() + int(lead * SECOND)
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        hub.append("bookingtopic", [OutgoingEvent("k", b"x", enqueued_time=future)])
        hub.append("bookingtopic", events(["k"]))
        times = [e.enqueued_time for e in hub.read("bookingtopic", "0", 0, 10)]
    assert times == [future, future]
    assert "ahead of now" in clock_ahead(str(tmp_path / "hub.db"))


def test_given_enqueued_times_never_go_backwards_within_a_partition(tmp_path):
    # The source's watermark follows each partition's times: an event behind it would be late.
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        hub.append("bookingtopic", [OutgoingEvent("k", b"a", 5), OutgoingEvent("k", b"b", 3)])
        hub.append("bookingtopic", [OutgoingEvent("k", b"c", 4), OutgoingEvent("k", b"d", 9)])
        assert [e.enqueued_time for e in hub.read("bookingtopic", "0", 0, 10)] == [5, 5, 5, 9]


def test_read_returns_a_range_in_order_with_everything_stored(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        hub.append("bookingtopic", events(["k"] * 10))
        read = hub.read("bookingtopic", "0", 4, 3)
    assert [(e.sequence_number, e.body, e.partition_key, e.hub) for e in read] == [
        (4, b"e4", "k", "bookingtopic"),
        (5, b"e5", "k", "bookingtopic"),
        (6, b"e6", "k", "bookingtopic"),
    ]


def test_empty_partitions_and_unknown_hubs(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=3) as hub:
        assert hub.partition_ids("paymentstopic") == ["0", "1", "2"]
        properties = hub.partition_properties("paymentstopic", "1")
        assert (properties.last_sequence_number, properties.last_enqueued_time) == (-1, None)
        assert hub.read("paymentstopic", "1", 0, 100) == []


def test_a_hub_keeps_its_partition_count(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=2) as hub:
        hub.append("bookingtopic", events(["a"]))
    with LocalHub(tmp_path / "hub.db", partitions=8) as hub:
        assert hub.partition_ids("bookingtopic") == ["0", "1"]
        assert len(hub.partition_ids("paymentstopic")) == 8


def test_partitions_can_be_added_but_not_removed_and_every_process_sees_them(tmp_path):
    """As on Event Hubs Premium and Dedicated: a producer and a reader that opened the hub before
    partitions were added see them at their next call; keys hash over the new count."""
    with (
        LocalHub(tmp_path / "hub.db", partitions=2) as producer,
        LocalHub(tmp_path / "hub.db") as reader,
    ):
        producer.append("bookingtopic", events(["a"]))
        assert reader.partition_ids("bookingtopic") == ["0", "1"]
        with LocalHub(tmp_path / "hub.db") as admin:
            admin.add_partitions("bookingtopic", 5)
            with pytest.raises(ValueError, match="has 5 partitions: none can be removed"):
                admin.add_partitions("bookingtopic", 3)
        assert reader.partition_ids("bookingtopic") == ["0", "1", "2", "3", "4"]
        keys = [f"order_{n}" for n in range(40)]
        placed = producer.append("bookingtopic", events(keys))
        assert [int(partition) for partition, _ in placed] == [
            partition_for_key(key, 5) for key in keys
        ]
        assert reader.known_end("bookingtopic", "4") == sum(p == "4" for p, _ in placed) > 0


def test_keyless_events_spread_over_partitions(tmp_path):
    with LocalHub(tmp_path / "hub.db") as hub:
        placed = hub.append("bookingtopic", events([None] * 8))
    assert sorted({partition for partition, _ in placed}) == ["0", "1", "2", "3"]


def test_open_hub_by_url(tmp_path):
    hub = open_hub(f"local:{tmp_path / 'hub.db'}")
    assert isinstance(hub, LocalHub) and hub.path == tmp_path / "hub.db"
    hub.close()


def test_a_failed_append_appends_nothing(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        with pytest.raises(Exception):  # noqa: B017 (the exact sqlite error does not matter)
            hub.append("bookingtopic", [OutgoingEvent("k", b"ok"), OutgoingEvent("k", None)])
        assert hub.read("bookingtopic", "0", 0, 10) == []


def _append_many(path, worker, batches):
    with LocalHub(path) as hub:
        for batch in range(batches):
            hub.append(
                "bookingtopic",
                [
                    OutgoingEvent(f"w{worker}-{n % 7}", f"{worker}:{batch}:{n}".encode())
                    for n in range(25)
                ],
            )


def test_several_processes_append_while_one_reads(tmp_path):
    path = tmp_path / "hub.db"
    LocalHub(path).close()
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(path, w, 20)) for w in range(3)]
    for writer in writers:
        writer.start()
    seen = {}
    with LocalHub(path) as reader:
        while any(writer.is_alive() for writer in writers) or not seen:
            for partition in reader.partition_ids("bookingtopic"):
                start = len(seen.setdefault(partition, []))
                seen[partition].extend(reader.read("bookingtopic", partition, start, 1000))
        for writer in writers:
            writer.join()
            assert writer.exitcode == 0
        for partition in reader.partition_ids("bookingtopic"):
            start = len(seen.setdefault(partition, []))
            seen[partition].extend(reader.read("bookingtopic", partition, start, 1000))
    all_events = [event for partition_events in seen.values() for event in partition_events]
    assert len(all_events) == 3 * 20 * 25
    assert len({event.body for event in all_events}) == len(all_events)
    for partition_events in seen.values():
        assert [e.sequence_number for e in partition_events] == list(range(len(partition_events)))
        times = [e.enqueued_time for e in partition_events]
        assert times == sorted(times)


def _open_and_append(path, worker):
    with LocalHub(path) as hub:
        hub.partition_ids("bookingtopic")
        hub.append("paymentstopic", [OutgoingEvent(f"k{worker}", b"x")])


def test_several_processes_can_create_the_same_new_hub_file_at_once(tmp_path):
    path = tmp_path / "new" / "hub.db"
    context = multiprocessing.get_context("spawn")
    openers = [context.Process(target=_open_and_append, args=(path, n)) for n in range(6)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join()
    assert [opener.exitcode for opener in openers] == [0] * 6
    with LocalHub(path) as hub:
        assert (
            sum(
                len(hub.read("paymentstopic", p, 0, 10)) for p in hub.partition_ids("paymentstopic")
            )
            == 6
        )


def test_a_held_write_lock_is_waited_for_then_one_busy_error_and_nothing_appended(tmp_path):
    path = tmp_path / "hub.db"
    with LocalHub(path, partitions=1) as hub:
        hub.append("bookingtopic", events(["k"]))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with LocalHub(path, busy_timeout=0.2) as hub:
            started = time.monotonic()
            with pytest.raises(HubBusy) as error:
                hub.append("bookingtopic", events(["k", "k"]))
            assert 0.2 <= time.monotonic() - started < 5
            with pytest.raises(HubBusy):  # a hub created on first use needs the lock too
                hub.append("paymentstopic", events(["k"]))
            assert hub.read("bookingtopic", "0", 0, 10)[0].body == b"e0"  # reads never block
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert isinstance(error.value, RuntimeFailure)
    assert str(error.value) == (
        f"the local hub {path} is busy: another process held its write lock for more than 0.2 s"
    )
    with LocalHub(path) as hub:
        assert len(hub.read("bookingtopic", "0", 0, 10)) == 1
        assert hub.hubs() == ["bookingtopic"]
        hub.append("paymentstopic", events(["k"]))  # the lock is free: the hub works as before
        assert [e.body for e in read_all(hub, ["paymentstopic"])] == [b"e0"]


def test_run_numbers_count_producer_runs_per_hub_file(tmp_path):
    with LocalHub(tmp_path / "hub.db") as hub:
        assert [hub.next_run_number(), hub.next_run_number()] == [1, 2]
    with LocalHub(tmp_path / "hub.db") as hub:
        assert hub.next_run_number() == 3
    with LocalHub(tmp_path / "other.db") as hub:
        assert hub.next_run_number() == 1


def test_clock_ahead_names_the_partition_furthest_ahead(tmp_path):
    path = tmp_path / "hub.db"
    now = now_micros()
    with LocalHub(path, partitions=4) as hub:
        hub.append("paymentstopic", events(["a", "b", "c"]))  # live: now
        hub.append("bookingtopic", [OutgoingEvent(None, b"x", now - 3600 * SECOND)])  # the past
    assert clock_ahead(str(path), now_micros=now + SECOND) is None
    with LocalHub(path, partitions=4) as hub:
        hub.append("bookingtopic", [OutgoingEvent("order_1", b"x", now + 79 * 60 * SECOND)])
        hub.append("bookingtopic", [OutgoingEvent("order_2", b"x", now + 10 * SECOND)])
        hub.append("bookingtopic", events(["order_1"]))  # live, after the future event
    partition = partition_for_key("order_1", 4)
    assert clock_ahead(f"local:{path}", now_micros=now) == (
        f"partition {partition} of bookingtopic (and 1 other partitions) is 79 minutes ahead of "
        "now: events were published with future enqueued times (bms produce --simulate or bms "
        "replay with --allow-future?); a streaming job will not write their rows until then"
    )
    warning = clock_ahead(str(path))  # the real now, a moment later
    assert warning.startswith(f"partition {partition} of bookingtopic (and 1 other partitions) ")
    assert warning.count("\n") == 0
    assert clock_ahead(str(path), now_micros=now + 80 * 60 * SECOND) is None


def test_clock_ahead_has_nothing_to_say_about_other_hubs(tmp_path):
    assert clock_ahead(str(tmp_path / "missing.db")) is None
    assert not (tmp_path / "missing.db").exists()  # asking creates nothing
    (tmp_path / "not-a-hub.db").write_text("hello")
    assert clock_ahead(str(tmp_path / "not-a-hub.db")) is None
    LocalHub(tmp_path / "empty.db").close()
    assert clock_ahead(str(tmp_path / "empty.db")) is None
    assert clock_ahead("eventhubs://ns.servicebus.windows.net") is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(6, "6 seconds"), (119, "119 seconds"), (4740, "79 minutes"), (5 * 3600, "5 hours"),
     (1498 * 86400, "1,498 days")],
)  # fmt: skip
def test_durations_are_described_for_people(seconds, text):
    assert describe_duration(seconds) == text
