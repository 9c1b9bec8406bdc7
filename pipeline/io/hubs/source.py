"""ReadFromHub: read one hub of any ``HubClient`` (local hub or Azure Event Hubs) into Beam.

Each partition is one element of a Splittable DoFn whose restriction is a range of sequence
numbers. In bounded mode the partitions are listed once and each range ends at the last sequence
number present when the job starts (``bms run --bounded`` drains the hub and stops). In unbounded
mode the partitions are listed again every few seconds (``_WatchPartitions``, itself an unbounded
Splittable DoFn), so a partition added while the job runs is read too; each range is open-ended
and the DoFn self-checkpoints (``defer_remainder``) whenever it has caught up, so runners that
never ask for a split (Flink) still get regular checkpoints. A runner may also split the open
range anywhere (``try_split(0.5)`` leaves ``[start, about 2**62)``): whether a read is open-ended
is the element's (``PartitionRange.stop is None``), never the restriction's, so every piece of an
open range keeps polling when caught up and ends only on a drain. While the warehouse is unavailable
(``pipeline.io.hubs.progress.pause_reading``) partitions read nothing and hold their watermarks.

Every event is emitted with its enqueued time as the Beam timestamp (ASA's System.Timestamp
without TIMESTAMP BY) and a manual watermark estimator per partition follows the enqueued times
read (minus ``watermark_delay`` when the pipeline re-times events from their payloads, see
``pipeline.event_time``); an idle partition moves its watermark toward wall-clock time minus
``idle_allowance`` so windows still close while it receives nothing. In a streaming job the
watermark stays a listing interval further back (``_WatchPartitions``, ``_ReadPartitionFn``), so
that the events a new partition received before it was found are not late: it trails wall-clock
time by ``partition_listing_interval + idle_allowance`` (10 s by default) at least.

Caught-up partitions ask the hub nothing but reads: whether a piece lies beyond the end of its
partition, and whether a caught-up piece ends at the partition's last event, the client answers
from what its readers learned (``HubClient.known_end``).

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
import uuid
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Duration, Timestamp

from pipeline import metrics
from pipeline.errors import UsageError
from pipeline.io.hubs import checkpoint_scope, open_hub
from pipeline.io.hubs.base import HubClient
from pipeline.io.hubs.checkpoints import open_checkpoint_store, resume_positions
from pipeline.io.hubs.positions import LATEST, StartPosition, first_sequence_number
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
#: Seconds before asking the hub again whether a partition reached a piece beyond its end.
END_CHECK_INTERVAL = 5.0
#: More events than a partition takes in a second on any tier (Event Hubs Dedicated included).
MAX_EVENTS_PER_SECOND = 1_000_000
#: Seconds between listings of a hub's partitions in a streaming job: how soon a new one is read.
PARTITION_LISTING_INTERVAL = 5.0
#: Seconds listings may keep failing (the partitions found are read on meanwhile) before the job
#: fails; the first listing, at job start, fails it at once.
LISTING_FAILURE_TIMEOUT = 600.0
_LOG = logging.getLogger(__name__)


class _ReadFronts:
    """For each partition of a hub read in this process, the earliest time its reader may
    still hand over: the time read up to when its latest call began (its events in flight are
    no earlier, as enqueued times never go backwards within a partition), or, after a call
    that read nothing, the idle time that call saw. Every watermark an open read reports is
    held to the fronts of the hub's *other* partitions.

    Why: Prism (Beam 2.77) takes the estimate of a stage's *latest* bundle as the whole
    stage's output watermark (``engine/elementmanager.go``, ``estimatedOutput``), not the
    minimum over the partitions other bundles are reading. A partition read ahead, or caught
    up and idle, in a bundle of its own would move the watermark past events other bundles
    have read but not handed over, and the join would drop their rows as late (12 % of the rows
    of a 200,000-event catch-up here). Listing the partitions seeds each as unread (Prism runs
    the job's Python in this process); fronts are held apart per job (``scope``). Runners that
    take the minimum themselves (Dataflow, Flink) lose nothing by it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        # (scope, hub) -> partition -> [front, read to so far]
        self._fronts: dict[tuple[str, str], dict[str, list[int]]] = {}

    def _partition(self, scope: str | None, hub: str, partition: str) -> list[int]:
        if scope is None:  # a reader outside ReadFromHub (a test's): nothing to hold
            return [MIN_TIMESTAMP.micros, MIN_TIMESTAMP.micros]
        return self._fronts.setdefault((scope, hub), {}).setdefault(
            partition, [MIN_TIMESTAMP.micros, MIN_TIMESTAMP.micros]
        )

    def seed(self, scope: str | None, hub: str, partitions: list[str]) -> None:
        with self._lock:
            for partition in partitions:
                self._partition(scope, hub, partition)

    def begin_call(self, scope: str | None, hub: str, partition: str) -> None:
        with self._lock:
            entry = self._partition(scope, hub, partition)
            entry[0] = entry[1]

    def read_to(self, scope: str | None, hub: str, partition: str, micros: int) -> None:
        with self._lock:
            entry = self._partition(scope, hub, partition)
            entry[1] = max(entry[1], micros)

    def idle(self, scope: str | None, hub: str, partition: str, micros: int) -> None:
        with self._lock:
            entry = self._partition(scope, hub, partition)
            entry[0] = entry[1] = max(entry[1], micros)

    def held(self, scope: str | None, hub: str, partition: str, micros: int) -> int:
        """``micros``, or less if another partition of the hub may still hand over earlier."""
        with self._lock:
            fronts = self._fronts.get((scope, hub), {})
            return min((micros, *(e[0] for p, e in fronts.items() if p != partition)))


_READ_FRONTS = _ReadFronts()


class PartitionRange(NamedTuple):
    """The sequence numbers of one partition to read: [start, stop), stop None when unbounded."""

    hub: str
    partition: str
    start: int
    stop: int | None


_WATERMARK_PARAM = beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())


