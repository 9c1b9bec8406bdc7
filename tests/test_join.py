"""The 2-minute join: exact bounds, many-to-many, exactly-once across overlapping windows.

Runners, as they behave in Beam 2.77 on this machine: ``TestStream`` runs only on the
BundleBasedDirectRunner (neither the FnApiRunner nor Prism accept it; "DirectRunner" routes it
there), so the watermark tests name that runner with ``streaming=True``. Bounded tests name the
FnApiRunner: "DirectRunner" would first try to download Prism from GitHub.
"""

from __future__ import annotations

import itertools

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import rules
from pipeline.interval_join import IntervalJoinBookingsToPayments
from pipeline.join import JoinBookingsToPayments, canonical_window_start
from pipeline.options import INTERVAL_JOIN, JOIN_MODES, WINDOWED_JOIN
from pipeline.pipeline import ComputeFacts
from pipeline.schema import BOOKING_HUB, FACT_COLUMN_NAMES, PAYMENT_HUB
from tests.conftest import booking_body, hub_event, payment_body, unbatched

SECOND = 1_000_000
T0 = 1_770_000_000 * SECOND  # 2026-02-02, a whole multiple of every window period used here
PAYMENT_ID = FACT_COLUMN_NAMES.index("payment_id")
SEAT = FACT_COLUMN_NAMES.index("seat_number")


def booking(order_id, seat="A1"):
    return (order_id, None, None, None, None, None, None, None, seat, 1.0, "Music", None, None)


def payment(order_id, payment_id):
    return (order_id, payment_id, None, 1.0, "PayPal", "Online")


def streamed(arrivals, watermark_steps=()):
    """One TestStream with tags 'b' and 'p': arrivals are (tag, micros, keyed value) in order."""
    stream = TestStream(output_tags={"b", "p"})
    for tag in ("b", "p"):
        stream.advance_watermark_to(T0 / SECOND - 1000, tag=tag)
    for step in arrivals:
        if step[0] == "watermark":
            for tag in ("b", "p"):
                stream.advance_watermark_to(step[1] / SECOND, tag=tag)
            continue
        tag, micros, value = step
        stream.add_elements([TimestampedValue(value, micros / SECOND)], tag=tag)
    for tag in ("b", "p"):
        stream.advance_watermark_to_infinity(tag=tag)
    return stream


_SEQUENCE = itertools.count()


def keyed(kind, order_id, micros, **kwargs):
    """A keyed booking seat row or payment row, each from an event of its own."""
    row = booking(order_id, **kwargs) if kind == "b" else payment(order_id, **kwargs)
    key = f"0:{next(_SEQUENCE)}" + (":0" if kind == "b" else "")
    return (kind, micros, (order_id, (micros, row, key)))


def streaming_pipeline():
    return TestPipeline(runner="BundleBasedDirectRunner", options=PipelineOptions(streaming=True))


def batch_pipeline():
    return TestPipeline(runner="FnApiRunner", options=PipelineOptions())


#: Both join modes take the same input and must give the same rows (``--join``).
JOINS = {WINDOWED_JOIN: JoinBookingsToPayments, INTERVAL_JOIN: IntervalJoinBookingsToPayments}


@pytest.fixture(params=JOIN_MODES)
def join(request):
    """The join transform of each mode (a class, called with the window period)."""
    return JOINS[request.param]


def run_streaming(join, arrivals, expected):
    """Runs the join on a streaming runner and checks the (payment_id, seat) pairs emitted."""
    with streaming_pipeline() as p:
        streams = p | streamed(arrivals)
        facts = (streams["b"], streams["p"]) | join() | unbatched()
        assert_that(facts | beam.Map(lambda row: (row[PAYMENT_ID], row[SEAT])), equal_to(expected))


def test_payment_at_the_same_instant_joins(join):
    run_streaming(
        join, [keyed("b", "o1", T0), keyed("p", "o1", T0, payment_id="p1")], [("p1", "A1")]
    )


def test_payment_exactly_120_seconds_later_joins(join):
    arrivals = [keyed("b", "o1", T0 + 7), keyed("p", "o1", T0 + 7 + 120 * SECOND, payment_id="p1")]
    run_streaming(join, arrivals, [("p1", "A1")])


def test_payment_one_microsecond_past_120_seconds_does_not_join(join):
    arrivals = [keyed("b", "o1", T0), keyed("p", "o1", T0 + 120 * SECOND + 1, payment_id="p1")]
    run_streaming(join, arrivals, [])


