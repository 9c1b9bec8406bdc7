"""The ASA join as a Beam transform: bookings to payments on order_id, payment 0..120 s later.

``CoGroupByKey`` is the join primitive in every mode, as the design asks. What goes through it
is not one element per row but *batches*: each bundle's rows are gathered per (shard, slot),
where the shard is a stable hash of the order_id (every row of one order meets in one shard)
and the slot is the window the rows belong to, so the runner groups a few lists per bundle
instead of one element per row. Grouping per element was measured as most of the pipeline's
cost (the windowed ``GroupByKey`` alone was 46 % of the CPU on the in-process runner).

Windowing, by mode:

  - bounded (``period_seconds=None``, the default of ``bms run --bounded``): the global window.
    Nothing waits for a window to close in a bounded run, so one group per shard holds all of
    its bookings and payments.
  - streaming: a booking belongs to one window only, its *canonical* one,
    ``[s, s + period + 120 s)`` with ``s`` the latest multiple of the period at or before the
    booking's time (``canonical_window_start``). That window holds every payment up to 120 s
    after any of its bookings, so a payment is put in each window whose bookings it can reach:
    those starting in ``(t - 120 s - period, t]`` for a payment at ``t``. The window closes,
    and its pairs come out, when the watermark passes its end. Each booking is in exactly one
    window, so each pair is emitted exactly once; a booking costs one copy, a payment
    ``1 + 120 s / period``.

Within a group the payments of each order are sorted once and each booking looks up its
120-second range by bisection, so a hot order (many seats, many payments) costs the size of its
output, not bookings x payments. Fact rows leave in batches of at most ``OUTPUT_BATCH_ROWS``.
"""

from __future__ import annotations

import functools
import pickle
import zlib
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from operator import itemgetter

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import (
    GlobalWindow,
    GlobalWindows,
    IntervalWindow,
    NonMergingWindowFn,
    TimestampedValue,
)
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import rules
from pipeline.schema import FACT_COLUMN_NAMES, fact_row_key

DEFAULT_PERIOD_SECONDS = 30.0
#: Beam metrics namespace of the fact-row counters, one counter per event_category.
ROWS_PER_CATEGORY_NAMESPACE = "bms.fact_rows_per_category"
CATEGORY_INDEX = FACT_COLUMN_NAMES.index("event_category")
#: How many shards of order ids the rows are grouped by: enough that a bounded run's groups
#: stay small (each is held decoded while its pairs are found), few enough that each bundle
#: sends a few big lists rather than many small ones.
SHARDS = 32
#: The most rows one batch carries, into the grouping and out of the join.
BATCH_ROWS = 1000
OUTPUT_BATCH_ROWS = BATCH_ROWS


def window_size_micros(period_seconds: float | None) -> int:
    """How long each window lasts: the join's 120 s plus one period (the join's 120 s for the
    global window, whose rows come out at the end of the input)."""
    if period_seconds is None:
        return rules.JOIN_WINDOW_MICROS
    return rules.JOIN_WINDOW_MICROS + _period_micros(period_seconds)


def _period_micros(period_seconds: float) -> int:
    period_micros = round(period_seconds * 1_000_000)
    if period_micros <= 0:
        raise ValueError(f"period_seconds must be positive, got {period_seconds}")
    return period_micros


def canonical_window_start(timestamp_micros: int, period_micros: int) -> int:
    """The start of the latest window (offset 0) that starts at or before a timestamp."""
    return timestamp_micros - timestamp_micros % period_micros


def payment_window_starts(payment_micros: int, period_micros: int) -> range:
    """The starts of the windows a payment is put in: those whose canonical bookings it can
    join, i.e. every multiple of the period in ``(t - 120 s - period, t]``."""
    last = canonical_window_start(payment_micros, period_micros)
    first = canonical_window_start(payment_micros - rules.JOIN_WINDOW_MICROS, period_micros)
    return range(first, last + 1, period_micros)


