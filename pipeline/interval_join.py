"""The low-latency join (``bms run --join interval``): each pair is written as soon as its second
row reaches the join, not when a window closes.

Same contract and same rows as ``pipeline.join.JoinBookingsToPayments`` (the windowed join):
keyed booking and payment rows in, lists of fact rows out, in the global window, each list
timestamped at its earliest payment's time. The join itself is ``pipeline.interval.JoinState``
(plain Python, no Beam); this module is its Beam glue:

1. ``BatchByShard`` gathers each bundle's rows by *shard* (a stable hash of the order_id,
   CRC-32, modulo ``shards``): one element ``(shard, (side, rows))`` per shard and side and
   bundle, so the join pays Beam's per-element costs (coding, state, timers) per batch, not
   per row (each batch's rows are pickled once). A parse step that already emits such batches
   can feed ``IntervalJoin`` directly.
2. ``IntervalJoin`` is one stateful DoFn keyed by shard. Its state holds the shard's rows that
   can still pair: a bag of the rows each bundle kept (appended once per bundle), and how far
   windows have closed. One event-time timer per shard, set to the earliest time a kept row's
   window closes, forgets rows (``JoinState.close_until``); the bag is rewritten only when it
   holds at least as many forgotten rows as live ones, so each row is written about twice.

Looking rows up needs them indexed by order_id. Rebuilding that index from the bag in every
bundle would cost the whole state per bundle, so the index of each shard lives in this worker's
memory between bundles (``_LIVE``), tagged with a random token that is also written to the
shard's Beam state with every change. A bundle uses the index only if its token is the one in
state; otherwise (another worker ran the shard, a bundle failed and was retried, a restart) it
rebuilds the index from the bag. Beam state stays the truth; memory is a cache of it.

Late rows. ``JoinState`` keeps and drops rows exactly as the windowed join's sliding windows
would (see its module), measuring window closes with the watermark as the shard's own timer sees
it: a timer firing at ``t`` tells that the watermark has reached ``t``, and the runner gives a
shard its rows and its timers in timestamp order, so no row of the shard that was on time is
still waiting then. (A timer of another shard would tell nothing about this one: when the join
runs behind, rows that were on time can still wait for it while the watermark moves on.) On the
stream's own timestamps no row is ever late: the source's watermark never passes an event it
has not read (each partition's follows its own enqueued times, which never go backwards), both
with ``--event-time enqueued`` and with ``--event-time payload`` (whose times lie at most the
tolerance before the enqueued time, and whose watermark trails by that tolerance). A row can be
behind the watermark only when an idle partition's watermark, moved on to the wall clock minus
5 s, is overtaken by an event enqueued earlier than that: a hub clock behind this machine's, or
old enqueued times replayed into a hub a job is reading. Such a row pairs in neither mode once
its window has closed, as far as the shard knows. One difference remains: a shard whose timer
has not fired since the watermark passed a window's close (it held no rows then, or the timer
is still due) does not know that window has closed, so two late rows of one order reaching it
before that can still pair here, where the windowed join drops both
(``bms_join_late_rows_total`` counts the rows this join drops).

Restarts. State lives in the runner and is lost when the job ends: a restarted job reads on
from the committed positions. Rows are kept at most ``window_size_micros(period)`` past their
own time, the same span by which commits trail the written watermark
(``pipeline.io.hubs.progress``), so nothing a later pair needs is ever committed before that
pair is written.
"""

from __future__ import annotations

import itertools
import pickle
import random
import uuid
import zlib
from collections import Counter
from typing import NamedTuple

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import GlobalWindow, GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import metrics
from pipeline.interval import BOOKINGS, NOTHING_CLOSED, PAYMENTS, JoinState
from pipeline.join import (
    CATEGORY_INDEX,
    DEFAULT_PERIOD_SECONDS,
    OUTPUT_BATCH_ROWS,
    ROWS_PER_CATEGORY_NAMESPACE,
)

#: How many shards the orders are spread over: each is one key of the stateful join.
DEFAULT_SHARDS = 8


def shard_of(order_id: str, shards: int) -> int:
    """The shard of an order: the same on every worker (CRC-32, not Python's salted hash)."""
    return zlib.crc32(order_id.encode()) % shards


