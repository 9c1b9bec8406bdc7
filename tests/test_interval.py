"""The interval join's state (``pipeline.interval``) against a nested-loop reference.

The reference states the windowed join's rule directly: a pair (b, p) comes out iff their times
join and both reached the join before b's canonical window closed. Every Hypothesis example is a
random interleaving of batches and window closes, including rows that arrive after their windows
closed (late), payments before bookings, duplicates and the bound's edges.
"""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from pipeline import rules
from pipeline.interval import (
    BOOKINGS,
    END_OF_INPUT,
    NOTHING_CLOSED,
    PAYMENTS,
    JoinState,
    window_close,
)
from pipeline.join import canonical_window_start, window_size_micros
from pipeline.schema import FACT_COLUMN_NAMES, micros_to_datetime

SECOND = 1_000_000
T0 = 1_770_000_000 * SECOND
PAYMENT_TIME = FACT_COLUMN_NAMES.index("payment_event_time")


def booking(order_id: str, seat: str) -> tuple:
    return (order_id, None, None, None, None, None, None, None, seat, 1.0, "Music", None, None)


def payment(order_id: str, payment_id: str) -> tuple:
    return (order_id, payment_id, None, 1.0, "PayPal", "Online")


periods = st.sampled_from([1 * SECOND, 7_500_000, 30 * SECOND, 60 * SECOND, None])
times = st.one_of(
    st.integers(0, 400 * SECOND),
    # the bound's and the windows' edges, where off-by-one errors live
    st.sampled_from([0, 1, 30 * SECOND - 1, 30 * SECOND, 120 * SECOND, 120 * SECOND + 1]).map(
        lambda edge: 100 * SECOND + edge
    ),
)
orders = st.sampled_from(["o1", "o2", "o3"])
batches = st.tuples(
    st.just("add"), st.sampled_from([BOOKINGS, PAYMENTS]), st.lists(st.tuples(orders, times))
)


@st.composite
def runs(draw):
    """A period and operations: batches, and window closes (anywhere, or exactly when some
    window closes, where off-by-one errors live)."""
    period = draw(periods)
    anywhere = st.integers(0, 700 * SECOND)
    on_a_close = times.map(lambda offset: window_close(T0 + offset, period) - T0)
    closes = st.tuples(st.just("close"), anywhere | on_a_close if period else anywhere)
    return period, draw(st.lists(batches | closes, max_size=30))


def keyed_rows(side: str, rows, serial) -> list:
    """Parse-step values for (order, offset) pairs, each with a key of its own."""
    keyed = []
    for order_id, offset in rows:
        n = next(serial)
        row = booking(order_id, f"s{n}") if side == BOOKINGS else payment(order_id, f"p{n}")
        keyed.append((order_id, (T0 + offset, row, f"{side}{n}")))
    return keyed


def reference(log, period) -> Counter:
    """The windowed join's pairs over an arrival log of ``(side, order, micros, key, closed)``,
    ``closed`` being how far windows had closed when the row arrived: nested loops."""
    bookings = [arrival for arrival in log if arrival[0] == BOOKINGS]
    payments = [arrival for arrival in log if arrival[0] == PAYMENTS]
    return Counter(
        f"{b_key}/{p_key}"
        for _, b_order, tb, b_key, b_closed in bookings
        for _, p_order, tp, p_key, p_closed in payments
        if b_order == p_order
        and rules.joins(tb, tp)
        and window_close(tb, period) > max(b_closed, p_closed)
    )


