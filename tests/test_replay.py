"""``bms replay``: one transaction per file, no future unless asked, and the shipped examples."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from pipeline.cli import main
from pipeline.io.hubs import OutgoingEvent, read_all
from pipeline.io.hubs.local import LocalHub, clock_ahead
from pipeline.io.warehouses import read_dead_letters, read_facts
from pipeline.parity.evaluator import evaluate
from pipeline.schema import BOOKING_HUB, HUBS, PAYMENT_HUB, datetime_to_micros

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECOND = 1_000_000


def now_micros():
    return datetime_to_micros(dt.datetime.now(dt.UTC))


def iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_lines(path, times, key="o1"):
    path.write_text(
        "".join(
            orjson.dumps(
                {"enqueued_time": t, "partition_key": f"{key}-{n % 8}", "body": {"n": n}}
            ).decode()
            + "\n"
            for n, t in enumerate(times)
        )
    )
    return path


def replay(hub, file, *extra):
    return main(["replay", "--hub-name", BOOKING_HUB, "--hub", str(hub), *extra, str(file)])


def stored(hub):
    with LocalHub(hub) as local:
        return read_all(local, [BOOKING_HUB])


def test_replay_says_how_many_events_went_in(tmp_path, capsys):
    file = write_lines(tmp_path / "e.jsonl", ["2026-02-08T10:00:00Z", "2026-02-08T10:00:01.5Z"])
    assert replay(tmp_path / "hub.db", file) == 0
    assert capsys.readouterr().err == (
        f"appended 2 events to {BOOKING_HUB} in {tmp_path / 'hub.db'} "
        "(enqueued 2026-02-08T10:00:00Z to 2026-02-08T10:00:01.500000Z)\n"
    )
    file.write_text("\n")
    assert replay(tmp_path / "hub.db", file) == 0
    assert (
        capsys.readouterr().err == f"appended 0 events to {BOOKING_HUB} in {tmp_path / 'hub.db'}\n"
    )


def test_future_events_are_refused_unless_allowed(tmp_path, capsys):
    hub = tmp_path / "hub.db"
    with LocalHub(hub) as local:  # a live hub
        local.append(BOOKING_HUB, [OutgoingEvent(f"live-{n}", b"{}") for n in range(8)])
    times = [f"2030-01-01T00:00:0{n}Z" for n in range(8)]
    file = write_lines(tmp_path / "future.jsonl", times)
    assert replay(hub, file) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--allow-future" in error and "nothing was appended" in error
    assert "8 of 8 events are enqueued in the future (line 8: 2030-01-01T00:00:07Z, " in error
    assert len(stored(hub)) == 8
    assert clock_ahead(str(hub)) is None

    assert replay(hub, file, "--allow-future") == 0
    assert len(stored(hub)) == 16
    warning = clock_ahead(str(hub))
    assert re.match(
        r"partition \d of bookingtopic \(and \d other partitions\) is [\d,]+ days ", warning
    )


def test_a_replay_into_a_live_partition_never_moves_its_time_back(tmp_path):
    # Events dated before what a partition holds get its latest time, as Event Hubs never
    # stamps an event before an earlier one: a running job's watermark is already past them.
    hub = tmp_path / "hub.db"
    with LocalHub(hub, partitions=1) as local:
        local.append(BOOKING_HUB, [OutgoingEvent("live", b"{}")])
    live = stored(hub)[0].enqueued_time
    assert replay(hub, write_lines(tmp_path / "old.jsonl", ["2026-02-08T10:00:00Z"] * 3)) == 0
    assert [e.enqueued_time for e in stored(hub)] == [live] * 4


def test_a_moment_ahead_is_within_the_tolerance(tmp_path):
    soon = iso(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2))
    assert replay(tmp_path / "hub.db", write_lines(tmp_path / "e.jsonl", [soon])) == 0


def test_a_hub_locked_past_the_wait_gets_nothing_and_one_line(tmp_path, capsys):
    hub = tmp_path / "hub.db"
    with LocalHub(hub) as local:
        local.append(BOOKING_HUB, [OutgoingEvent("k", b"before")])
    file = write_lines(tmp_path / "e.jsonl", ["2026-02-08T10:00:00Z"] * 5000)
    holder = sqlite3.connect(hub, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock past replay's wait
    try:
        started = time.monotonic()
        assert replay(hub, file, "--wait", "0.3") == 3
        assert time.monotonic() - started < 10
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    error = capsys.readouterr().err
    assert error == (
        f"bms replay: the local hub {hub} is busy: another process held its write lock for more "
        f"than 0.3 s; nothing from {file} was appended: run the same command again\n"
    )
    assert [e.body for e in stored(hub)] == [b"before"]
    assert replay(hub, file) == 0  # the lock is free: the same command appends it all, once
    assert len(stored(hub)) == 5001


def _hold_the_lock_now_and_then(path, stop: threading.Event):
    db = sqlite3.connect(path, isolation_level=None, timeout=5)
    while not stop.is_set():
        db.execute("BEGIN IMMEDIATE")
        time.sleep(0.15)
        db.execute("COMMIT")
        time.sleep(0.01)
    db.close()


def test_a_file_goes_in_whole_or_not_at_all_beside_another_writer(tmp_path):
    hub = tmp_path / "hub.db"
    LocalHub(hub).close()
    file = write_lines(tmp_path / "e.jsonl", ["2026-02-08T10:00:00Z"] * 20_000)
    stop = threading.Event()
    writer = threading.Thread(target=_hold_the_lock_now_and_then, args=(hub, stop))
    writer.start()
    try:
        outcomes = [replay(hub, file, "--wait", "0.05") for _ in range(3)]
    finally:
        stop.set()
        writer.join()
    assert set(outcomes) <= {0, 3}
    assert len(stored(hub)) == 20_000 * outcomes.count(0)


def test_a_negative_wait_is_a_usage_error(tmp_path, capsys):
    file = write_lines(tmp_path / "e.jsonl", ["2026-02-08T10:00:00Z"])
    assert replay(tmp_path / "hub.db", file, "--wait", "-1") == 2
    assert "--wait must be 0 or more" in capsys.readouterr().err


def test_the_shipped_examples_replay_and_give_the_asa_rows(tmp_path, capsys):
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'warehouse.db'}"
    for name, file in ((BOOKING_HUB, "bookings.jsonl"), (PAYMENT_HUB, "payments.jsonl")):
        assert main(["replay", "--hub-name", name, "--hub", str(hub), str(EXAMPLES / file)]) == 0
    said = capsys.readouterr().err.splitlines()
    assert (
        f"appended 3 events to {BOOKING_HUB} in {hub} "
        "(enqueued 2026-02-08T10:00:00Z to 2026-02-08T10:02:00Z)"
    ) in said
    assert (
        f"appended 4 events to {PAYMENT_HUB} in {hub} "
        "(enqueued 2026-02-08T10:01:00Z to 2026-02-08T10:05:30Z)"
    ) in said
    assert main(["run", "--bounded", "--hub", str(hub), "--warehouse", warehouse]) == 0

    facts = read_facts(warehouse)
    with LocalHub(hub) as local:
        expected = evaluate(read_all(local, HUBS))
    assert Counter(facts) == Counter(expected.rows) and not expected.dropped
    assert read_dead_letters(warehouse) == []
    # order, seat, payment, status-blind: the failed payment and its retry both join (the ASA
    # query has no status filter); order_ex3 is paid 210 s after booking, past the 2 minutes
    assert sorted((r[0], r[8], r[10], r[13], r[17], r[19] - r[18]) for r in facts) == [
        ("order_ex1", "A1", "Music", "payment_ex1", "Card", dt.timedelta(seconds=60)),
        ("order_ex1", "A2", "Music", "payment_ex1", "Card", dt.timedelta(seconds=60)),
        ("order_ex2", "C7", "Theater", "payment_ex2", "Online", dt.timedelta(seconds=30)),
        ("order_ex2", "C7", "Theater", "payment_ex3", "Online", dt.timedelta(seconds=70)),
    ]


@pytest.mark.parametrize("file", ["bookings.jsonl", "payments.jsonl"])
def test_the_examples_are_in_the_replay_format_with_json_object_bodies(file):
    for line in (EXAMPLES / file).read_text().splitlines():
        record = orjson.loads(line)
        assert set(record) == {"enqueued_time", "partition_key", "body"}
        assert record["partition_key"] == record["body"]["order_id"]


def test_the_old_spelling_with_an_event_hub_name_in_hub_is_one_line(tmp_path, capsys):
    file = tmp_path / "events.jsonl"
    file.write_text("")
    hub = ["--hub", "bookingtopic", "--hub-name", "bookingtopic", str(file)]
    assert main(["replay", *hub]) == 2
    error = capsys.readouterr().err
    assert "--hub is the hub file" in error and error.count("\n") == 1
