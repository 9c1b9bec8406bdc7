"""The interval join's state, as plain Python: add rows, emit the new pairs, forget by time.

``pipeline.interval_join`` runs this inside a stateful Beam DoFn; this module has no Beam in it,
so the join's logic is tested directly against a nested-loop reference.

The join emits exactly the pairs the windowed join (``pipeline.join``) emits, but as soon as the
second row of a pair arrives instead of when a window closes. For that it keeps each row exactly
as long as the windowed join's windows would, and drops a late row exactly when those windows
would:

- the windowed join emits a pair (booking b, payment p) only from b's *canonical* sliding window,
  which starts at ``s = tb - tb % period`` and closes when the watermark reaches
  ``s + period + 120 s`` (``window_close(tb)``): the pair comes out iff ``rules.joins(tb, tp)``
  and both b and p reached the join before that window closed;
- a booking is therefore kept until ``window_close(tb)``; a payment until the latest close of
  any canonical window of a booking it can pair with, ``window_close(tp)`` (those bookings lie
  at or before it);
- the state knows how far windows have closed (``closed_until``: every window closing at or
  before it is closed) only through ``close_until``, which the DoFn calls from its event-time
  timer. A booking arriving with ``window_close(tb) <= closed_until`` is late and dropped, as
  the windowed join's grouping drops it; so is a payment with ``window_close(tp) <=
  closed_until``, which every booking it could pair with has outlived; and a payment pairs only
  with kept bookings, whose windows are all still open.

Without a period (the global window of bounded runs) no window closes before the input ends:
``window_close`` is ``END_OF_INPUT``, nothing is late, and everything is kept until then.

Rows are tuples. The join's input rows are the parse step's values, ``(micros, row, key)`` with
the order_id beside them; a kept row is an ``Entry``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import NamedTuple

from pipeline import rules
from pipeline.schema import FactRow, fact_row_key

BOOKINGS = "bookings"
PAYMENTS = "payments"
SIDES = (BOOKINGS, PAYMENTS)
#: When windows close for a join without a period: once the input ends (beyond any event time;
#: a whole millisecond, as timers fire).
END_OF_INPUT = 2**62 // 1000 * 1000
#: Before any window has closed.
NOTHING_CLOSED = -(2**62)

#: One row of the parse step: ``(order_id, (micros, row, key))``.
KeyedRow = tuple[str, tuple[int, tuple, str]]


def window_close(micros: int, period_micros: int | None) -> int:
    """When the canonical sliding window of an event at ``micros`` closes (µs): the latest window
    start at or before it, plus the window's size (the join's 120 s and one period).
    ``END_OF_INPUT`` without a period."""
    if period_micros is None:
        return END_OF_INPUT
    return micros - micros % period_micros + rules.JOIN_WINDOW_MICROS + period_micros


class Entry(NamedTuple):
    """A row kept in the join's state until ``closes``."""

    side: str
    order_id: str
    micros: int
    closes: int
    row: tuple
    key: str


class Added(NamedTuple):
    """What adding a batch did: the fact rows it completed (``(payment micros, fact row and row
    key)``), the entries it kept, and how many of its rows came too late to keep."""

    facts: list[tuple[int, FactRow]]
    kept: list[Entry]
    late: int


class JoinState:
    """The rows of one shard of orders that can still pair, indexed by order_id.

    Args:
      period_micros: the windowed join's period (µs) whose windows the state follows, None for
        the global window.
      closed_until: how far windows have closed already (a restored state's).
      entries: rows to restore (``Entry``s, as ``Added.kept`` returned them); those whose window
        closed by ``closed_until`` are left out.
    """

    def __init__(
        self,
        period_micros: int | None,
        closed_until: int = NOTHING_CLOSED,
        entries: Iterable[Entry] = (),
    ):
        self._period_micros = period_micros
        self.closed_until = closed_until
        self._by_side: dict[str, dict[str, list[Entry]]] = {BOOKINGS: {}, PAYMENTS: {}}
        self._closing: dict[int, list[Entry]] = {}  # close time -> the entries closing then
        self._close_times: list[int] = []  # a heap of the keys of _closing
        self._size = 0
        for entry in entries:
            if entry.closes > closed_until:
                self._keep(entry)

    def __len__(self) -> int:
        """How many rows are kept."""
        return self._size

    def entries(self) -> list[Entry]:
        """Every kept row."""
        return [entry for closing in self._closing.values() for entry in closing]

    def next_close(self) -> int | None:
        """When the earliest kept row's window closes (µs), None if nothing is kept."""
        return self._close_times[0] if self._close_times else None

    def add(self, side: str, rows: Iterable[KeyedRow]) -> Added:
        """Adds a batch of booking rows or payment rows that reached the join, in any order, and
        returns the pairs they complete with the rows kept before them and with each other."""
        partners = self._by_side[PAYMENTS if side == BOOKINGS else BOOKINGS]
        facts: list[tuple[int, FactRow]] = []
        kept: list[Entry] = []
        late = 0
        period = self._period_micros
        for order_id, (micros, row, key) in rows:
            closes = window_close(micros, period)
            if closes <= self.closed_until:
                late += 1
                continue
            entry = Entry(side, order_id, micros, closes, row, key)
            for partner in partners.get(order_id, ()):
                booking, payment = (entry, partner) if side == BOOKINGS else (partner, entry)
                if rules.joins(booking.micros, payment.micros):
                    facts.append((payment.micros, _fact_row(booking, payment)))
            self._keep(entry)
            kept.append(entry)
        return Added(facts, kept, late)

    def close_until(self, micros: int) -> None:
        """Every window closing at or before ``micros`` has closed: forgets the rows that can no
        longer pair, and refuses later rows that would need those windows."""
        self.closed_until = max(self.closed_until, micros)
        touched: set[tuple[str, str]] = set()
        while self._close_times and self._close_times[0] <= self.closed_until:
            closing = self._closing.pop(heapq.heappop(self._close_times))
            touched.update((entry.side, entry.order_id) for entry in closing)
            self._size -= len(closing)
        for side, order_id in touched:
            by_order = self._by_side[side]
            still_open = [e for e in by_order[order_id] if e.closes > self.closed_until]
            if still_open:
                by_order[order_id] = still_open
            else:
                del by_order[order_id]

    def _keep(self, entry: Entry) -> None:
        self._by_side[entry.side].setdefault(entry.order_id, []).append(entry)
        closing = self._closing.get(entry.closes)
        if closing is None:
            closing = self._closing[entry.closes] = []
            heapq.heappush(self._close_times, entry.closes)
        closing.append(entry)
        self._size += 1


def _fact_row(booking: Entry, payment: Entry) -> FactRow:
    """The fact row of a joined (seat row, payment) pair, with its row key."""
    row = rules.fact_row(booking.row, booking.micros, payment.row, payment.micros)
    return (*row, fact_row_key(booking.key, payment.key))
