"""End to end through the CLI: events into a fresh local hub, ``bms run --bounded``, then every
warehouse row compared with a brute-force join computed here from the same events."""

from __future__ import annotations

import datetime as dt
import json
import random
import subprocess
import sys
from collections import Counter

import orjson
import sqlalchemy as sa

from pipeline import rules
from pipeline.cli import main
from pipeline.event_time import payload_event_time
from pipeline.io.hubs.local import LocalHub
from pipeline.io.warehouses import read_dead_letters, read_facts
from pipeline.schema import BOOKING_HUB, HUBS, PAYMENT_HUB, micros_to_datetime
from tests.conftest import booking_document, payment_document, produce_into

SECOND = 1_000_000


def hub_events(path):
    with LocalHub(path) as hub:
        return {
            name: [
                event
                for partition in hub.partition_ids(name)
                for event in hub.read(name, partition, 0, 10**9)
            ]
            for name in HUBS
        }


def enqueued_time(event, payload_time):
    return event.enqueued_time


def brute_force(events, time_of=enqueued_time):
    """Every (seat, payment) pair with the same order id and 0 <= Δt <= 120 s, by nested loops.

    ``time_of(event, payload time)`` gives an event's time (None: a dead letter)."""
    seats, payments, malformed = [], [], set()
    for event in events[BOOKING_HUB]:
        try:
            rows = rules.booking_rows(event.body)
        except rules.MalformedEvent:
            malformed.add((BOOKING_HUB, event.partition, event.sequence_number))
            continue
        micros = time_of(event, rows[0][rules.BOOKING_TIME_INDEX]) if rows else event.enqueued_time
        if micros is None:
            malformed.add((BOOKING_HUB, event.partition, event.sequence_number))
            continue
        seats += [(row, micros) for row in rows]
    for event in events[PAYMENT_HUB]:
        try:
            row = rules.payment_row(event.body)
        except rules.MalformedEvent:
            malformed.add((PAYMENT_HUB, event.partition, event.sequence_number))
            continue
        micros = time_of(event, row[rules.PAYMENT_TIME_INDEX])
        if micros is None:
            malformed.add((PAYMENT_HUB, event.partition, event.sequence_number))
            continue
        payments.append((row, micros))
    rows = Counter(
        rules.fact_row(seat, seat_time, payment, payment_time)
        for seat, seat_time in seats
        for payment, payment_time in payments
        if seat[0] is not None
        and seat[0] == payment[0]
        and 0 <= payment_time - seat_time <= 120 * SECOND
    )
    return rows, malformed


def pairs_from_raw_bodies(events):
    """(order_id, seat_number, payment_id, booking time, payment time) of every pair, from the raw
    bodies with json and loops alone: a check of flattening and joining that shares no code with
    the pipeline (not even pipeline.rules)."""
    seats, payments = [], []
    for event in events[BOOKING_HUB]:
        try:
            document = json.loads(event.body)
        except ValueError:
            continue
        details = document.get("event_details") if isinstance(document, dict) else None
        if isinstance(details, dict) and isinstance(details.get("seats"), list):
            for seat in details["seats"]:
                seats.append((document.get("order_id"), seat["seat_number"], event.enqueued_time))
    for event in events[PAYMENT_HUB]:
        try:
            document = json.loads(event.body)
        except ValueError:
            continue
        if isinstance(document, dict):
            payments.append((document["order_id"], document["payment_id"], event.enqueued_time))
    return Counter(
        (order, seat, payment_id, micros_to_datetime(b), micros_to_datetime(p))
        for order, seat, b in seats
        for paid_order, payment_id, p in payments
        if order is not None and order == paid_order and b <= p <= b + 120 * SECOND
    )


