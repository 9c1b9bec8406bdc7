"""ReadFromHub: read one hub of any ``HubClient`` (local hub or Azure Event Hubs) into Beam.

Each partition is one element of a Splittable DoFn whose restriction is a range of sequence
numbers. In bounded mode the range ends at the last sequence number present when the job starts
(``bms run --bounded`` drains the hub and stops); in unbounded mode it is open-ended and the DoFn
self-checkpoints (``defer_remainder``) whenever it has caught up, so runners that never ask for a
split (Flink) still get regular checkpoints. A runner may also split the open range anywhere
(``try_split(0.5)`` leaves ``[start, about 2**62)``): whether a read is open-ended is the
element's (``PartitionRange.stop is None``), never the restriction's, so every piece of an open
range keeps polling when caught up and ends only on a drain. While the warehouse is unavailable
(``pipeline.io.hubs.progress.pause_reading``) partitions read nothing and hold their watermarks.

Every event is emitted with its enqueued time as the Beam timestamp (ASA's System.Timestamp
without TIMESTAMP BY) and a manual watermark estimator per partition follows the enqueued times
read (minus ``watermark_delay`` when the pipeline re-times events from their payloads, see
``pipeline.event_time``); an idle partition moves its watermark toward wall-clock time minus
``idle_allowance`` so windows still close while it receives nothing.

Why a Splittable DoFn rather than Python's ``UnboundedSource``: the SDF is the portable API that
Prism, Flink and Dataflow all execute through the Fn API, it runs bounded on the in-process
runner unchanged, and checkpoints, splits and watermarks are explicit in our code. The Python
``UnboundedSource`` API is experimental and not supported by every portable runner.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Duration, Timestamp

from pipeline import metrics
from pipeline.io.hubs import checkpoint_scope, open_hub
from pipeline.io.hubs.checkpoints import open_checkpoint_store, resume_positions
from pipeline.io.hubs.positions import StartPosition, first_sequence_number
from pipeline.io.hubs.progress import PositionMark, drain_requested, reading_paused
from pipeline.schema import HubEvent

_OPEN_END = sys.maxsize
EVENTS = "events"
POSITIONS = "positions"
#: Besides one per read call, a position mark whenever event time enters a new interval of
#: this length, so a long read call still leaves positions to commit along the way.
MARK_INTERVAL_MICROS = 10_000_000
EARLIEST_START = StartPosition.earliest()
#: How long (s) reads may keep returning nothing from events a bounded range's partition still
#: reports holding before the job fails.
READ_ANOMALY_TIMEOUT = 300.0
_LOG = logging.getLogger(__name__)


class _ReadFronts:
    """How far each partition of a hub has been read in this process: the time of the last
    event read at its front, or None once it is caught up. Every watermark this source reports
    is held to the slowest front of its hub.

    Why: Prism (Beam 2.77) takes the estimate reported by a stage's *latest* bundle as the
    whole stage's output watermark (``engine/elementmanager.go``, ``estimatedOutput``), not the
    minimum over the partitions other bundles are still reading. A partition read ahead, or
    caught up and idle, in a bundle of its own would move the watermark past the unread events
    of the others, whose rows the join then drops as late. The partitions are listed in this
    process before they are read (Prism runs the job's Python in it), so the listing seeds every
    partition as unread. Runners that take the minimum themselves (Dataflow, Flink) lose
    nothing by it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._fronts: dict[tuple[str, str], dict[str, int | None]] = {}

    def seed(self, hub_url: str, hub: str, partitions: list[str]) -> None:
        with self._lock:
            self._fronts[(hub_url, hub)] = dict.fromkeys(partitions, MIN_TIMESTAMP.micros)

    def report(self, hub_url: str, hub: str, partition: str, micros: int | None) -> None:
        with self._lock:
            self._fronts.setdefault((hub_url, hub), {})[partition] = micros

    def held(self, hub_url: str, hub: str, micros: int) -> int:
        """``micros``, or less if a front of the hub has not been read that far."""
        with self._lock:
            fronts = self._fronts.get((hub_url, hub), {}).values()
            return min((micros, *(front for front in fronts if front is not None)))


_READ_FRONTS = _ReadFronts()


class PartitionRange(NamedTuple):
    """The sequence numbers of one partition to read: [start, stop), stop None when unbounded."""

    hub: str
    partition: str
    start: int
    stop: int | None


class _ListPartitions(beam.DoFn):
    """Expands a hub name into one PartitionRange per partition, fixed at job start; a partition
    with a checkpoint resumes after it."""

    def __init__(self, hub_url: str, bounded: bool, start: StartPosition, checkpoints: str | None):
        self._hub_url = hub_url
        self._bounded = bounded
        self._start = start
        self._checkpoints = checkpoints

    def process(self, hub: str):
        resume = {}
        if self._checkpoints is not None:
            store = open_checkpoint_store(self._checkpoints, checkpoint_scope(self._hub_url))
            try:
                resume = resume_positions(store, hub)
            finally:
                store.close()
        client = open_hub(self._hub_url)
        try:
            partitions = client.partition_ids(hub)
            _READ_FRONTS.seed(self._hub_url, hub, partitions)
            for partition in partitions:
                first = first_sequence_number(
                    client, hub, partition, self._start, resume.get(partition)
                )
                properties = client.partition_properties(hub, partition)
                stop = properties.last_sequence_number + 1 if self._bounded else None
                if stop is None or stop > first:
                    yield PartitionRange(hub, partition, first, stop)
        finally:
            client.close()


class _SequenceRangeProvider(RestrictionProvider):
    def initial_restriction(self, element: PartitionRange) -> OffsetRange:
        return OffsetRange(element.start, _OPEN_END if element.stop is None else element.stop)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element: PartitionRange, restriction: OffsetRange) -> int:
        return restriction.size()

    def truncate(self, element: PartitionRange, restriction: OffsetRange) -> OffsetRange | None:
        # On drain, an unbounded partition stops where it is; a bounded one finishes its range.
        # The element says which: a split piece of an open range has a finite stop.
        return None if element.stop is None else restriction