def shard_of(order_id: str) -> int:
    """The shard of an order id: the same on every worker (CRC-32, not Python's salted hash)."""
    return zlib.crc32(order_id.encode()) % SHARDS


class _BatchPerSlot(beam.DoFn):
    """Gathers each bundle's keyed rows ``(order_id, (micros, row, key))`` into lists per
    (shard, slot): ``(shard, (slot, rows))`` with ``rows`` a packed (``_pack``) list of
    ``(micros, row, key)``, where ``slot`` is the start
    of the window (µs) the rows belong to, or None for the global window. A list leaves when it
    holds ``BATCH_ROWS`` rows or the bundle ends, timestamped at its earliest row (inside its
    window, and not behind the watermark, since its rows are not)."""

    def __init__(self, slots_of):
        self._slots_of = slots_of

    def start_bundle(self):
        self._batches: dict[tuple, list] = defaultdict(list)

    def process(self, element):
        order_id, value = element
        shard = shard_of(order_id)
        for slot in self._slots_of(value[0]):
            batch = self._batches[(shard, slot)]
            batch.append(value)
            if len(batch) >= BATCH_ROWS:
                del self._batches[(shard, slot)]
                yield _timestamped_batch(shard, slot, batch)

    def finish_bundle(self):
        for (shard, slot), batch in self._batches.items():
            batched = _timestamped_batch(shard, slot, batch)
            yield WindowedValue(batched.value, batched.timestamp, (GlobalWindow(),))
        self._batches.clear()


def _timestamped_batch(shard: int, slot, batch: list) -> TimestampedValue:
    earliest = min(map(_MICROS, batch))
    packed = _pack(batch)
    return TimestampedValue((shard, (slot, packed)), Timestamp(micros=earliest))


def _pack(rows: list) -> bytes:
    """A batch as the grouping holds it. Pickled once per batch, as Beam's default coder would
    pickle each row's datetimes one by one (three times the CPU, twice the bytes); compressed
    (zlib's fastest level: 130 -> 43 bytes a row, about 1 µs), since a bounded run's grouping
    holds every row until the input ends, in up to three copies on the in-process runner."""
    return zlib.compress(pickle.dumps(rows, pickle.HIGHEST_PROTOCOL), 1)


def _unpack(packed: bytes) -> list:
    return pickle.loads(zlib.decompress(packed))


class _SlotWindows(NonMergingWindowFn):
    """Puts a batch ``(shard, (slot, rows))`` in the one window its slot names:
    ``[slot, slot + size)``."""

    def __init__(self, size_micros: int):
        self._size_micros = size_micros

    def assign(self, context):
        start = context.element[1][0]
        return [
            IntervalWindow(Timestamp(micros=start), Timestamp(micros=start + self._size_micros))
        ]

    def get_window_coder(self):
        return coders.IntervalWindowCoder()


_MICROS = itemgetter(0)


