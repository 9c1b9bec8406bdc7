"""Mock events: shapes, determinism, shares; ``bms produce`` and ``bms replay`` through the CLI."""

from __future__ import annotations

import datetime as dt
import io
import re
from collections import Counter

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import rules
from pipeline.cli import main
from pipeline.io.hubs.local import LocalHub, clock_ahead
from pipeline.schema import BOOKING_HUB, PAYMENT_HUB, datetime_to_micros
from producers.events import EventGenerator, Shares
from producers.publish import produce, random_run_id, simulated_span
from tests.conftest import produce_into

START = dt.datetime(2026, 2, 8, 10, 0, tzinfo=dt.UTC)
SECOND = 1_000_000


def all_events(path, hub):
    with LocalHub(path) as local:
        return [
            event
            for partition in local.partition_ids(hub)
            for event in local.read(hub, partition, 0, 1_000_000)
        ]


class ListPublisher:
    def __init__(self):
        self.sent = []

    def send(self, hub, events):
        self.sent.extend((hub, event) for event in events)

    def new_run_id(self):
        return "t"

    def close(self):
        pass


@given(st.integers(0, 2**32), st.integers(1, 20))
def test_orders_have_the_seed_shapes_and_a_true_utc_z(seed, orders):
    generator = EventGenerator(seed)
    for n in range(orders):
        placed_at = START + dt.timedelta(seconds=5 * n)
        booking, *payments = generator.order(placed_at)
        booked_at = placed_at + dt.timedelta(seconds=booking.due)
        document = orjson.loads(booking.body)
        assert set(document) == {"order_id", "booking_time", "customer", "event_details"}
        assert set(document["customer"]) == {"customer_id", "name", "email"}
        details = document["event_details"]
        assert set(details) == {"event_id", "event_name", "event_location", "seats"}
        assert details["seats"] and all(
            set(s) == {"seat_number", "price"} for s in details["seats"]
        )
        assert rules.try_cast_datetime(document["booking_time"]) == truncated_to_ms(booked_at)
        assert document["booking_time"].endswith("Z")
        assert booking.partition_key == document["order_id"] and booking.hub == BOOKING_HUB
        assert 1 <= len(payments) <= 2
        for payment in payments:
            paid = orjson.loads(payment.body)
            assert paid["order_id"] == document["order_id"] and payment.hub == PAYMENT_HUB
            assert paid["payment_method"] in ("Credit Card", "Debit Card", "PayPal")
            assert paid["payment_status"] in ("Success", "Failed")
            assert paid["amount"] == sum(s["price"] for s in details["seats"])
        assert orjson.loads(payments[-1].body)["payment_status"] == "Success"
        assert min(event.due for event in (booking, *payments)) == 0