_TRACKER_PARAM = beam.DoFn.RestrictionParam(_SequenceRangeProvider())
_WATERMARK_PARAM = beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())


class _ReadPartitionFn(beam.DoFn):
    """Reads the events of one partition range in batches through one client per DoFn instance."""

    def __init__(
        self,
        hub_url: str,
        batch_size: int,
        poll_interval: float,
        idle_allowance: float,
        watermark_delay: float,
        max_batches_per_call: int,
    ):
        self._hub_url = hub_url
        self._batch_size = batch_size
        self._poll_seconds = poll_interval
        self._poll_interval = Duration.of(poll_interval)
        self._idle_allowance_micros = int(idle_allowance * 1_000_000)
        self._watermark_delay_micros = int(watermark_delay * 1_000_000)
        self._max_batches_per_call = max_batches_per_call
        self._client = None
        # (hub, partition, position) -> when a read there first returned nothing by accident.
        self._read_anomalies: dict[tuple[str, str, int], float] = {}
        # (hub, partition) -> (a sequence number its next event has at least, when last asked).
        self._known_ends: dict[tuple[str, str], tuple[int, float]] = {}
        # (hub, partition) -> (sequence number, offset) of the last event read here.
        self._last_offsets: dict[tuple[str, str], tuple[int, str]] = {}

    def setup(self):
        self._client = open_hub(self._hub_url)

    def teardown(self):
        if self._client is not None:
            self._client.close()

    def process(
        self,
        element: PartitionRange,
        tracker=_TRACKER_PARAM,
        watermark=_WATERMARK_PARAM,
    ):
        # Whether the read is open-ended is the element's: a runner may split the open range
        # [start, sys.maxsize) anywhere, leaving pieces with an ordinary-looking stop.
        open_ended = element.stop is None
        restriction = tracker.current_restriction()
        position = restriction.start
        if position >= restriction.stop:
            return  # an empty piece, left by a split at its start
        if open_ended and drain_requested():
            # Ends this piece, whatever its stop: nothing before the stop will be claimed.
            tracker.try_claim(restriction.stop)
            yield _mark(element, position - 1, _watermark_micros(watermark), final=True)
            return
        if reading_paused():
            # The warehouse is unavailable: read nothing, and hold the watermark, until its
            # writer resumes reading or gives up and fails the job (pipeline.io.hubs.progress).
            self._retry_later(tracker, open_ended)
            return
        last = None
        next_mark_at = MIN_TIMESTAMP.micros  # marks at least every MARK_INTERVAL of event time
        # A piece split off the open range far ahead has nothing to read until the partition
        # reaches it; not reading spares the other pieces' readers (Event Hubs keeps one open).
        beyond_end = caught_up = open_ended and self._beyond_end(element, position)
        for _ in range(0 if caught_up else self._max_batches_per_call):
            stop = tracker.current_restriction().stop  # the runner may split while we read
            if position >= stop or reading_paused():  # paused: the next call waits
                break
            events = self._client.read(
                element.hub, element.partition, position, min(self._batch_size, stop - position)
            )
            if events and events[0].sequence_number < position:
                # Not what a HubClient should return, but a piece starting beyond the end of
                # the partition would claim them outside its range.
                events = [event for event in events if event.sequence_number >= position]
            if not events:
                caught_up = True
                break
            if events[0].sequence_number > position:  # sequence numbers have no gaps
                if not open_ended:
                    caught_up = True  # the range's events from `position` are missing
                    break
                self._report_expired(element, position, events[0].sequence_number)
            self._read_anomalies.pop((element.hub, element.partition, position), None)
            for event in events:
                if not tracker.try_claim(event.sequence_number):
                    yield from _marks(element, last)
                    return
                if event.enqueued_time >= next_mark_at:
                    yield from _marks(element, last)
                    next_mark_at = event.enqueued_time - event.enqueued_time % MARK_INTERVAL_MICROS
                    next_mark_at += MARK_INTERVAL_MICROS
                yield beam.window.TimestampedValue(event, Timestamp(micros=event.enqueued_time))
                last = event
            metrics.EVENTS_READ.inc(len(events), hub=element.hub)
            self._last_offsets[(element.hub, element.partition)] = (
                events[-1].sequence_number,
                _offset(events[-1]),
            )
            position = events[-1].sequence_number + 1
            self._saw_end(element, position)
            front = events[-1].enqueued_time - self._watermark_delay_micros
            _READ_FRONTS.report(self._hub_url, element.hub, element.partition, front)
            self._advance_held(watermark, front, element)
        yield from _marks(element, last)
        if position >= tracker.current_restriction().stop:  # this piece is read
            if not open_ended and position >= element.stop:  # and so is the partition
                yield _mark(element, position - 1, _watermark_micros(watermark), final=True)
            return
        if not caught_up:
            tracker.defer_remainder()  # more to read: give the runner a checkpoint
            return
        if not open_ended:
            # A bounded range ends where the partition ended at job start: events are missing.
            self._check_still_held(element, position)
            self._retry_later(tracker, open_ended)
            return
        if not beyond_end:  # this piece read the partition to its end
            _READ_FRONTS.report(self._hub_url, element.hub, element.partition, None)
        idle_since = time.time_ns() // 1_000 - self._idle_allowance_micros
        previous = _watermark_micros(watermark)
        if self._advance_held(watermark, idle_since - self._watermark_delay_micros, element):
            current = _watermark_micros(watermark)
            if current // MARK_INTERVAL_MICROS != previous // MARK_INTERVAL_MICROS and (
                self._ends_at(element, position)
            ):
                # Caught up: everything before `position` is read, and the partition's time
                # moves on; commits must know it, or they would stop at its last event.
                read, offset = self._last_offsets.get((element.hub, element.partition), (-1, None))
                yield _mark(
                    element, position - 1, current, offset=offset if read == position - 1 else None
                )
        tracker.defer_remainder(self._poll_interval)

    def _advance_held(self, watermark, micros: int, element: PartitionRange) -> bool:
        """``_advance``, held to the hub's slowest read front (``_ReadFronts``)."""
        held = _READ_FRONTS.held(self._hub_url, element.hub, micros)
        return _advance(watermark, held, element)

    def _retry_later(self, tracker, open_ended: bool) -> None:
        """Checkpoints the rest of this piece, to be read again after the poll interval.

        The in-process runner resumes a bounded read at once, whatever the delay: this waits the
        interval here instead, so a bounded read that must wait does not spin.
        """
        if not open_ended:
            time.sleep(self._poll_seconds)
        tracker.defer_remainder(self._poll_interval)

    def _beyond_end(self, element: PartitionRange, position: int) -> bool:
        """Whether ``position`` lies past the sequence number the partition's next event will
        have; asks the hub at most once a second."""
        key = (element.hub, element.partition)
        end, asked_at = self._known_ends.get(key, (-1, -1e9))
        if position <= end:
            return False
        if time.monotonic() - asked_at >= 1.0:
            properties = self._client.partition_properties(element.hub, element.partition)
            end = max(end, properties.last_sequence_number + 1)
            self._known_ends[key] = (end, time.monotonic())
        return position > end

    def _saw_end(self, element: PartitionRange, position: int) -> None:
        """Notes that the partition's events reach ``position`` (exclusive) at least."""
        key = (element.hub, element.partition)
        end, asked_at = self._known_ends.get(key, (-1, -1e9))
        if position > end:
            self._known_ends[key] = (position, asked_at)

    def _ends_at(self, element: PartitionRange, position: int) -> bool:
        """Whether the partition's last event is the one before ``position``: a caught-up piece
        may start beyond the partition's end (the rest of a split of the open range), and its
        position then says nothing of what was read."""
        properties = self._client.partition_properties(element.hub, element.partition)
        return properties.last_sequence_number == position - 1

    def _report_expired(self, element: PartitionRange, position: int, found: int) -> None:
        """An open read fell behind retention: events ``position..found - 1`` are lost. Failing
        would not bring them back, and a restart would fail again at once; so it goes on."""
        metrics.EVENTS_EXPIRED.inc(found - position, hub=element.hub)
        _LOG.warning(
            "partition %s of hub %r: reading from sequence number %d returned events from %d: "
            "events %d..%d expired (retention) before they were read",
            element.partition,
            element.hub,
            position,
            found,
            position,
            found - 1,
        )

    def _check_still_held(self, element: PartitionRange, position: int) -> None:
        """Raises if the partition no longer holds the events of its bounded range from
        ``position`` on; if it still does, a read returned nothing by accident, and it is retried
        (for up to ``READ_ANOMALY_TIMEOUT`` seconds)."""
        properties = self._client.partition_properties(element.hub, element.partition)
        first, last = properties.first_sequence_number, properties.last_sequence_number
        where = f"partition {element.partition} of hub {element.hub!r}"
        if first > position:
            raise RuntimeError(
                f"{where} now starts at sequence number {first}, after {position}: events "
                f"{position}..{first - 1} expired (retention) before they were read"
            )
        if last < position:
            holds = "holds no events" if last < first else f"ends at sequence number {last}"
            raise RuntimeError(
                f"{where} now {holds}, although it held events up to {element.stop - 1} when "
                f"the run started: events {position}..{element.stop - 1} were deleted before "
                "they were read"
            )
        key = (element.hub, element.partition, position)
        now = time.monotonic()
        since = self._read_anomalies.setdefault(key, now)
        if since == now:
            _LOG.warning(
                "%s holds sequence numbers %d..%d, but reading from %d returned no events: "
                "reading again",
                where,
                first,
                last,
                position,
            )
        elif now - since > READ_ANOMALY_TIMEOUT:
            raise RuntimeError(
                f"{where} holds sequence numbers {first}..{last}, but reading from {position} "
                f"returned no events for {now - since:.0f} s"
            )