def _partition_ranges(
    client: HubClient,
    hub_url: str,
    hub: str,
    partitions: list[str],
    start: StartPosition,
    checkpoints: str | None,
    bounded: bool,
) -> list[PartitionRange | None]:
    """The range to read of each partition (None: nothing to read in a bounded run); a
    partition with a checkpoint resumes after it, whatever ``start`` says."""
    resume = {}
    if checkpoints is not None:
        store = open_checkpoint_store(checkpoints, checkpoint_scope(hub_url))
        try:
            resume = resume_positions(store, hub)
        finally:
            store.close()
    ranges: list[PartitionRange | None] = []
    for partition in partitions:
        first = first_sequence_number(client, hub, partition, start, resume.get(partition))
        if not bounded:
            ranges.append(PartitionRange(hub, partition, first, None))
            continue
        stop = client.partition_properties(hub, partition).last_sequence_number + 1
        ranges.append(PartitionRange(hub, partition, first, stop) if stop > first else None)
    return ranges


def _in_order(partitions: list[str]) -> list[str]:
    """Partition ids in the order partitions were made: Event Hubs (and the local hub) number
    them 0..N-1 and add new ones at the end."""
    return sorted(partitions, key=lambda partition: (len(partition), partition))


class _ListPartitions(beam.DoFn):
    """Expands a hub name into one PartitionRange per partition, listed once (bounded runs)."""

    def __init__(self, hub_url: str, start: StartPosition, checkpoints: str | None):
        self._hub_url = hub_url
        self._start = start
        self._checkpoints = checkpoints

    def process(self, hub: str):
        client = open_hub(self._hub_url)
        try:
            partitions = client.partition_ids(hub)
            yield from filter(
                None,
                _partition_ranges(
                    client, self._hub_url, hub, partitions, self._start, self._checkpoints, True
                ),
            )
        finally:
            client.close()