def truncated_to_ms(moment):
    return moment.replace(tzinfo=None, microsecond=moment.microsecond // 1000 * 1000)


def test_the_same_seed_gives_the_same_events():
    def run(seed):
        publisher = ListPublisher()
        produce(publisher, count=300, seed=seed, simulate_from=START, progress=None)
        return publisher.sent

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_simulate_until_ends_the_history_exactly_then():
    until = dt.datetime(2026, 11, 25, 14, 0, tzinfo=dt.UTC)
    publisher = ListPublisher()
    produce(publisher, count=200, seed=9, simulate_until=until, progress=None)
    times = [event.enqueued_time for _, event in publisher.sent]
    assert len(times) == 200 and max(times) == datetime_to_micros(until)
    span = simulated_span(200, 0.4, seed=9)
    assert min(times) == datetime_to_micros(until - span)
    with pytest.raises(ValueError, match="needs a count"):
        produce(ListPublisher(), count=None, simulate_until=until, progress=None)


def test_shares_of_late_early_and_failed_payments_are_respected():
    generator = EventGenerator(11, Shares(late=0.2, early=0.1, failed=0.3))
    kinds = Counter()
    for n in range(3000):
        booking, *payments = generator.order(START + dt.timedelta(seconds=n))
        kinds["failed"] += len(payments) == 2
        first = payments[0].due - booking.due
        kinds["late"] += first > 120
        kinds["early"] += first < 0
    assert 0.17 < kinds["late"] / 3000 < 0.23
    assert 0.08 < kinds["early"] / 3000 < 0.12
    assert 0.27 < kinds["failed"] / 3000 < 0.33


def test_malformed_share_breaks_bodies_in_ways_the_pipeline_rejects():
    generator = EventGenerator(5, Shares(malformed=1.0))
    reasons = set()
    for n in range(50):
        for event in generator.order(START + dt.timedelta(seconds=n)):
            parse = rules.booking_rows if event.hub == BOOKING_HUB else rules.payment_row
            with pytest.raises(rules.MalformedEvent) as error:
                parse(event.body)
            reasons.add(str(error.value).split(":")[0])
    assert reasons == {"malformed JSON", "not a JSON object", "event_details.seats is not an array"}


def test_simulated_enqueued_times_follow_the_rate_and_never_go_back_per_partition(tmp_path):
    hub = tmp_path / "hub.db"
    produce_into(
        hub, "--count", "500", "--simulate", "2026-02-08T10:00:00Z", "--rate", "2", "--seed", "1"
    )
    bookings, payments = all_events(hub, BOOKING_HUB), all_events(hub, PAYMENT_HUB)
    assert len(bookings) + len(payments) == 500
    # an order per second at 2 events/s; each event stamped when it came due, and the booking
    # body's booking_time is when it was published
    assert min(e.enqueued_time for e in bookings + payments) == datetime_to_micros(START)
    for event in bookings:
        booking_time = rules.try_cast_datetime(orjson.loads(event.body)["booking_time"])
        assert datetime_to_micros(booking_time) == event.enqueued_time // 1000 * 1000
    with LocalHub(hub) as local:
        for name in (BOOKING_HUB, PAYMENT_HUB):
            for partition in local.partition_ids(name):
                times = [e.enqueued_time for e in local.read(name, partition, 0, 10_000)]
                assert times == sorted(times)
    for event in bookings + payments:
        assert event.partition_key == orjson.loads(event.body)["order_id"]


def test_real_time_produce_paces_and_lets_the_hub_stamp_events(tmp_path):
    started = dt.datetime.now(dt.UTC)
    produce_into(tmp_path / "hub.db", "--count", "4", "--rate", "200")
    events = all_events(tmp_path / "hub.db", BOOKING_HUB) + all_events(
        tmp_path / "hub.db", PAYMENT_HUB
    )
    assert len(events) == 4
    assert all(e.enqueued_time >= datetime_to_micros(started) for e in events)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "0"], "--rate must be more than 0"),
        (["--count", "-1"], "--count must be 0 or more"),
        (["--late-share", "0.7", "--early-share", "0.6"], "cannot exceed 1"),
        (["--count", "5", "--simulate", "tomorrow"], "not an ISO 8601 time"),
        (["--simulate"], "--simulate needs --count"),
        (["--simulate", "2026-02-08T10:00:00Z"], "--simulate needs --count"),
    ],
)
def test_bad_produce_arguments_give_one_line(tmp_path, capsys, args, message):
    assert main(["produce", "--hub", str(tmp_path / "hub.db"), *args]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


# --- honest time: a simulated history ends now, live events get the real time -----------------


def now_micros():
    return datetime_to_micros(dt.datetime.now(dt.UTC))


def run_events(path, run):
    """The events of the run'th producer run into a hub, from both hubs."""
    return [
        event
        for name in (BOOKING_HUB, PAYMENT_HUB)
        for event in all_events(path, name)
        if event.partition_key.startswith(f"order_{run}_")
    ]


def order_ids(path):
    return {orjson.loads(e.body)["order_id"] for e in all_events(path, BOOKING_HUB)}


def test_simulate_without_start_publishes_a_history_that_ends_now(tmp_path):
    hub = tmp_path / "hub.db"
    before = now_micros()
    produce_into(hub, "--count", "400", "--simulate", "--seed", "3")
    after = now_micros()
    events = all_events(hub, BOOKING_HUB) + all_events(hub, PAYMENT_HUB)
    times = [e.enqueued_time for e in events]
    assert len(events) == 400
    assert before <= max(times) <= after  # ends now, not in the future
    # 400 events at 0.4 events/s: about 16 minutes of history (a little less: 2.1 events an order)
    assert 14 * 60 * SECOND < max(times) - min(times) < 17 * 60 * SECOND


def test_simulate_without_start_gives_the_seeds_events_back_dated(tmp_path):
    produce_into(tmp_path / "a.db", "--count", "300", "--simulate", "--seed", "8")
    produce_into(tmp_path / "b.db", "--count", "300", "--simulate", "2026-02-08T10:00:00Z",
                 "--seed", "8")  # fmt: skip
    for name in (BOOKING_HUB, PAYMENT_HUB):
        back_dated = all_events(tmp_path / "a.db", name)
        fixed = all_events(tmp_path / "b.db", name)
        shift = back_dated[0].enqueued_time - fixed[0].enqueued_time
        assert [(e.partition_key, e.enqueued_time - shift) for e in back_dated] == [
            (e.partition_key, e.enqueued_time) for e in fixed
        ]


def test_live_events_after_a_simulated_history_get_the_real_time(tmp_path):
    hub = tmp_path / "hub.db"
    produce_into(hub, "--count", "2000", "--simulate", "--rate", "0.4")  # the README's session
    before = now_micros()
    produce_into(hub, "--count", "30", "--rate", "500")
    after = now_micros()
    live = run_events(hub, 2)
    assert len(live) == 30
    assert all(before <= e.enqueued_time <= after for e in live)  # stamped as they arrived


def test_a_future_history_is_refused_unless_allowed(tmp_path, capsys):
    hub = tmp_path / "hub.db"
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    args = ["produce", "--hub", str(hub), "--count", "2000", "--simulate", soon]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(r"would end 1[01]\d minutes from now", error)
    assert "--allow-future" in error
    assert all_events(hub, BOOKING_HUB) == []
    assert main([*args, "--allow-future"]) == 0
    assert "ahead of now" in clock_ahead(str(hub))  # what bms run and bms hub ls then say


def test_a_start_whose_history_ends_before_now_is_accepted(tmp_path):
    hub = tmp_path / "hub.db"
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=6)
    # 3,000 events at 9.1/s: ends about a minute ago (a dry run checks; the bound would not do)
    produce_into(hub, "--count", "3000", "--rate", "9.1", "--seed", "21",
                 "--simulate", start.strftime("%Y-%m-%dT%H:%M:%SZ"))  # fmt: skip
    events = all_events(hub, BOOKING_HUB) + all_events(hub, PAYMENT_HUB)
    assert len(events) == 3000 and max(e.enqueued_time for e in events) <= now_micros()