def replay(operations, period, restore_at=None):
    """Runs the operations on a JoinState; returns its facts, the arrival log, and the state.
    ``restore_at``: rebuild the state from its entries before that operation (a restart of the
    worker, or a retried bundle)."""
    state = JoinState(period)
    serial = itertools.count()
    facts, log, closed = Counter(), [], NOTHING_CLOSED
    for index, operation in enumerate(operations):
        if index == restore_at:
            state = JoinState(period, state.closed_until, state.entries())
        if operation[0] == "close":
            closed = max(closed, T0 + operation[1])
            state.close_until(T0 + operation[1])
            assert all(entry.closes > closed for entry in state.entries())
            continue
        _, side, rows = operation
        keyed = keyed_rows(side, rows, serial)
        added = state.add(side, keyed)
        log += [(side, order, micros, key, closed) for order, (micros, _, key) in keyed]
        on_time = [key for _, (micros, _, key) in keyed if window_close(micros, period) > closed]
        assert [entry.key for entry in added.kept] == on_time
        assert added.late == len(keyed) - len(on_time)
        for micros, row in added.facts:
            assert row[PAYMENT_TIME] == micros_to_datetime(micros)  # stamped at the payment
            facts[row[-1]] += 1
    return facts, log, state


@given(runs())
def test_state_emits_exactly_the_windowed_joins_pairs(run):
    period, operations = run
    facts, log, state = replay(operations, period)
    assert facts == reference(log, period)
    assert len(state) == len(state.entries())
    state.close_until(END_OF_INPUT)
    assert len(state) == 0 and state.entries() == [] and state.next_close() is None


@given(runs(), st.integers(0, 30))
def test_a_restored_state_goes_on_as_if_it_had_never_stopped(run, restore_at):
    period, operations = run
    facts, log, _ = replay(operations, period, restore_at)
    assert facts == reference(log, period)


@given(runs())
def test_rows_are_kept_exactly_until_their_window_closes(run):
    period, operations = run
    _, log, state = replay(operations, period)
    live = sorted(e.closes for e in state.entries())
    assert state.next_close() == (live[0] if live else None)
    kept = Counter(
        key
        for _, _, micros, key, closed in log
        if window_close(micros, period) > max(closed, state.closed_until)
    )
    assert Counter(entry.key for entry in state.entries()) == kept


@given(st.integers(-(10**15), 10**15), st.sampled_from([1, 999, 1_000_000, 7_500_000, 30 * SECOND]))
def test_window_close_is_the_canonical_windows_end(micros, period):
    start = canonical_window_start(micros, period)
    assert window_close(micros, period) == start + window_size_micros(period / SECOND)
    assert start <= micros < window_close(micros, period) - rules.JOIN_WINDOW_MICROS


def test_a_payment_exactly_120_seconds_after_joins_and_one_microsecond_later_does_not():
    state = JoinState(30 * SECOND)
    state.add(BOOKINGS, [("o", (T0 + 7, booking("o", "A1"), "b"))])
    on_bound = state.add(PAYMENTS, [("o", (T0 + 7 + 120 * SECOND, payment("o", "p1"), "p1"))])
    past = state.add(PAYMENTS, [("o", (T0 + 8 + 120 * SECOND, payment("o", "p2"), "p2"))])
    assert [row[-1] for _, row in on_bound.facts] == ["b/p1"]
    assert past.facts == []


def test_a_payment_before_its_booking_is_kept_and_pairs_when_the_booking_comes():
    state = JoinState(30 * SECOND)
    early = state.add(PAYMENTS, [("o", (T0 + 60 * SECOND, payment("o", "p"), "p"))])
    assert early.facts == [] and len(state) == 1
    late_booking = state.add(BOOKINGS, [("o", (T0 + 10 * SECOND, booking("o", "A1"), "b"))])
    assert [(micros, row[-1]) for micros, row in late_booking.facts] == [(T0 + 60 * SECOND, "b/p")]


def test_a_booking_whose_window_closed_is_late_and_pairs_with_nothing():
    state = JoinState(30 * SECOND)
    state.add(PAYMENTS, [("o", (T0 + 100 * SECOND, payment("o", "p"), "p"))])
    state.close_until(T0 + 150 * SECOND)  # the window [T0, T0 + 150 s) has closed
    added = state.add(BOOKINGS, [("o", (T0 + 20 * SECOND, booking("o", "A1"), "b"))])
    assert added == ([], [], 1)
    state.close_until(T0 + 240 * SECOND)  # the payment's last window, [T0 + 90 s, ...), closes
    assert len(state) == 0