class _ListingTracker(OffsetRestrictionTracker):
    """The partitions of a hub emitted so far: ``[n, sys.maxsize)`` once the first n are. Only
    checkpoints split it: another watcher of the same hub would list it again for nothing."""

    def try_split(self, fraction_of_remainder: float):
        return super().try_split(0) if fraction_of_remainder == 0 else None


class _ListingProvider(RestrictionProvider):
    def initial_restriction(self, hub: str) -> OffsetRange:
        return OffsetRange(0, _OPEN_END)

    def create_tracker(self, restriction: OffsetRange) -> _ListingTracker:
        return _ListingTracker(restriction)

    def restriction_size(self, hub: str, restriction: OffsetRange) -> int:
        return 1

    def truncate(self, hub: str, restriction: OffsetRange) -> None:
        return None  # a drain ends the watch


_LISTING_PARAM = beam.DoFn.RestrictionParam(_ListingProvider())


class _WatchPartitions(beam.DoFn):
    """Emits one open PartitionRange per partition of a hub: those it has at job start at once,
    and a partition added later (Event Hubs Premium and Dedicated can add partitions to a hub)
    within ``interval`` seconds. A drain ends it.

    A new partition's events may have been enqueued at any time since the listing before the
    one that found it: so its range is emitted at that time, and this transform's watermark
    trails each listing by ``idle_allowance`` (the clocks of the worker and the hub may differ,
    as for idle partitions) until the next. Without that hold, the events a new partition
    received before it was found would come behind the watermark: late. (The readers of the
    other partitions hold it as well, for Prism: see ``_ReadPartitionFn``.)
    """

    def __init__(
        self,
        hub_url: str,
        start: StartPosition,
        checkpoints: str | None,
        interval: float,
        idle_allowance: float,
        fronts_scope: str | None = None,
    ):
        self._hub_url = hub_url
        self._fronts_scope = fronts_scope
        self._start = start
        self._checkpoints = checkpoints
        self._interval = Duration.of(interval)
        self._idle_allowance_micros = int(idle_allowance * 1_000_000)
        self._client = None
        self._failing_since: float | None = None  # time.monotonic() of the first failed listing

    def setup(self):
        self._client = open_hub(self._hub_url)

    def teardown(self):
        if self._client is not None:
            self._client.close()

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        hub: str,
        tracker=_LISTING_PARAM,
        watermark=_WATERMARK_PARAM,
    ):
        emitted = tracker.current_restriction().start
        if drain_requested():
            tracker.try_claim(tracker.current_restriction().stop)
            return
        listed_at = time.time_ns() // 1_000
        since = watermark.current_watermark()  # None at the first listing: from the start
        try:
            ranges = self._new_partitions(hub, emitted, since is not None)
        except Exception as error:
            if since is None or not self._listing_failed(hub, error):
                raise
            tracker.defer_remainder(self._interval)  # the watermark waits for the next listing
            return
        self._failing_since = None
        for index, partition_range in enumerate(ranges, start=emitted):
            if not tracker.try_claim(index):
                return
            if since is not None:
                _LOG.info("hub %r has a new partition %s", hub, partition_range.partition)
                partition_range = beam.window.TimestampedValue(partition_range, since)
            yield partition_range
        held = Timestamp(micros=listed_at - self._idle_allowance_micros)
        current = watermark.current_watermark()
        if current is None or current < held:
            watermark.set_watermark(held)
        tracker.defer_remainder(self._interval)

    def _new_partitions(self, hub: str, emitted: int, later: bool) -> list[PartitionRange]:
        """The ranges of the hub's partitions after the first ``emitted``; ``later``: after the
        first listing, when a partition found was made after the job started, so it is read from
        its first event even when the job started at the latest ones."""
        partitions = _in_order(self._client.partition_ids(hub))[emitted:]
        if not partitions:
            return []
        start = EARLIEST_START if later and self._start.kind == LATEST else self._start
        _READ_FRONTS.seed(self._fronts_scope, hub, partitions)
        return _partition_ranges(
            self._client, self._hub_url, hub, partitions, start, self._checkpoints, False
        )

    def _listing_failed(self, hub: str, error: Exception) -> bool:
        """Whether to carry on after a listing failed (the partitions found so far are read on,
        and the next listing tries again), for up to ``LISTING_FAILURE_TIMEOUT`` seconds."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if isinstance(error, UsageError) or now - self._failing_since > LISTING_FAILURE_TIMEOUT:
            return False
        _LOG.warning(
            "listing the partitions of hub %r failed (%s: %s): trying again in %g s; the "
            "watermark waits until a listing succeeds",
            hub,
            type(error).__name__,
            error,
            self._interval.micros / 1e6,
        )
        return True


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


class _ReadPartitionFn(beam.DoFn):
    """Reads the events of one partition range in batches through one client per DoFn instance.

    The watermark of an open range also stays ``partition_listing_interval + idle_allowance``
    behind wall-clock time: a partition the next listing finds may hold events from then on.
    ``_WatchPartitions`` holds the watermark there too, which suffices where an element waiting
    to be read holds the watermark (the Beam model); Prism takes a Splittable DoFn's output
    watermark from the watermarks its last calls reported, so the readers hold it themselves.
    """

    def __init__(
        self,
        hub_url: str,
        batch_size: int,
        poll_interval: float,
        idle_allowance: float,
        watermark_delay: float,
        max_batches_per_call: int,
        partition_listing_interval: float = PARTITION_LISTING_INTERVAL,
        fronts_scope: str | None = None,
    ):
        self._hub_url = hub_url
        self._fronts_scope = fronts_scope
        self._batch_size = batch_size
        self._poll_seconds = poll_interval
        self._poll_interval = Duration.of(poll_interval)
        self._idle_allowance_micros = int(idle_allowance * 1_000_000)
        self._open_lag_micros = int((partition_listing_interval + idle_allowance) * 1_000_000)
        self._watermark_delay_micros = int(watermark_delay * 1_000_000)
        self._max_batches_per_call = max_batches_per_call
        self._client = None
        # (hub, partition, position) -> when a read there first returned nothing by accident.
        self._read_anomalies: dict[tuple[str, str, int], float] = {}
        # (hub, partition, position) -> when (time.monotonic()) to ask the hub again whether
        # the partition reached a piece's position (see _beyond_end).
        self._end_checks: dict[tuple[str, str, int], float] = {}
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
        beyond_end = open_ended and self._beyond_end(element, position)
        caught_up = beyond_end
        if open_ended and not beyond_end:
            _READ_FRONTS.begin_call(self._fronts_scope, element.hub, element.partition)
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
            read_to = events[-1].enqueued_time - self._watermark_delay_micros
            if open_ended:
                _READ_FRONTS.read_to(self._fronts_scope, element.hub, element.partition, read_to)
            self._advance(watermark, read_to, element)
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
        idle_since = time.time_ns() // 1_000 - self._idle_allowance_micros
        if last is None and not beyond_end:  # nothing read in this call: nothing in flight
            _READ_FRONTS.idle(
                self._fronts_scope,
                element.hub,
                element.partition,
                idle_since - self._watermark_delay_micros,
            )
        previous = _watermark_micros(watermark)
        if self._advance(watermark, idle_since - self._watermark_delay_micros, element):
            current = _watermark_micros(watermark)
            if (
                current // MARK_INTERVAL_MICROS != previous // MARK_INTERVAL_MICROS
                and not beyond_end
                and self._client.known_end(element.hub, element.partition) == position
            ):
                # Caught up: the partition's last event is the one before `position`, read, and
                # the partition's time moves on; commits must know it, or they would stop at its
                # last event. (A piece beyond the end, the rest of a split of the open range,
                # says nothing of what was read before it.)
                read, offset = self._last_offsets.get((element.hub, element.partition), (-1, None))
                yield _mark(
                    element, position - 1, current, offset=offset if read == position - 1 else None
                )
        tracker.defer_remainder(self._poll_interval)

    def _advance(self, watermark: ManualWatermarkEstimator, micros: int, element: PartitionRange):
        """Moves the partition's watermark forward to micros, never back, nor for an open range
        closer to wall-clock time than a listing interval and the idle allowance (see the class
        doc), nor past what the hub's other partitions may still hand over (``_ReadFronts``);
        True if it moved."""
        if element.stop is None:
            micros = min(micros, time.time_ns() // 1_000 - self._open_lag_micros)
            micros = _READ_FRONTS.held(self._fronts_scope, element.hub, element.partition, micros)
        return _advance(watermark, micros, element)

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
        have.

        The client knows a lower bound of it without a round trip (the local hub exactly; Event
        Hubs from the last-enqueued properties its readers receive with every event), which
        settles it for every piece a reader of this client is at or behind. Only a piece beyond
        that asks the hub, and asks again only once the partition could have reached it
        (``END_CHECK_INTERVAL``, or longer the further ahead it lies, at
        ``MAX_EVENTS_PER_SECOND``): the rest of a split far ahead asks once.
        """
        hub, partition = element.hub, element.partition
        key = (hub, partition, position)
        if position <= self._client.known_end(hub, partition):
            self._end_checks.pop(key, None)
            return False
        now = time.monotonic()
        if now < self._end_checks.get(key, now):
            return True
        end = self._client.partition_properties(hub, partition).last_sequence_number + 1
        if position <= end:
            self._end_checks.pop(key, None)
            return False
        wait = max(END_CHECK_INTERVAL, (position - end) / MAX_EVENTS_PER_SECOND)
        self._end_checks[key] = now + min(wait, 1e9)
        return True

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
    """Moves the partition's watermark forward to micros, never back; True if it moved. The
    beginning of time (a hold by a partition not read yet) is no move."""
    if micros <= MIN_TIMESTAMP.micros:
        return False
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
      idle_allowance: how far behind wall-clock time an idle partition holds its watermark (in
        a streaming job every partition's watermark stays a listing interval further behind).
      watermark_delay: seconds the watermark trails the enqueued times read, for event times
        that may lie before them (``pipeline.event_time``'s payload policy).
      partition_listing_interval: seconds between listings of the hub's partitions (unbounded),
        so that a partition added while the job runs is read; the watermark trails wall-clock
        time by up to this much more (see ``_WatchPartitions``).
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
        partition_listing_interval: float = PARTITION_LISTING_INTERVAL,
    ):
        super().__init__(label=None)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._hub = hub
        self._with_positions = with_positions
        fronts_scope = uuid.uuid4().hex  # this job's (``_ReadFronts``)
        if bounded:
            self._list_partitions = _ListPartitions(hub_url, start, checkpoints)
        else:
            self._list_partitions = _WatchPartitions(
                hub_url,
                start,
                checkpoints,
                partition_listing_interval,
                idle_allowance,
                fronts_scope=fronts_scope,
            )
        read_fn = _ReadPartitionFn if bounded else _ReadPartitionUnboundedFn
        self._read_fn = read_fn(
            hub_url,
            batch_size,
            poll_interval,
            idle_allowance,
            watermark_delay,
            max_batches_per_call=sys.maxsize if bounded else 10,
            partition_listing_interval=partition_listing_interval,
            fronts_scope=fronts_scope,
        )

    def expand(self, pbegin):
        read = (
            pbegin
            | "Hub" >> beam.Create([self._hub])
            | "ListPartitions" >> beam.ParDo(self._list_partitions)
            | "SpreadPartitions" >> beam.Reshuffle()
            | "ReadPartitions" >> beam.ParDo(self._read_fn).with_outputs(POSITIONS, main=EVENTS)
        )
        if self._with_positions:
            return {EVENTS: read[EVENTS], POSITIONS: read[POSITIONS]}
        return read[EVENTS]