class _ReadPartitionUnboundedFn(_ReadPartitionFn):
    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element: PartitionRange,
        tracker=_TRACKER_PARAM,
        watermark=_WATERMARK_PARAM,
    ):
        yield from super().process(element, tracker, watermark)


def _offset(event: HubEvent) -> str:
    """The hub's offset of an event, carried from the event to the commit: Event Hubs gives one
    (``pipeline.io.hubs.eventhubs.ReceivedEvent``); for a hub without offsets (the local hub) the
    sequence number, as text, stands in for it."""
    offset = getattr(event, "offset", None)
    return str(event.sequence_number) if offset is None else offset


def _mark(
    element: PartitionRange,
    sequence_number: int,
    micros: int,
    final: bool = False,
    offset: str | None = None,
):
    mark = PositionMark(element.hub, element.partition, sequence_number, micros, final, offset)
    return beam.pvalue.TaggedOutput(
        POSITIONS, beam.window.TimestampedValue(mark, Timestamp(micros=micros))
    )


def _marks(element: PartitionRange, last: HubEvent | None):
    """The mark of the last event read by this call, if it read any."""
    if last is not None:
        yield _mark(element, last.sequence_number, last.enqueued_time, offset=_offset(last))


def _watermark_micros(watermark: ManualWatermarkEstimator) -> int:
    current = watermark.current_watermark()
    return MIN_TIMESTAMP.micros if current is None else current.micros