def test_order_ids_differ_between_runs_into_one_hub(tmp_path):
    hub = tmp_path / "hub.db"
    produce_into(hub, "--count", "50", "--simulate", "2026-02-08T10:00:00Z", "--seed", "1")
    first = order_ids(hub)
    produce_into(hub, "--count", "50", "--simulate", "2026-02-08T10:00:00Z", "--seed", "1")
    second = order_ids(hub) - first
    assert first and len(second) == len(first)  # the same seed, yet no id in common
    assert {i.rsplit("_", 1)[0] for i in first} == {"order_1"}
    assert {i.rsplit("_", 1)[0] for i in second} == {"order_2"}
    payment_ids = [orjson.loads(e.body)["payment_id"] for e in all_events(hub, PAYMENT_HUB)]
    assert len(set(payment_ids)) == len(payment_ids)
    assert {i.rsplit("_", 1)[0] for i in payment_ids} == {"payment_1", "payment_2"}
    # in a fresh hub, the same seed still gives the very same events
    produce_into(tmp_path / "again.db", "--count", "50", "--simulate", "2026-02-08T10:00:00Z",
                 "--seed", "1")  # fmt: skip
    assert sorted(e.body for e in all_events(tmp_path / "again.db", BOOKING_HUB)) == sorted(
        e.body for e in all_events(hub, BOOKING_HUB) if e.partition_key in first
    )


