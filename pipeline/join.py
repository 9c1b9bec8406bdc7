"""The ASA join as a Beam transform: bookings to payments on order_id, payment 0..120 s later.

``CoGroupByKey`` on order_id, as the design asks, windowed by what the mode needs:

  - streaming: sliding windows, so pairs come out as event time passes (below);
  - bounded (``period_seconds=None``, the default of ``bms run --bounded``): the global window.
    Nothing waits for a window to close in a bounded run, so one group per order holds all of
    its bookings and payments and each pair is found once by bisection; a sliding window would
    put every element into ``1 + 120 s / period`` windows for nothing.

Sliding windows (streaming). Every booking lies in several
overlapping windows, so each pair would be seen several times; a pair is emitted only from the
booking's *canonical* window, the one whose start is the latest window start at or before the
booking's timestamp. With ``size = 120 s + period`` that window also holds every payment up to
120 s after the booking, so each qualifying pair is emitted exactly once.

Within a group the payments are sorted once and each canonical booking looks up its 120-second
range by bisection, so a hot order (many seats, many payments) costs the size of its output,
not bookings x payments.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from operator import itemgetter

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows, SlidingWindows, TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from pipeline import rules
from pipeline.schema import FACT_COLUMN_NAMES, fact_row_key

DEFAULT_PERIOD_SECONDS = 30.0
#: Beam metrics namespace of the fact-row counters, one counter per event_category.
ROWS_PER_CATEGORY_NAMESPACE = "bms.fact_rows_per_category"
CATEGORY_INDEX = FACT_COLUMN_NAMES.index("event_category")


def window_size_micros(period_seconds: float | None) -> int:
    """How long each sliding window lasts: the join's 120 s plus one period (the join's 120 s
    for the global window, whose rows come out at the end of the input)."""
    if period_seconds is None:
        return rules.JOIN_WINDOW_MICROS
    return rules.JOIN_WINDOW_MICROS + _period_micros(period_seconds)


def _period_micros(period_seconds: float) -> int:
    period_micros = round(period_seconds * 1_000_000)
    if period_micros <= 0:
        raise ValueError(f"period_seconds must be positive, got {period_seconds}")
    return period_micros


def canonical_window_start(timestamp_micros: int, period_micros: int) -> int:
    """The start of the latest sliding window (offset 0) that starts at or before a timestamp."""
    return timestamp_micros - timestamp_micros % period_micros


_MICROS = itemgetter(0)


class _EmitCanonicalPairs(beam.DoFn):
    def __init__(self, period_micros: int):
        self._period_micros = period_micros

    def setup(self):
        self._rows_per_category = {}

    def process(self, element, window=beam.DoFn.WindowParam):
        _, grouped = element
        payments = grouped["payments"]
        if not payments:
            return
        bookings = grouped["bookings"]
        if self._period_micros is not None:  # sliding windows: the canonical window's only
            window_start = window.start.micros
            bookings = [
                booking
                for booking in bookings
                if canonical_window_start(booking[0], self._period_micros) == window_start
            ]
        if not bookings:
            return
        payments = sorted(payments, key=_MICROS)
        payment_micros = [payment[0] for payment in payments]
        for booking_micros, booking, seat_key in bookings:
            # Candidates by bisection; rules.joins stays the one definition of the bound.
            first = bisect_left(payment_micros, booking_micros)
            last = bisect_right(payment_micros, booking_micros + rules.JOIN_WINDOW_MICROS)
            for micros, payment, payment_key in payments[first:last]:
                if rules.joins(booking_micros, micros):
                    self._count(booking[CATEGORY_INDEX])
                    row = rules.fact_row(booking, booking_micros, payment, micros)
                    yield micros, (*row, fact_row_key(seat_key, payment_key))

    def _count(self, category: str) -> None:
        counter = self._rows_per_category.get(category)
        if counter is None:
            counter = self._rows_per_category[category] = Metrics.counter(
                ROWS_PER_CATEGORY_NAMESPACE, category
            )
        counter.inc()


def _at_payment_time(payment_micros: int, row: tuple) -> TimestampedValue:
    return TimestampedValue(row, Timestamp(micros=payment_micros))


class JoinBookingsToPayments(beam.PTransform):
    """Joins keyed booking rows and payment rows into fact rows (20-tuples).

    Input: a tuple ``(bookings, payments)`` of PCollections of ``(order_id, (micros, row, key))``
    with micros the event's enqueued time, rows as produced by ``rules.booking_rows`` and
    ``rules.payment_row``, order_id not None, and key where the row came from
    (``PARTITION:SEQUENCE:SEAT`` for a booking's seat row, ``PARTITION:SEQUENCE`` for a payment).
    Output: fact rows (the 20 columns and the row key ``schema.fact_row_key``) in the global
    window, each timestamped with its payment's time (ASA emits a match at the later of the two
    events).

    Args:
      period_seconds: how often a sliding window starts; smaller means earlier output in
        streaming but more windows per element. None: the global window (bounded input only:
        its pairs come out when the input ends).
    """

    def __init__(self, period_seconds: float | None = DEFAULT_PERIOD_SECONDS):
        super().__init__()
        if period_seconds is None:
            self._period_micros = None
            return
        self._period_micros = _period_micros(period_seconds)
        self._size_micros = window_size_micros(period_seconds)

    def expand(self, keyed):
        bookings, payments = keyed
        if self._period_micros is None:
            windowing = GlobalWindows()
        else:
            windowing = SlidingWindows(
                size=Duration(micros=self._size_micros),
                period=Duration(micros=self._period_micros),
            )
        return (
            {
                "bookings": bookings | "WindowBookings" >> beam.WindowInto(windowing),
                "payments": payments | "WindowPayments" >> beam.WindowInto(windowing),
            }
            | "GroupByOrder" >> beam.CoGroupByKey()
            | "EmitPairs" >> beam.ParDo(_EmitCanonicalPairs(self._period_micros))
            | "Unwindow" >> beam.WindowInto(GlobalWindows())
            # Re-timestamped only after leaving the sliding windows: a TimestampedValue yielded
            # inside them would be re-assigned to every window of the group (seen on Beam 2.77).
            | "AtPaymentTime" >> beam.MapTuple(_at_payment_time)
        )
