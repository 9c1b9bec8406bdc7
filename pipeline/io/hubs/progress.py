"""Committing read positions only once the rows they lead to are written; draining; pausing.

The source (``pipeline.io.hubs.source``) emits a ``PositionMark`` for the last event of each read
call, one whenever a caught-up partition's watermark enters a new 10 s, and a final mark when a
partition stops reading (the end of a bounded range, or a drain).
``CommitPositions`` commits a mark at time ``t`` to the checkpoint store only when nothing that
could still change the output depends on the events up to it:

  - every join window holding them has fired and its rows are written. ``CommitPositions`` reads
    the marks together with the (empty) outputs of the warehouse writers, so its event-time
    watermark passes ``T`` only after the writers finished every bundle with rows of windows
    ending at or before ``T``; the windows holding ``t`` end by ``t + span`` (``span`` = the
    join window's size: the join's 120 s plus one period), so the mark waits for a timer at
    ``t + span``;
  - no event read later can still pair with them: an event pairs only with events at most
    ``bound`` (the join's 120 s, ``rules.JOIN_WINDOW_MICROS``) before it, so ``t`` stays
    ``bound`` behind the latest mark (the latest event read at all) and behind every final mark
    (where a partition stopped: its later events are read by a later run). When partitions stop
    (a drain, or the end of a bounded run) the watermark jumps to the end of time, and only this
    condition holds commits back: a bounded run over events up to ``T`` commits up to
    ``T - bound`` whatever the window period. A drain by Dataflow, which stops partitions
    through ``truncate`` without final marks, is safe through the latest mark.

Marks come one per read call and one per 10 s of event time per partition; commits come at
most once per 30 s of event time. So the state stays small over hours, and one key holds it all. A
restarted job reads on from the commits; the rows it computes again for the events after them
are already in the warehouse under their row keys and are not written twice.

Drain (``request_drain``): partitions read in this process stop at their current position, emit
their final mark and end; windows then fire, rows are written, positions committed and the job
finishes. It reaches workers that share the launcher's process (``--environment_type=LOOPBACK``,
the local default, and the in-process runner); on Dataflow use the service's drain, which calls
the source's ``truncate``.

Pause (``pause_reading``): while the warehouse is unavailable its writer waits the outage out
with retries and pauses reading, so the job does not pile up rows it cannot write; partitions read
in this process then read nothing (and hold their watermarks) until ``resume_reading``. The writer
resumes once a write succeeds, or fails the job when it gives up; it should resume on every way
out, since a pause left set holds the next job in the same process too. Like the drain, it
reaches only workers in the launcher's process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
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
from apache_beam.utils.timestamp import Timestamp

from pipeline import metrics, rules
from pipeline.io.hubs.checkpoints import CheckpointStore

_DRAIN = threading.Event()


def request_drain() -> None:
    """Asks every partition read in this process to stop where it is (see the module doc)."""
    _DRAIN.set()


def drain_requested() -> bool:
    return _DRAIN.is_set()


def reset_drain() -> None:
    """Forgets a drain request, before the next job in the same process."""
    _DRAIN.clear()


_PAUSE = threading.Event()
_pause_reason = ""


def pause_reading(reason: str) -> None:
    """Asks every partition read in this process to read nothing until ``resume_reading`` (see
    the module doc); ``reason`` says why, for ``pause_reason``."""
    global _pause_reason
    _pause_reason = reason
    _PAUSE.set()


def resume_reading() -> None:
    """Ends a pause (also before the next job in the same process, like ``reset_drain``)."""
    _PAUSE.clear()


def reading_paused() -> bool:
    return _PAUSE.is_set()


def pause_reason() -> str:
    """Why reading was last paused ("" if it never was)."""
    return _pause_reason


class PositionMark(NamedTuple):
    """The last event read so far in one partition, or where a partition stopped (``final``).

    ``sequence_number`` is -1 for a final mark of a partition that read nothing; ``event_time``
    is the event's Beam timestamp, or for a final mark the partition's watermark when it stopped
    (µs since the epoch). ``offset`` is the hub's offset of that event (Event Hubs; the local hub,
    which has none, gives the sequence number as text), None when the mark's maker did not read
    the event itself: commits take it from the event's own mark.
    """

    hub: str
    partition: str
    sequence_number: int
    event_time: int
    final: bool = False
    offset: str | None = None


def committable(
    marks: Iterable[PositionMark],
    watermark: int,
    span: int,
    bound: int = rules.JOIN_WINDOW_MICROS,
) -> tuple[dict[tuple[str, str], int], list[PositionMark]]:
    """What may be committed when the watermark (µs) has reached ``watermark``.

    Returns ``({(hub, partition): last sequence number to commit}, marks to keep)``. A mark is
    committable when ``event_time + span`` is at most the watermark (its windows are written) and
    ``event_time + bound`` at most the latest mark's time and every final mark's time (no event
    read later pairs with it); final marks are always kept, as they hold back later commits too.
    """
    marks = list(marks)
    if not marks:
        return {}, []
    frontier = max(mark.event_time for mark in marks)
    stops = [frontier, *(mark.event_time for mark in marks if mark.final)]
    limit = min(watermark - span, min(stops) - bound)
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
    """When the earliest pending mark's windows are written (the watermark condition of
    ``committable``), rounded up to the commit interval.

    The other condition (``bound`` behind the latest and the final marks) moves only when a new
    mark comes, and each new mark sets a timer for itself, whose firing checks the older marks
    too; so no timer is needed while that condition alone holds the pending marks back."""
    times = [mark.event_time for mark in marks if not mark.final]
    if not times:
        return None
    due = min(times) + span
    return -(-due // interval) * interval


def _offsets(marks: Iterable[PositionMark]) -> dict[tuple[str, str, int], str]:
    """``(hub, partition, sequence number) -> offset`` of the events the marks name. A commit is
    always a mark's sequence number, and the mark of the event itself (which knows its offset) is
    pending with it whenever another mark of it is (it is never later), or already committed."""
    return {
        (mark.hub, mark.partition, mark.sequence_number): mark.offset
        for mark in marks
        if mark.offset is not None
    }


_MARKS = beam.DoFn.StateParam(BagStateSpec("marks", coders.PickleCoder()))
_TIMER_AT = beam.DoFn.StateParam(ReadModifyWriteStateSpec("timer_at", coders.VarIntCoder()))
_COMMIT_TIMER = TimerSpec("commit", TimeDomain.WATERMARK)
_COMMIT = beam.DoFn.TimerParam(_COMMIT_TIMER)


class _CommitPositionsFn(beam.DoFn):
    def __init__(
        self,
        open_store: Callable[[], CheckpointStore],
        span: int,
        interval: int,
        bound: int = rules.JOIN_WINDOW_MICROS,
    ):
        self._open_store = open_store
        self._span = span
        self._interval = interval
        self._bound = bound

    def setup(self):
        self._store = self._open_store()

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
        pending = list(marks.read())
        commits, kept = committable(pending, fired_at.micros, self._span, self._bound)
        offsets = _offsets(pending)
        for (hub, partition), sequence_number in sorted(commits.items()):
            offset = offsets.get((hub, partition, sequence_number))
            self._store.commit(hub, partition, sequence_number, offset=offset)
            yield hub, partition, sequence_number
        metrics.POSITIONS_COMMITTED.inc(len(commits))
        done = [mark.event_time for mark in pending if mark not in kept]
        if commits and done:
            metrics.record_commit(max(done))
        marks.clear()
        for mark in kept:
            marks.add(mark)
        due = _next_timer(kept, self._span, self._interval)
        timer_at.clear()
        # A due time not after this firing means the latest or a final mark holds the rest
        # back: nothing more becomes committable until a new mark comes (and sets its timer).
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
      bound: how far before an event (µs) the events it joins with may lie: how far commits
        stay behind the latest mark and every final mark (the join's 120 s).
    """

    def __init__(
        self,
        open_store: Callable[[], CheckpointStore],
        span: int,
        interval: int = 30_000_000,
        bound: int = rules.JOIN_WINDOW_MICROS,
    ):
        super().__init__()
        self._fn = _CommitPositionsFn(open_store, span, interval, bound)

    def expand(self, inputs):
        return (
            inputs
            | "Together" >> beam.Flatten()
            | "OneKey" >> beam.Map(lambda mark: ("positions", mark))
            | "Commit" >> beam.ParDo(self._fn)
        )