def test_produce_says_what_it_publishes(tmp_path, capsys):
    hub = tmp_path / "hub.db"
    assert main(["produce", "--hub", str(hub), "--count", "10", "--simulate",
                 "2026-02-08T10:00:00Z", "--rate", "2", "--seed", "1"]) == 0  # fmt: skip
    first_line = capsys.readouterr().err.splitlines()[0]
    assert first_line.startswith(
        "simulating 10 events enqueued from 2026-02-08T10:00:00.000Z to 2026-02-08T10:00:0"
    )
    assert first_line.endswith("; order ids order_1_1, order_1_2, ...")


def test_event_hubs_runs_get_random_short_ids():
    ids = {random_run_id() for _ in range(50)}
    alphabet = set("abcdefghijklmnopqrstuvwxyz0123456789")
    assert len(ids) == 50 and all(len(i) == 5 and set(i) <= alphabet for i in ids)


def replay_lines(*records):
    return "\n".join(orjson.dumps(r).decode() for r in records) + "\n"


def test_replay_keeps_enqueued_times_and_stores_bodies_as_they_are(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(
        replay_lines(
            {
                "enqueued_time": "2026-02-08T10:00:00.123456Z",
                "partition_key": "o1",
                "body": "{broken",
            },
            {
                "enqueued_time": "2026-02-08T10:00:01Z",
                "partition_key": None,
                "body": {"order_id": "o1"},
            },
        )
    )
    assert (
        main(["replay", "--hub-name", PAYMENT_HUB, "--hub", str(tmp_path / "hub.db"), str(path)])
        == 0
    )
    events = sorted(all_events(tmp_path / "hub.db", PAYMENT_HUB), key=lambda e: e.enqueued_time)
    assert [(e.enqueued_time, e.partition_key, e.body) for e in events] == [
        (datetime_to_micros(dt.datetime(2026, 2, 8, 10, 0, 0, 123456)), "o1", b"{broken"),
        (datetime_to_micros(dt.datetime(2026, 2, 8, 10, 0, 1)), None, b'{"order_id":"o1"}'),
    ]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "line 2: not JSON"),
        ('{"enqueued_time": "soon", "body": "{}"}', "line 2: enqueued_time 'soon'"),
        ('{"enqueued_time": "2026-02-08T10:00:00Z"}', "line 2: no body"),
        (
            '{"enqueued_time": "2026-02-08T10:00:00Z", "partition_key": 5, "body": "{}"}',
            "line 2: partition_key",
        ),
    ],
)
def test_a_bad_replay_line_is_one_error_and_nothing_is_appended(
    tmp_path, capsys, bad_line, message
):
    path = tmp_path / "events.jsonl"
    good = replay_lines(
        {"enqueued_time": "2026-02-08T10:00:00Z", "partition_key": "o1", "body": "{}"}
    )
    path.write_text(good + bad_line + "\n")
    hub = tmp_path / "hub.db"
    assert main(["replay", "--hub-name", BOOKING_HUB, "--hub", str(hub), str(path)]) == 2
    error = capsys.readouterr().err
    assert message in error and "nothing was appended" in error and error.count("\n") == 1
    assert all_events(hub, BOOKING_HUB) == []


def test_replay_reads_stdin(tmp_path, monkeypatch):
    lines = replay_lines(
        {"enqueued_time": "2026-02-08T10:00:00Z", "partition_key": "k", "body": "{}"}
    )
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    assert main(["replay", "--hub-name", BOOKING_HUB, "--hub", str(tmp_path / "hub.db"), "-"]) == 0
    assert len(all_events(tmp_path / "hub.db", BOOKING_HUB)) == 1