class _BatchByShardFn(beam.DoFn):
    def __init__(self, side: str, shards: int):
        self._side = side
        self._shards = shards

    def start_bundle(self):
        self._batches: dict[int, list] = {}

    def process(self, keyed_row):
        shard = zlib.crc32(keyed_row[0].encode()) % self._shards
        batch = self._batches.get(shard)
        if batch is None:
            batch = self._batches[shard] = []
        batch.append(keyed_row)

    def finish_bundle(self):
        for shard, rows in self._batches.items():
            earliest = min(micros for _, (micros, _, _) in rows)
            packed = pickle.dumps(rows, pickle.HIGHEST_PROTOCOL)
            yield WindowedValue(
                (shard, (self._side, packed)), Timestamp(micros=earliest), (GlobalWindow(),)
            )
        self._batches = {}


class BatchByShard(beam.PTransform):
    """Keyed rows ``(order_id, (micros, row, key))`` of one side -> one element per shard per
    bundle, ``(shard, (side, packed rows))``, in the global window, timestamped at its earliest
    row. The rows are pickled once per batch: Beam's default coder would pickle each row's
    datetimes one by one.

    Args:
      side: ``pipeline.interval.BOOKINGS`` or ``PAYMENTS``.
      shards: how many shards (the join's keys).
    """

    def __init__(self, side: str, shards: int = DEFAULT_SHARDS):
        super().__init__()
        if side not in (BOOKINGS, PAYMENTS):
            raise ValueError(f"side must be {BOOKINGS!r} or {PAYMENTS!r}, got {side!r}")
        if shards < 1:
            raise ValueError(f"shards must be positive, got {shards}")
        self._fn = _BatchByShardFn(side, shards)

    def expand(self, rows):
        if not isinstance(rows.windowing.windowfn, GlobalWindows):
            rows |= "Unwindow" >> beam.WindowInto(GlobalWindows())
        return rows | "Batch" >> beam.ParDo(self._fn).with_output_types(
            beam.typehints.KV[int, beam.typehints.Any]  # a deterministic key coder
        )


class _Meta(NamedTuple):
    """A shard's bookkeeping in Beam state."""

    token: int  # which in-memory index reflects the state (module doc)
    closed_until: int  # JoinState.closed_until
    timer_at: int | None  # when the timer is set to fire
    stored: int  # rows in the bag, forgotten ones included


_NEW_SHARD = _Meta(0, NOTHING_CLOSED, None, 0)
#: (DoFn id, shard) -> (token, JoinState): the in-memory indexes (module doc).
_LIVE: dict[tuple[str, int], tuple[int, JoinState]] = {}
_ENTRIES_SPEC = BagStateSpec("entries", coders.PickleCoder())  # lists of interval.Entry
_META_SPEC = ReadModifyWriteStateSpec("meta", coders.PickleCoder())
_CLOSE_TIMER = TimerSpec("close", TimeDomain.WATERMARK)
_ENTRIES = beam.DoFn.StateParam(_ENTRIES_SPEC)
_META = beam.DoFn.StateParam(_META_SPEC)
_CLOSE = beam.DoFn.TimerParam(_CLOSE_TIMER)


def rows_held() -> int:
    """Rows held by the interval joins' indexes in this process."""
    return sum(len(state) for _, state in list(_LIVE.values()))


metrics.JOIN_STATE_ROWS.set_function(rows_held)


