"""The local hub: partitions, sequence numbers, enqueued times, and several processes at once."""

from __future__ import annotations

import multiprocessing

import pytest

from pipeline.io.hub import OutgoingEvent, open_hub
from pipeline.io.localhub import LocalHub, partition_for_key


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


def test_enqueued_times_are_assigned_and_never_go_backwards(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        hub.append("bookingtopic", [OutgoingEvent("k", b"x", enqueued_time=2**62)])
        hub.append("bookingtopic", events(["k", "k"]))
        times = [e.enqueued_time for e in hub.read("bookingtopic", "0", 0, 10)]
    assert times == [2**62, 2**62, 2**62]


def test_given_enqueued_times_are_kept_as_they_are(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        hub.append("bookingtopic", [OutgoingEvent("k", b"a", 5), OutgoingEvent("k", b"b", 3)])
        assert [e.enqueued_time for e in hub.read("bookingtopic", "0", 0, 10)] == [5, 3]


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