def run_bounded(hub, warehouse, *extra):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--bounded",
            "--hub",
            str(hub),
            "--warehouse",
            warehouse,
            *extra,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_produced_events_give_exactly_the_brute_force_rows(tmp_path):
    hub = tmp_path / "hub.db"
    warehouse = f"sqlite:///{tmp_path / 'warehouse.db'}"
    produce_into(
        hub,
        "--count",
        "3000",
        "--rate",
        "4",
        "--seed",
        "7",
        "--simulate",
        "2026-02-08T23:58:00Z",
        "--late-share",
        "0.1",
        "--early-share",
        "0.1",
        "--failed-share",
        "0.2",
        "--malformed-share",
        "0.01",
    )
    summary = run_bounded(hub, warehouse)

    events = hub_events(hub)
    expected, malformed = brute_force(events)
    facts = read_facts(warehouse)
    assert Counter(facts) == expected
    pairs = Counter((r[0], r[8], r[13], r[18], r[19]) for r in facts)
    assert pairs == pairs_from_raw_bodies(events)
    assert sum(expected.values()) > 1000  # the check has something to compare
    dead = read_dead_letters(warehouse)
    assert {(d.hub, d.partition, d.sequence_number) for d in dead} == malformed and malformed
    by_position = {(e.hub, e.partition, e.sequence_number): e for hub in HUBS for e in events[hub]}
    for letter in dead:
        event = by_position[(letter.hub, letter.partition, letter.sequence_number)]
        assert (letter.body, letter.enqueued_time) == (event.body, event.enqueued_time)
        assert letter.reason.split(":")[0] in (
            "malformed JSON",
            "not a JSON object",
            "event_details.seats is not an array",
        )
    total = sum(expected.values())
    assert f"fact rows: {total} computed, {total} newly written, 0 already present" in summary
    assert f"dead letters: {len(malformed)} ({len(malformed)} newly written" in summary
    assert f"events read: {BOOKING_HUB} {len(events[BOOKING_HUB])}" in summary


def replay_line(enqueued, key, body):
    return orjson.dumps({"enqueued_time": enqueued, "partition_key": key, "body": body}).decode()