def test_payment_one_millisecond_before_the_booking_does_not_join(join):
    arrivals = [keyed("b", "o1", T0 + 1000), keyed("p", "o1", T0, payment_id="p1")]
    run_streaming(join, arrivals, [])


def test_two_payments_for_one_order_give_two_rows_per_seat(join):
    arrivals = [
        keyed("b", "o1", T0, seat="A1"),
        keyed("b", "o1", T0, seat="A2"),
        keyed("p", "o1", T0 + 10 * SECOND, payment_id="failed"),
        keyed("p", "o1", T0 + 40 * SECOND, payment_id="retry"),
    ]
    expected = [("failed", "A1"), ("failed", "A2"), ("retry", "A1"), ("retry", "A2")]
    run_streaming(join, arrivals, expected)


def test_the_same_booking_message_twice_gives_its_rows_twice(join):
    arrivals = [
        keyed("b", "o1", T0),
        keyed("b", "o1", T0 + SECOND),
        keyed("p", "o1", T0 + 2 * SECOND, payment_id="p1"),
    ]
    run_streaming(join, arrivals, [("p1", "A1"), ("p1", "A1")])


def test_out_of_order_arrivals_across_partitions_still_join_once(join):
    # The payment's partition is read first; the booking's partition lags behind it, and the
    # watermark (the minimum over partitions) waits for it.
    arrivals = [
        keyed("p", "o1", T0 + 90 * SECOND, payment_id="p1"),
        keyed("p", "o2", T0 + 95 * SECOND, payment_id="p2"),
        keyed("b", "o2", T0 + 40 * SECOND),
        keyed("b", "o1", T0 + 29 * SECOND),
        ("watermark", T0 + 400 * SECOND),
    ]
    run_streaming(join, arrivals, [("p1", "A1"), ("p2", "A1")])


def test_each_pair_is_emitted_once_as_windows_close_one_after_another(join):
    # Bookings just before and after window starts (period 30 s), payments spread over 2 min,
    # with the watermark advancing between them so windows fire in separate panes.
    arrivals = []
    expected = []
    for n, offset in enumerate((0, 29 * SECOND + 999_999, 30 * SECOND, 61 * SECOND)):
        order_id = f"o{n}"
        arrivals.append(keyed("b", order_id, T0 + offset))
        for k, delay in enumerate((0, 60 * SECOND, 120 * SECOND)):
            payment_id = f"{order_id}-p{k}"
            arrivals.append(keyed("p", order_id, T0 + offset + delay, payment_id=payment_id))
            expected.append((payment_id, "A1"))
        arrivals.append(("watermark", T0 + offset - offset % 1000))  # TestStream: whole ms
    run_streaming(join, arrivals, expected)


@pytest.mark.parametrize("mode", JOIN_MODES)
def test_null_order_ids_never_join_and_malformed_events_become_dead_letters(mode):
    events_b = [
        hub_event(BOOKING_HUB, T0, booking_body(None)),
        hub_event(BOOKING_HUB, T0, booking_body("o1"), sequence=1),
        hub_event(BOOKING_HUB, T0, b"{oops", sequence=2),
    ]
    events_p = [
        hub_event(PAYMENT_HUB, T0 + SECOND, payment_body(None)),
        hub_event(PAYMENT_HUB, T0 + SECOND, payment_body("o1", "p1"), sequence=1),
    ]
    with batch_pipeline() as p:
        bookings = p | "B" >> beam.Create(
            [TimestampedValue(e, e.enqueued_time / SECOND) for e in events_b]
        )
        payments = p | "P" >> beam.Create(
            [TimestampedValue(e, e.enqueued_time / SECOND) for e in events_p]
        )
        result = (bookings, payments) | ComputeFacts(join=mode)
        assert_that(
            result["facts"] | unbatched() | beam.Map(lambda row: (row[0], row[PAYMENT_ID])),
            equal_to([("o1", "p1")]),
            label="facts",
        )
        assert_that(
            result["dead_letters"]
            | beam.Map(lambda d: (d.sequence_number, d.reason.split(":")[0])),
            equal_to([(2, "malformed JSON")]),
            label="dead_letters",
        )


def test_canonical_window_is_the_latest_start_at_or_before():
    period = 30 * SECOND
    assert canonical_window_start(T0, period) == T0
    assert canonical_window_start(T0 + period - 1, period) == T0
    assert canonical_window_start(T0 + period, period) == T0 + period


# --- property: the windowed join equals a nested-loop join ----------------------------------

