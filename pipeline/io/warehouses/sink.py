"""The one warehouse sink: validate, batch, insert once per row key, wait out outages, isolate
refused rows. Every target's writer (``base.WarehouseWriter``) runs under it.

For each bundle the sink

  1. checks every row against the table's column types (``base.row_checker``): a fact row that
     no target could store leaves at once as a dead letter naming the column and the reason;
  2. buffers the others and inserts them ``batch_size`` at a time. The writer inserts only rows
     whose row key the table lacks (the database decides: a unique index, or one set-based
     statement), so a replayed or retried batch adds nothing twice;
  3. retries transient failures with exponential backoff and jitter (tenacity) for up to
     ``retry_deadline`` seconds, pausing the reading of the hubs meanwhile
     (``pipeline.io.hubs.progress.pause_reading``); past the deadline it raises
     ``WarehouseUnavailable``, which fails the bundle and so the job, with nothing committed
     past the unwritten rows;
  4. halves a batch the database refuses for its data until the refused rows are alone, so a
     good row is never held back by a bad one; a refused fact row becomes a dead letter with the
     database's reason (a refused dead letter stops the job: there is nowhere else to put it).

Its output is the dead letters of the fact rows it could not store (none for the dead-letter
table), in the rows' own windows; the job writes them with the other dead letters. Nothing else
is emitted, and the output's watermark passes a time only when the rows up to it are written,
which is what ``pipeline.io.hubs.progress.CommitPositions`` waits for.

Batches end with each bundle by default. With ``batch_seconds`` > 0 they span bundles: rows are
kept in Beam state (so a worker that dies loses nothing: the runner replays them) under a key,
one of ``writers`` buckets of the row key (a key's rows always meet the same bucket, whose
batches are written one after another: one writer per key), and a batch is written when it holds
``batch_size`` rows, ``batch_seconds`` after its first row came (a processing-time timer), or
when the input ends (a drain, the end of a bounded run). Meanwhile the output's watermark is held
at the earliest row kept (the timer's hold, moved back whenever an earlier row comes), so
positions are still committed only once their rows are written. This is what a load path that
costs a fixed price per batch (a file and a ``COPY INTO``) needs in a stream, where bundles are
small.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TypeVar

import apache_beam as beam
import tenacity
from apache_beam.coders import coders
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import metrics
from pipeline.io.hubs import progress
from pipeline.io.warehouses.base import (
    DEAD_LETTERS,
    FACTS,
    WarehouseUnavailable,
    WarehouseWriteError,
    WarehouseWriter,
    dead_letter_row,
    describe_error,
    row_checker,
)
from pipeline.schema import DeadLetter

__all__ = ["DEFAULT_RETRY_DEADLINE_SECONDS", "WriteRows"]

DEFAULT_RETRY_DEADLINE_SECONDS = 600.0
_LOG = logging.getLogger(__name__)
T = TypeVar("T")


class _WriteRowsFn(beam.DoFn):
    def __init__(
        self,
        open_writer: Callable[[], WarehouseWriter],
        target: str,
        batch_size: int,
        retry_deadline: float,
        max_backoff: float,
    ):
        self._open_writer = open_writer
        self._target = target
        self._batch_size = batch_size
        self._retry_deadline = retry_deadline
        self._max_backoff = max_backoff
        self._to_row = dead_letter_row if target == DEAD_LETTERS else tuple

    def setup(self):
        self._writer = self._open_writer()
        self._unstorable = row_checker(self._target, nul_allowed=self._writer.nul_allowed)
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(self._writer.is_transient),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=self._max_backoff),
            stop=tenacity.stop_after_delay(self._retry_deadline),
            before_sleep=self._waiting,
            reraise=True,
        )
        self._prepared = False

    def start_bundle(self):
        self._buffer: list[WindowedValue] = []
        if not self._prepared:  # the tables exist from the start, even if no row comes
            self._with_retries(self._writer.prepare)
            self._prepared = True

    def process(self, batch, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        rows, refused = self._checked(batch, timestamp, window)
        yield from refused
        self._buffer.extend(WindowedValue(row, timestamp, (window,)) for row in rows)
        while len(self._buffer) >= self._batch_size:
            full, self._buffer = (
                self._buffer[: self._batch_size],
                self._buffer[self._batch_size :],
            )
            yield from self._write(full)

    def finish_bundle(self):
        yield from self._flush()

    def teardown(self):
        self._writer.close()

    def _checked(self, batch: list, timestamp, window) -> tuple[list[tuple], list[WindowedValue]]:
        """The rows of a batch the table can store, and the dead letters of the others
        (module doc, 1)."""
        metrics.ROWS_RECEIVED.inc(len(batch), table=self._target)
        rows, refused = [], []
        for element in batch:
            row = self._to_row(element)
            problem = self._unstorable(row)
            if problem is None:
                rows.append(row)
            else:
                refused.extend(self._refuse(WindowedValue(row, timestamp, (window,)), *problem))
        return rows, refused

    def _flush(self) -> Iterator[WindowedValue]:
        batch, self._buffer = self._buffer, []
        if batch:
            yield from self._write(batch)

    def _write(self, batch: list[WindowedValue]) -> Iterator[WindowedValue]:
        """Inserts a batch; halves it while the database refuses its data (module doc, 4)."""
        try:
            written = self._insert([row.value for row in batch])
        except Exception as error:
            if not self._writer.is_data_error(error):
                raise WarehouseWriteError(
                    f"could not write to {self._writer.description}: {describe_error(error)}"
                ) from None
            if len(batch) == 1:
                yield from self._refuse(batch[0], None, f"refused: {describe_error(error)}")
                return
            middle = len(batch) // 2
            yield from self._write(batch[:middle])
            yield from self._write(batch[middle:])
            return
        metrics.ROWS_WRITTEN.inc(written, table=self._target)
        metrics.ROWS_ALREADY_PRESENT.inc(len(batch) - written, table=self._target)

    def _insert(self, rows: list[tuple]) -> int:
        return self._with_retries(self._writer.write_batch, rows)

    def _with_retries(self, work: Callable[..., T], *args) -> T:
        """``work`` through the retry policy (module doc, 3)."""
        started = time.monotonic()
        try:
            return self._retrying(work, *args)
        except Exception as error:
            if self._writer.is_transient(error):
                raise WarehouseUnavailable(
                    f"warehouse {self._writer.description} unavailable for "
                    f"{time.monotonic() - started:.0f} s ({describe_error(error)}); rows not "
                    "written yet will be read again by the next run"
                ) from None
            raise
        finally:
            if progress.reading_paused():
                progress.resume_reading()
                _LOG.warning("warehouse %s is back; reading resumes", self._writer.description)

    def _waiting(self, state: tenacity.RetryCallState) -> None:
        metrics.WRITE_RETRIES.inc()
        if not progress.reading_paused():
            error = state.outcome.exception() if state.outcome else None
            reason = describe_error(error) if error else "unknown"
            progress.pause_reading(reason)
            _LOG.warning(
                "warehouse %s unavailable (%s): reading paused, retrying for up to %.0f s",
                self._writer.description,
                reason,
                self._retry_deadline,
            )

    def _refuse(self, row: WindowedValue, column: str | None, reason: str):
        if self._target != FACTS:
            raise WarehouseWriteError(
                f"{self._writer.description} cannot store a dead letter ({reason})"
            )
        metrics.ROWS_UNSTORABLE.inc(table=self._target)
        described = f"column {column}: {reason}" if column else reason
        letter = DeadLetter.of_row(row.value, column, described)
        yield row.with_value(letter)


_KEPT_SPEC = BagStateSpec("rows", coders.PickleCoder())  # (rows, timestamp in µs)
_COUNT_SPEC = ReadModifyWriteStateSpec("count", coders.VarIntCoder())
_HOLD_SPEC = ReadModifyWriteStateSpec("hold", coders.VarIntCoder())  # earliest kept, µs
_DUE_SPEC = ReadModifyWriteStateSpec("due", coders.FloatCoder())  # when the batch is written
_DUE_TIMER = TimerSpec("due", TimeDomain.REAL_TIME)
_END_TIMER = TimerSpec("end", TimeDomain.WATERMARK)
_KEPT = beam.DoFn.StateParam(_KEPT_SPEC)
_COUNT = beam.DoFn.StateParam(_COUNT_SPEC)
_HOLD = beam.DoFn.StateParam(_HOLD_SPEC)
_DUE = beam.DoFn.StateParam(_DUE_SPEC)
_DUE_AT = beam.DoFn.TimerParam(_DUE_TIMER)
_END_AT = beam.DoFn.TimerParam(_END_TIMER)


def bucket_of(key: str, buckets: int) -> int:
    """The bucket of a row key: the same on every worker (CRC-32, not Python's salted hash)."""
    return zlib.crc32(key.encode()) % buckets if buckets > 1 else 0


class _BatchAcrossBundlesFn(_WriteRowsFn):
    """``_WriteRowsFn`` with batches kept in state across bundles (module doc). Its input is
    ``(bucket, rows)``."""

    def __init__(self, *args, batch_seconds: float, clock: Callable[[], float] = time.time):
        super().__init__(*args)
        self._batch_seconds = batch_seconds
        self._clock = clock

    def start_bundle(self):
        if not self._prepared:  # the tables exist from the start, even if no row comes
            self._with_retries(self._writer.prepare)
            self._prepared = True

    def process(
        self,
        element,
        timestamp=beam.DoFn.TimestampParam,
        window=beam.DoFn.WindowParam,
        kept=_KEPT,
        count=_COUNT,
        hold=_HOLD,
        due=_DUE,
        due_at=_DUE_AT,
        end_at=_END_AT,
    ):
        rows, refused = self._checked(element[1], timestamp, window)
        yield from refused
        if not rows:
            return
        kept.add((rows, timestamp.micros))
        before = count.read() or 0
        n = before + len(rows)
        count.write(n)
        if before == 0:
            end_at.set(window.end)
            due.write(self._clock() + self._batch_seconds)
        held = hold.read()
        if held is None or timestamp.micros < held:
            # A processing-time timer holds the output watermark at the timestamp of the
            # element that set it: (re)set it from the earliest row kept, for the same time.
            hold.write(timestamp.micros)
            due_at.set(Timestamp.of(due.read()))
        if n >= self._batch_size:
            yield from self._flush_kept(window, kept, count, hold, due)

    @on_timer(_DUE_TIMER)
    def on_due(self, window=beam.DoFn.WindowParam, kept=_KEPT, count=_COUNT, hold=_HOLD, due=_DUE):
        yield from self._flush_kept(window, kept, count, hold, due)

    @on_timer(_END_TIMER)
    def on_end(self, window=beam.DoFn.WindowParam, kept=_KEPT, count=_COUNT, hold=_HOLD, due=_DUE):
        yield from self._flush_kept(window, kept, count, hold, due)

    def finish_bundle(self):
        return None  # the batch stays in state: that is the point

    def _flush_kept(self, window, kept, count, hold, due) -> Iterator[WindowedValue]:
        # The due timer is left alone: the next batch's first row sets it again (replacing it),
        # and if none comes it fires on an empty batch. Clearing a processing-time timer, in
        # its own callback above all, makes Prism fire it again and again.
        batch = [
            WindowedValue(row, Timestamp(micros=micros), (window,))
            for rows, micros in kept.read()
            for row in rows
        ]
        kept.clear()
        count.clear()
        hold.clear()
        due.clear()
        for first in range(0, len(batch), self._batch_size):
            yield from self._write(batch[first : first + self._batch_size])


class WriteRows(beam.PTransform):
    """Writes batches (lists) of fact rows or of ``DeadLetter``s through a ``WarehouseWriter``
    (see the module doc). A batch is the unit Beam passes on, not the unit of insert: inserts
    take ``batch_size`` rows whatever the batches' sizes.

    Args:
      open_writer: makes the writer, on the worker.
      target: ``"facts"`` or ``"dead_letters"``.
      batch_size: rows per insert.
      retry_deadline: seconds transient failures are retried before the job fails.
      max_backoff: the longest wait between two retries, in seconds.
      batch_seconds: 0 (the default) ends batches with each bundle; more keeps them across
        bundles for up to this long (module doc).
      writers: with ``batch_seconds``, how many buckets of row keys are written in parallel.

    Returns the ``DeadLetter``s of fact rows the warehouse cannot store, one per element.
    """

    def __init__(
        self,
        open_writer: Callable[[], WarehouseWriter],
        target: str = FACTS,
        *,
        batch_size: int,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE_SECONDS,
        max_backoff: float = 30.0,
        batch_seconds: float = 0.0,
        writers: int = 1,
    ):
        super().__init__()
        if target not in (FACTS, DEAD_LETTERS):
            raise ValueError(f"target must be {FACTS!r} or {DEAD_LETTERS!r}, got {target!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if retry_deadline < 0:
            raise ValueError(f"retry_deadline must not be negative, got {retry_deadline}")
        if batch_seconds < 0:
            raise ValueError(f"batch_seconds must not be negative, got {batch_seconds}")
        if writers < 1:
            raise ValueError(f"writers must be positive, got {writers}")
        arguments = (open_writer, target, batch_size, retry_deadline, max_backoff)
        self._batch_seconds = batch_seconds
        self._writers = writers
        self._target = target
        if batch_seconds > 0:
            self._fn = _BatchAcrossBundlesFn(*arguments, batch_seconds=batch_seconds)
        else:
            self._fn = _WriteRowsFn(*arguments)

    def expand(self, rows):
        if self._batch_seconds <= 0:
            return rows | beam.ParDo(self._fn)
        buckets = self._writers
        key_of = (
            (lambda row: row.row_key) if self._target == DEAD_LETTERS else (lambda row: row[-1])
        )
        return (
            rows
            | "ByBucket"
            >> beam.FlatMap(_by_bucket, key_of, buckets).with_output_types(
                beam.typehints.KV[int, beam.typehints.Any]  # a deterministic key coder
            )
            | "BatchAndWrite" >> beam.ParDo(self._fn)
        )


def _by_bucket(batch: list, key_of: Callable, buckets: int) -> Iterator[tuple[int, list]]:
    """Splits a batch of rows into one batch per bucket of their row keys."""
    by_bucket = defaultdict(list)
    for row in batch:
        by_bucket[bucket_of(key_of(row), buckets)].append(row)
    return iter(by_bucket.items())