class _EmitPairs(beam.DoFn):
    """From one group ``(shard, {"bookings": [(slot, rows)...], "payments": [...]})`` (rows
    packed, see ``_pack``), the fact
    rows of every qualifying pair, in batches ``(earliest payment µs, rows)``."""

    def setup(self):
        self._rows_per_category = {}

    def process(self, element):
        _, grouped = element
        payments_by_order = defaultdict(list)
        for _, packed in grouped["payments"]:
            for payment in _unpack(packed):
                payments_by_order[payment[1][0]].append(payment)
        if not payments_by_order:
            return
        for payments in payments_by_order.values():
            payments.sort(key=_MICROS)
        times_by_order = {
            order_id: [payment[0] for payment in payments]
            for order_id, payments in payments_by_order.items()
        }
        categories: Counter[str] = Counter()
        out: list[tuple] = []
        earliest = None
        for _, packed in grouped["bookings"]:
            for booking_micros, booking, seat_key in _unpack(packed):
                order_id = booking[0]
                payment_micros = times_by_order.get(order_id)
                if payment_micros is None:
                    continue
                # Candidates by bisection; rules.joins stays the one definition of the bound.
                first = bisect_left(payment_micros, booking_micros)
                last = bisect_right(payment_micros, booking_micros + rules.JOIN_WINDOW_MICROS)
                for micros, payment, payment_key in payments_by_order[order_id][first:last]:
                    if not rules.joins(booking_micros, micros):
                        continue
                    categories[booking[CATEGORY_INDEX]] += 1
                    row = rules.fact_row(booking, booking_micros, payment, micros)
                    out.append((*row, fact_row_key(seat_key, payment_key)))
                    earliest = micros if earliest is None or micros < earliest else earliest
                    if len(out) >= OUTPUT_BATCH_ROWS:
                        yield earliest, out
                        out, earliest = [], None
        if out:
            yield earliest, out
        for category, rows in categories.items():
            self._counter(category).inc(rows)

    def _counter(self, category: str):
        counter = self._rows_per_category.get(category)
        if counter is None:
            counter = self._rows_per_category[category] = Metrics.counter(
                ROWS_PER_CATEGORY_NAMESPACE, category
            )
        return counter


def _at_payment_time(payment_micros: int, rows: list) -> TimestampedValue:
    return TimestampedValue(rows, Timestamp(micros=payment_micros))


class JoinBookingsToPayments(beam.PTransform):
    """Joins keyed booking rows and payment rows into batches of fact rows.

    Input: a tuple ``(bookings, payments)`` of PCollections of ``(order_id, (micros, row, key))``
    with micros the event's time, rows as produced by ``rules.booking_rows`` and
    ``rules.payment_row``, order_id not None, and key where the row came from
    (``PARTITION:SEQUENCE:SEAT`` for a booking's seat row, ``PARTITION:SEQUENCE`` for a payment).
    Output: lists of fact rows (the 20 columns and the row key ``schema.fact_row_key``) in the
    global window, each list timestamped with its earliest payment's time (ASA emits a match at
    the later of the two events, the payment).

    Args:
      period_seconds: how often a window starts; smaller means earlier output in streaming but
        more windows per payment. None: the global window (bounded input only: its pairs come
        out when the input ends).
    """

    def __init__(self, period_seconds: float | None = DEFAULT_PERIOD_SECONDS):
        super().__init__()
        self._period_micros = None if period_seconds is None else _period_micros(period_seconds)
        self._size_micros = window_size_micros(period_seconds)

    def expand(self, keyed):
        bookings, payments = keyed
        period = self._period_micros
        if period is None:
            windowing = GlobalWindows()
            booking_slots = payment_slots = _in_global_window
        else:
            windowing = _SlotWindows(self._size_micros)
            booking_slots = functools.partial(_canonical_slot, period_micros=period)
            payment_slots = functools.partial(payment_window_starts, period_micros=period)
        return (
            {
                "bookings": bookings
                | "BatchBookings" >> beam.ParDo(_BatchPerSlot(booking_slots))
                | "WindowBookings" >> beam.WindowInto(windowing),
                "payments": payments
                | "BatchPayments" >> beam.ParDo(_BatchPerSlot(payment_slots))
                | "WindowPayments" >> beam.WindowInto(windowing),
            }
            | "GroupByShard" >> beam.CoGroupByKey()
            | "EmitPairs" >> beam.ParDo(_EmitPairs())
            | "Unwindow" >> beam.WindowInto(GlobalWindows())
            # Re-timestamped only after leaving the windows: a TimestampedValue yielded inside
            # them would be re-assigned to the window of the group.
            | "AtPaymentTime" >> beam.MapTuple(_at_payment_time)
        )


def _in_global_window(micros: int) -> tuple[None]:
    return (None,)


def _canonical_slot(micros: int, period_micros: int) -> tuple[int]:
    return (canonical_window_start(micros, period_micros),)