orders = st.sampled_from([f"o{n}" for n in range(4)])
offsets = st.one_of(
    st.integers(min_value=0, max_value=400 * SECOND),
    # around the bounds and window starts, where off-by-one errors live
    st.sampled_from([0, 1, 30 * SECOND - 1, 30 * SECOND, 120 * SECOND, 120 * SECOND + 1]).map(
        lambda edge: 200 * SECOND + edge
    ),
)
cases = st.lists(
    st.tuples(
        st.lists(st.tuples(orders, offsets), max_size=6),
        st.lists(st.tuples(orders, offsets), max_size=6),
        st.sampled_from([1.0, 7.5, 30.0, 60.0, 600.0, None]),  # None: the global window
    ),
    min_size=1,
    max_size=25,
)


def brute_force(bookings, payments):
    return sorted(
        (f"{b_order}#{b_index}", f"{p_order}#{p_index}")
        for b_index, (b_order, b_micros) in enumerate(bookings)
        for p_index, (p_order, p_micros) in enumerate(payments)
        if b_order == p_order and 0 <= p_micros - b_micros <= 120 * SECOND
    )


def timestamped(order, micros, row, key):
    return TimestampedValue((order, (T0 + micros, row, key)), (T0 + micros) / SECOND)


def seat_key(case_index, index):
    return f"{case_index}:{index}:0"


def payment_key(case_index, index):
    return f"{case_index}:{index}"


@settings(max_examples=8)  # each example is up to 25 cases in one pipeline run
@given(cases)
@pytest.mark.parametrize("mode", JOIN_MODES)
def test_join_equals_nested_loop_join(mode, case_list):
    # Many random cases share one pipeline run (each run costs about a second) and one join per
    # window period: a case's order ids are prefixed with its index so cases cannot meet.
    by_period = {}
    for case_index, (bookings, payments, period) in enumerate(case_list):
        prefix = f"c{case_index}-"
        case = by_period.setdefault(period, ([], [], []))
        for i, (order, micros) in enumerate(bookings):
            seat = f"{prefix}{order}#{i}"
            row = booking(prefix + order, seat=seat)
            case[0].append(timestamped(prefix + order, micros, row, seat_key(case_index, i)))
        for i, (order, micros) in enumerate(payments):
            payment_id = f"{prefix}{order}#{i}"
            row = payment(prefix + order, payment_id)
            case[1].append(timestamped(prefix + order, micros, row, payment_key(case_index, i)))
        for b, q in brute_force(bookings, payments):
            # the row key says where the pair's seat row and payment came from
            b_index, q_index = b.split("#")[1], q.split("#")[1]
            key = f"{seat_key(case_index, b_index)}/{payment_key(case_index, q_index)}"
            case[2].append((prefix + b, prefix + q, key))
    with batch_pipeline() as p:
        for period, (booking_values, payment_values, expected) in by_period.items():
            joined = (
                p | f"B{period}" >> beam.Create(booking_values),
                p | f"P{period}" >> beam.Create(payment_values),
            ) | f"Join{period}" >> JOINS[mode](period)
            joined |= unbatched(f"Unbatched{period}")
            assert_that(
                joined
                | f"Pairs{period}" >> beam.Map(lambda row: (row[SEAT], row[PAYMENT_ID], row[-1])),
                equal_to(expected),
                label=f"Check{period}",
            )


def test_a_hot_order_gives_every_qualifying_pair_once(join):
    # One order with 60 seat rows and 40 payments spread from 30 s before to 170 s after:
    # the bisection must neither miss nor repeat a pair.
    bookings = [("o", (n % 12) * 5 * SECOND + n) for n in range(60)]
    payments = [("o", -30 * SECOND + n * 5 * SECOND + n % 3) for n in range(40)]
    expected = brute_force(bookings, payments)
    assert len(expected) > 1000
    with batch_pipeline() as p:
        joined = (
            p
            | "B"
            >> beam.Create(
                [
                    timestamped(o, t, booking(o, seat=f"{o}#{i}"), seat_key(0, i))
                    for i, (o, t) in enumerate(bookings)
                ]
            ),
            p
            | "P"
            >> beam.Create(
                [
                    timestamped(o, t, payment(o, f"{o}#{i}"), payment_key(0, i))
                    for i, (o, t) in enumerate(payments)
                ]
            ),
        ) | join()
        assert_that(
            joined | unbatched() | beam.Map(lambda row: (row[SEAT], row[PAYMENT_ID])),
            equal_to(expected),
        )


def test_join_bound_follows_the_rules_constant():
    assert rules.joins(0, rules.JOIN_WINDOW_MICROS)
    assert not rules.joins(0, rules.JOIN_WINDOW_MICROS + 1)