def _timer_time(close: int | None) -> int | None:
    """When to set a timer for a window closing at ``close`` (µs): the next whole millisecond.
    Portable runners keep timers to the millisecond; a timer at the millisecond before the
    close would fire before it and find nothing to forget, again and again."""
    return None if close is None else -(-close // 1000) * 1000


class _IntervalJoinFn(beam.DoFn):
    def __init__(self, period_micros: int | None):
        self._period_micros = period_micros
        self._id = uuid.uuid4().hex  # tells this join's shards from another pipeline's

    def setup(self):
        self._rows_per_category = {}

    def process(self, element, entries=_ENTRIES, meta=_META, close=_CLOSE):
        shard, (side, packed) = element
        rows = pickle.loads(packed)
        state, current = self._open(shard, entries, meta)
        added = state.add(side, rows)
        stored = current.stored
        if added.kept:
            entries.add(added.kept)
            stored += len(added.kept)
        metrics.JOIN_LATE_ROWS.inc(added.late)
        timer_at = current.timer_at
        next_close = _timer_time(state.next_close())
        if next_close is not None and next_close != timer_at:
            close.set(Timestamp(micros=next_close))
            timer_at = next_close
        self._save(shard, state, meta, timer_at, stored)
        self._count(added.facts)
        return _batches_of(added.facts)

    @on_timer(_CLOSE_TIMER)
    def on_close(
        self,
        fired_at=beam.DoFn.TimestampParam,
        shard=beam.DoFn.KeyParam,
        entries=_ENTRIES,
        meta=_META,
        close=_CLOSE,
    ):
        state, current = self._open(shard, entries, meta)
        state.close_until(fired_at.micros)
        live, stored = len(state), current.stored
        if stored - live >= live:  # as many forgotten rows as live ones: rewrite the bag
            entries.clear()
            if live:
                entries.add(state.entries())
            stored = live
        timer_at = _timer_time(state.next_close())
        if timer_at is not None:
            close.set(Timestamp(micros=timer_at))
        self._save(shard, state, meta, timer_at, stored)

    def _open(self, shard: int, entries, meta) -> tuple[JoinState, _Meta]:
        """The shard's JoinState: the in-memory index if it is the state's, else rebuilt."""
        current = meta.read() or _NEW_SHARD
        # Taken out while this bundle changes it: a bundle that fails leaves no index behind.
        token, state = _LIVE.pop((self._id, shard), (None, None))
        if state is None or token != current.token:
            kept = itertools.chain.from_iterable(entries.read()) if current.stored else ()
            state = JoinState(self._period_micros, current.closed_until, kept)
        return state, current

    def _save(self, shard: int, state: JoinState, meta, timer_at: int | None, stored: int):
        token = random.getrandbits(63) | 1  # never _NEW_SHARD's
        meta.write(_Meta(token, state.closed_until, timer_at, stored))
        if len(state):  # an empty shard is rebuilt at no cost, and holds no memory meanwhile
            _LIVE[(self._id, shard)] = (token, state)

    def _count(self, facts) -> None:
        for category, n in Counter(row[CATEGORY_INDEX] for _, row in facts).items():
            counter = self._rows_per_category.get(category)
            if counter is None:
                counter = self._rows_per_category[category] = beam.metrics.Metrics.counter(
                    ROWS_PER_CATEGORY_NAMESPACE, category
                )
            counter.inc(n)


def _batches_of(facts: list[tuple[int, tuple]]) -> list[TimestampedValue]:
    """Fact rows ``(payment µs, row)`` as the join's output: lists of at most
    ``OUTPUT_BATCH_ROWS`` rows, each timestamped at its earliest payment."""
    batches = []
    for start in range(0, len(facts), OUTPUT_BATCH_ROWS):
        chunk = facts[start : start + OUTPUT_BATCH_ROWS]
        earliest = min(micros for micros, _ in chunk)
        batches.append(TimestampedValue([row for _, row in chunk], Timestamp(micros=earliest)))
    return batches


class IntervalJoin(beam.PTransform):
    """Batches ``(shard, (side, packed keyed rows))`` (``BatchByShard``'s) -> lists of fact rows,
    each row emitted as soon as its second side arrives (see the module doc).

    Args:
      period_seconds: the windowed join's period, whose windows decide how long rows are kept
        and which rows are late; None: the global window (bounded input: everything is kept
        until the input ends).
    """

    def __init__(self, period_seconds: float | None = DEFAULT_PERIOD_SECONDS):
        super().__init__()
        if period_seconds is not None and round(period_seconds * 1_000_000) <= 0:
            raise ValueError(f"period_seconds must be positive, got {period_seconds}")
        period_micros = None if period_seconds is None else round(period_seconds * 1_000_000)
        self._fn = _IntervalJoinFn(period_micros)

    def expand(self, batches):
        return batches | "JoinAsRowsArrive" >> beam.ParDo(self._fn)


class IntervalJoinBookingsToPayments(beam.PTransform):
    """``pipeline.join.JoinBookingsToPayments``'s contract, through ``BatchByShard`` and
    ``IntervalJoin``: keyed booking rows and payment rows -> lists of fact rows, as pairs
    complete.

    Args:
      period_seconds: as for ``IntervalJoin``.
      shards: as for ``BatchByShard``.
    """

    def __init__(
        self, period_seconds: float | None = DEFAULT_PERIOD_SECONDS, shards: int = DEFAULT_SHARDS
    ):
        super().__init__()
        self._join = IntervalJoin(period_seconds)
        self._shards = shards

    def expand(self, keyed):
        bookings, payments = keyed
        return (
            (
                bookings | "BatchBookings" >> BatchByShard(BOOKINGS, self._shards),
                payments | "BatchPayments" >> BatchByShard(PAYMENTS, self._shards),
            )
            | "Together" >> beam.Flatten()
            | "Join" >> self._join
        )