def _advance(watermark: ManualWatermarkEstimator, micros: int, element: PartitionRange) -> bool:
    """Moves the partition's watermark forward to micros, never back; True if it moved."""
    current = watermark.current_watermark()
    if current is None or current.micros < micros:
        watermark.set_watermark(Timestamp(micros=micros))
        metrics.record_watermark(element.hub, element.partition, micros)
        return True
    return False


class ReadFromHub(beam.PTransform):
    """Reads every partition of one hub as timestamped ``HubEvent``s.

    Args:
      hub_url: where the hubs are (see ``pipeline.io.hubs``).
      hub: the hub (event hub) name, e.g. ``bookingtopic``.
      bounded: read what is there at job start and stop, instead of reading forever.
      start: where to start in each partition (default: the earliest retained event).
      checkpoints: a checkpoint store location (``pipeline.io.hubs.checkpoints``): partitions with a
        checkpoint resume after it, whatever ``start`` says.
      with_positions: also return the ``PositionMark``s of what was read, to commit with
        ``pipeline.io.hubs.progress.CommitPositions``: the result is then
        ``{"events": ..., "positions": ...}``.
      batch_size: events fetched per read call.
      poll_interval: seconds to wait before polling a caught-up partition again (unbounded).
      idle_allowance: how far behind wall-clock time an idle partition holds its watermark.
      watermark_delay: seconds the watermark trails the enqueued times read, for event times
        that may lie before them (``pipeline.event_time``'s payload policy).
    """

    def __init__(
        self,
        hub_url: str,
        hub: str,
        *,
        bounded: bool,
        start: StartPosition = EARLIEST_START,
        checkpoints: str | None = None,
        with_positions: bool = False,
        batch_size: int = 1000,
        poll_interval: float = 0.5,
        idle_allowance: float = 5.0,
        watermark_delay: float = 0.0,
    ):
        super().__init__(label=None)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._hub_url = hub_url
        self._hub = hub
        self._bounded = bounded
        self._start = start
        self._checkpoints = checkpoints
        self._with_positions = with_positions
        read_fn = _ReadPartitionFn if bounded else _ReadPartitionUnboundedFn
        self._read_fn = read_fn(
            hub_url,
            batch_size,
            poll_interval,
            idle_allowance,
            watermark_delay,
            max_batches_per_call=sys.maxsize if bounded else 10,
        )

    def expand(self, pbegin):
        list_partitions = _ListPartitions(
            self._hub_url, self._bounded, self._start, self._checkpoints
        )
        read = (
            pbegin
            | "Hub" >> beam.Create([self._hub])
            | "ListPartitions" >> beam.ParDo(list_partitions)
            | "SpreadPartitions" >> beam.Reshuffle()
            | "ReadPartitions" >> beam.ParDo(self._read_fn).with_outputs(POSITIONS, main=EVENTS)
        )
        if self._with_positions:
            return {EVENTS: read[EVENTS], POSITIONS: read[POSITIONS]}
        return read[EVENTS]