def test_replayed_edge_cases_join_by_enqueued_time(tmp_path):
    hub = tmp_path / "hub.db"
    warehouse = f"sqlite:///{tmp_path / 'warehouse.db'}"

    def booking(order_id, seats=("A1",)):
        return {
            "order_id": order_id,
            "booking_time": "2026-02-08T10:00:00+05:30",
            "customer": {"customer_id": "c", "name": "n", "email": "e"},
            "event_details": {
                "event_name": "Movie",
                "seats": [{"seat_number": s, "price": 5} for s in seats],
            },
        }

    def payment(order_id, payment_id):
        return {
            "order_id": order_id,
            "payment_id": payment_id,
            "payment_method": "Cash",
            "amount": 5,
        }

    bookings = [
        replay_line("2026-02-08T10:00:00Z", "o1", booking("o1", ("A1", "A2"))),
        replay_line("2026-02-08T10:00:00Z", "o2", booking("o2")),
        replay_line("2026-02-08T10:00:00Z", "o3", booking("o3")),
        replay_line("2026-02-08T10:00:00Z", None, booking(None)),
        replay_line(
            "2026-02-08T10:00:01Z", "o4", '{"order_id": "o4", "event_details": {"seats": 3}}'
        ),
    ]
    payments = [  # in time order, as a hub holds them (times never go back in a partition)
        replay_line("2026-02-08T09:59:59.999Z", "o3", payment("o3", "1ms-early")),
        replay_line("2026-02-08T10:00:30Z", None, payment(None, "no-order")),
        replay_line("2026-02-08T10:00:30Z", "o1", "not json at all"),
        replay_line("2026-02-08T10:02:00Z", "o1", payment("o1", "at-120s")),
        replay_line("2026-02-08T10:02:00.000001Z", "o2", payment("o2", "past-120s")),
    ]
    for name, lines in ((BOOKING_HUB, bookings), (PAYMENT_HUB, payments)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        assert main(["replay", "--hub-name", name, "--hub", str(hub), str(path)]) == 0
    run_bounded(hub, warehouse)

    facts = read_facts(warehouse)
    assert sorted((row[0], row[8], row[13]) for row in facts) == [
        ("o1", "A1", "at-120s"),
        ("o1", "A2", "at-120s"),
    ]
    assert facts[0][1].isoformat() == "2026-02-08T04:30:00"  # +05:30 converted to UTC
    assert sorted(d.reason.split(":")[0] for d in read_dead_letters(warehouse)) == [
        "event_details.seats is not an array",
        "malformed JSON",
    ]


def test_payload_event_time_joins_at_the_adjusted_payload_times(tmp_path):
    """``--event-time payload``: TIMESTAMP BY booking_time / payment_time with ASA's "adjust"
    late-arrival policy, against the brute force over ``payload_event_time``."""
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'warehouse.db'}"
    rng = random.Random(3)
    base = dt.datetime(2026, 2, 8, 10, 0, tzinfo=dt.UTC)

    def at(seconds):
        return (base + dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")

    lines = {BOOKING_HUB: [], PAYMENT_HUB: []}
    for n in range(300):
        order, booked = f"o{n}", n * 2.0
        paid = booked + rng.uniform(0, 200)
        # Payload times before the enqueued time (some beyond the tolerance), or after it.
        booking_time = booked + rng.choice([0, -rng.uniform(0, 90), rng.uniform(0, 30)])
        payment_time = paid - rng.uniform(0, 90)
        booking = booking_document(order, booking_time=at(booking_time))
        lines[BOOKING_HUB].append((booked, order, booking))
        lines[PAYMENT_HUB].append(
            (paid, order, payment_document(order, payment_time=at(payment_time)))
        )
    lines[BOOKING_HUB].append((700.0, "o1", booking_document("o1", booking_time="soon")))
    lines[PAYMENT_HUB].append((700.0, "o1", payment_document("o1", payment_time=None)))
    for name, entries in lines.items():
        path = tmp_path / f"{name}.jsonl"
        ordered = sorted(entries, key=lambda entry: entry[0])
        path.write_text("".join(replay_line(at(t), k, b) + "\n" for t, k, b in ordered))
        assert main(["replay", "--hub-name", name, "--hub", str(hub), str(path)]) == 0
    run_bounded(hub, warehouse, "--event-time", "payload", "--late-arrival-tolerance", "60")

    def payload_time(event, payload):
        return payload_event_time(payload, event.enqueued_time, 60 * SECOND)

    events = hub_events(hub)
    expected, malformed = brute_force(events, payload_time)
    assert Counter(read_facts(warehouse)) == expected
    assert expected != brute_force(events)[0]  # the policy changes which pairs join
    dead = read_dead_letters(warehouse)
    assert {(d.hub, d.partition, d.sequence_number) for d in dead} == malformed
    assert sorted(d.reason for d in dead) == [
        "no readable booking_time for --event-time payload",
        "no readable payment_time for --event-time payload",
    ]


def test_a_rerun_over_the_same_hub_adds_nothing_and_the_tables_keep_their_types(tmp_path):
    hub = tmp_path / "hub.db"
    warehouse = f"sqlite:///{tmp_path / 'warehouse.db'}"
    produce_into(hub, "--count", "200", "--seed", "1", "--simulate", "2026-02-08T10:00:00Z")
    run_bounded(hub, warehouse)
    first = read_facts(warehouse)
    summary = run_bounded(hub, warehouse)
    assert Counter(read_facts(warehouse)) == Counter(first) and first
    n = len(first)
    assert f"fact rows: {n} computed, 0 newly written, {n} already present" in summary
    columns = {
        c["name"]: str(c["type"])
        for c in sa.inspect(sa.create_engine(warehouse)).get_columns("bookings_fact")
    }
    assert columns["seat_price"] == "FLOAT" and columns["booking_hour"] == "INTEGER"
    assert columns["booking_event_time"] == "DATETIME" and columns["order_id"] == "VARCHAR(50)"
    assert list(columns)[0] == "order_id" and list(columns)[-2:] == [
        "payment_event_time",
        "row_key",
    ]


def test_bad_run_arguments_give_one_line(tmp_path, capsys, monkeypatch):
    produce_into(tmp_path / "h.db", "--count", "4", "--simulate", "2026-02-08T10:00:00Z")
    capsys.readouterr()
    assert (
        main(["run", "--bounded", "--warehouse", "not a url", "--hub", str(tmp_path / "h.db")]) == 2
    )
    error = capsys.readouterr().err
    assert "is not a database URL" in error and error.count("\n") == 1
    unknown = ["run", "--bounded", "--hub", str(tmp_path / "h.db"), "--warehouse", "mysql://h/d"]
    assert main(unknown) == 2
    error = capsys.readouterr().err
    assert "bms writes to sqlite://, postgresql://" in error and error.count("\n") == 1
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    warehouse = f"sqlite:///{tmp_path / 'w.db'}"
    run = ["run", "--bounded", "--hub", str(tmp_path / "h.db"), "--warehouse", warehouse]
    assert main([*run, "--checkpoints", "blob:container"]) == 2
    error = capsys.readouterr().err
    assert "need AZURE_STORAGE_CONNECTION_STRING" in error and error.count("\n") == 1


def test_start_positions_choose_where_each_partition_is_read_from(tmp_path):
    hub = tmp_path / "hub.db"
    produce_into(hub, "--count", "400", "--seed", "2", "--simulate", "2026-02-08T10:00:00Z")
    events = hub_events(hub)
    latest = f"sqlite:///{tmp_path / 'latest.db'}"
    run_bounded(hub, latest, "--start", "latest")
    assert read_facts(latest) == []
    cut = sorted(e.enqueued_time for name in HUBS for e in events[name])[len(events) // 2]
    later = {name: [e for e in events[name] if e.enqueued_time >= cut] for name in HUBS}
    from_cut = f"sqlite:///{tmp_path / 'from_cut.db'}"
    run_bounded(hub, from_cut, "--start", micros_to_datetime(cut).isoformat() + "Z")
    expected, _ = brute_force(later)
    assert Counter(read_facts(from_cut)) == expected and expected
