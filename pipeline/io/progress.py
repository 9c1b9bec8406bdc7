"""Committing read positions only once the rows they lead to are written, and draining.

The source (``pipeline.io.source``) emits a ``PositionMark`` for the last event of each read call,
one whenever a caught-up partition's watermark enters a new 10 s, and a final mark when a
partition stops reading (the end of a bounded range, or a drain).
``CommitPositions`` commits a mark to the checkpoint store only when nothing that could still
change the output depends on the events up to it:

  - every join window holding them has fired and its rows are written. ``CommitPositions`` reads
    the marks together with the (empty) outputs of the warehouse writers, so its event-time
    watermark passes ``T`` only after the writers finished every bundle with rows of windows
    ending at or before ``T``; a mark at time ``t`` is committed once a timer at ``t + span``
    fires (``span`` = the join window's size);
  - every event that could still join them has been read: when partitions stop (a drain, or a
    bounded run), the watermark jumps to the end of time although later events may follow in
    the hub, so commits also stay ``span`` behind the earliest point where a partition stopped,
    and behind the latest event read at all (a drain by Dataflow, which stops partitions through
    ``truncate`` without final marks, is then safe too).

Marks come one per read call and one per 10 s of event time per partition; commits come at
most once per 30 s of event time. So the state stays small over hours, and one key holds it all. A
restarted job reads on from the commits; the rows it writes again for the last ``span`` of
events are dropped by the warehouse's idempotent mode.

Drain (``request_drain``): partitions read in this process stop at their current position, emit
their final mark and end; windows then fire, rows are written, positions committed and the job
finishes. It reaches workers that share the launcher's process (``--environment_type=LOOPBACK``,
the local default, and the in-process runner); on Dataflow use the service's drain, which calls
the source's ``truncate``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import NamedTuple

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.utils.timestamp import Timestamp

from pipeline.io.checkpoints import CheckpointStore

_DRAIN = threading.Event()


def request_drain() -> None:
    """Asks every partition read in this process to stop where it is (see the module doc)."""
    _DRAIN.set()


def drain_requested() -> bool:
    return _DRAIN.is_set()


def reset_drain() -> None:
    """Forgets a drain request, before the next job in the same process."""
    _DRAIN.clear()


class PositionMark(NamedTuple):
    """The last event read so far in one partition, or where a partition stopped (``final``).

    ``sequence_number`` is -1 for a final mark of a partition that read nothing; ``event_time``
    is the event's Beam timestamp, or for a final mark the partition's watermark when it stopped
    (µs since the epoch).
    """

    hub: str
    partition: str
    sequence_number: int
    event_time: int
    final: bool = False


def committable(
    marks: Iterable[PositionMark], watermark: int, span: int
) -> tuple[dict[tuple[str, str], int], list[PositionMark]]:
    """What may be committed when the watermark (µs) has reached ``watermark``.

    Returns ``({(hub, partition): last sequence number to commit}, marks to keep)``. A mark is
    committable when ``event_time + span`` is at most the watermark, every final mark's time and
    the latest mark's time; final marks are always kept, as they hold back later commits too.
    """
    marks = list(marks)
    if not marks:
        return {}, []
    frontier = max(mark.event_time for mark in marks)
    limit = min([watermark, frontier, *(mark.event_time for mark in marks if mark.final)]) - span
    commits: dict[tuple[str, str], int] = {}
    kept = []
    for mark in marks:
        if mark.final or mark.event_time > limit:
            kept.append(mark)
        elif mark.sequence_number >= 0:
            key = (mark.hub, mark.partition)
            commits[key] = max(commits.get(key, -1), mark.sequence_number)
    return commits, kept


def _next_timer(marks: Iterable[PositionMark], span: int, interval: int) -> int | None:
    """When the earliest pending mark can be committed, rounded up to the commit interval."""
    times = [mark.event_time for mark in marks if not mark.final]
    if not times:
        return None
    due = min(times) + span
    return -(-due // interval) * interval


_MARKS = beam.DoFn.StateParam(BagStateSpec("marks", coders.PickleCoder()))
_TIMER_AT = beam.DoFn.StateParam(ReadModifyWriteStateSpec("timer_at", coders.VarIntCoder()))
_COMMIT_TIMER = TimerSpec("commit", TimeDomain.WATERMARK)
_COMMIT = beam.DoFn.TimerParam(_COMMIT_TIMER)


class _CommitPositionsFn(beam.DoFn):
    def __init__(self, open_store: Callable[[], CheckpointStore], span: int, interval: int):
        self._open_store = open_store
        self._span = span
        self._interval = interval

    def setup(self):
        self._store = self._open_store()
        self._commits = Metrics.counter("bms", "positions_committed")

    def process(
        self,
        keyed_mark,
        marks=_MARKS,
        timer_at=_TIMER_AT,
        commit=_COMMIT,
    ):
        mark = keyed_mark[1]
        marks.add(mark)
        due = _next_timer([mark], self._span, self._interval)
        current = timer_at.read()
        if due is not None and (current is None or due < current):
            commit.set(Timestamp(micros=due))
            timer_at.write(due)

    @on_timer(_COMMIT_TIMER)
    def on_commit(
        self,
        fired_at=beam.DoFn.TimestampParam,
        marks=_MARKS,
        timer_at=_TIMER_AT,
        commit=_COMMIT,
    ):
        commits, kept = committable(marks.read(), fired_at.micros, self._span)
        for (hub, partition), sequence_number in sorted(commits.items()):
            self._store.commit(hub, partition, sequence_number)
            yield hub, partition, sequence_number
        self._commits.inc(len(commits))
        marks.clear()
        for mark in kept:
            marks.add(mark)
        due = _next_timer(kept, self._span, self._interval)
        timer_at.clear()
        # A due time not after this firing means a final mark holds the rest back: nothing
        # more will become committable, so no timer.
        if due is not None and due > fired_at.micros:
            commit.set(Timestamp(micros=due))
            timer_at.write(due)

    def teardown(self):
        self._store.close()


class CommitPositions(beam.PTransform):
    """Commits ``PositionMark``s to a checkpoint store once their rows are written.

    Apply it to a tuple of PCollections: the marks of every source, and the outputs of every
    warehouse writer (they hold no elements; they only hold the watermark back until rows are
    written). Returns the commits made, ``(hub, partition, sequence number)`` timestamped when
    they were made (in event time).

    Args:
      open_store: makes the checkpoint store, on the worker.
      span: the join window's size in µs: how far commits stay behind the watermark.
      interval: commits happen at most once per this much event time (µs).
    """

    def __init__(
        self, open_store: Callable[[], CheckpointStore], span: int, interval: int = 30_000_000
    ):
        super().__init__()
        self._fn = _CommitPositionsFn(open_store, span, interval)

    def expand(self, inputs):
        return (
            inputs
            | "Together" >> beam.Flatten()
            | "OneKey" >> beam.Map(lambda mark: ("positions", mark))
            | "Commit" >> beam.ParDo(self._fn)
        )
