"""The hub source's Splittable DoFn, driven call by call as a runner drives it.

Each test builds the real DoFn over a real local hub, hands ``process`` a restriction tracker
(wrapped as runners wrap it) and a manual watermark estimator, and does what a runner does with
the result: checks the tracker is done, and schedules the deferred rest of the range in a new call
with a new tracker. Pieces of the open range come from ``try_split`` as a runner makes them.
Whole pipelines (bounded, and streaming on Prism) are in ``test_pipeline_e2e.py`` and
``test_streaming.py``; here one more runs bounded while reading is paused.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import NamedTuple

import apache_beam as beam
import pytest
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from pipeline.io.hubs import OutgoingEvent, progress, source
from pipeline.io.hubs.local import LocalHub, partition_for_key
from pipeline.io.hubs.positions import StartPosition
from pipeline.io.hubs.progress import PositionMark
from pipeline.io.hubs.source import (
    PartitionRange,
    ReadFromHub,
    _ReadPartitionFn,
    _ReadPartitionUnboundedFn,
    _SequenceRangeProvider,
)

HUB = "bookingtopic"
SECOND = 1_000_000
T0 = 1_700_000_000 * SECOND  # well before now: a caught-up partition's time moves on to now
POLL = 0.5
OPEN = PartitionRange(HUB, "0", 0, None)


_CLIENTS: list = []  # the hub clients the readers of a test opened


@pytest.fixture(autouse=True)
def no_drain_no_pause():
    progress.reset_drain()
    progress.resume_reading()
    yield
    progress.reset_drain()
    progress.resume_reading()
    while _CLIENTS:
        _CLIENTS.pop().close()


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        yield hub


def append(hub: LocalHub, first: int, count: int) -> None:
    """Events ``first..first + count - 1`` of partition 0, one a second from T0."""
    hub.append(
        HUB,
        [
            OutgoingEvent("k", f"e{n}".encode(), T0 + n * SECOND)
            for n in range(first, first + count)
        ],
    )


def reader(hub_url: str, *, bounded: bool = False, poll: float = POLL):
    fn_class = _ReadPartitionFn if bounded else _ReadPartitionUnboundedFn
    fn = fn_class(
        hub_url,
        batch_size=3,
        poll_interval=poll,
        idle_allowance=5.0,
        watermark_delay=0.0,
        max_batches_per_call=sys.maxsize if bounded else 10,
    )
    fn.setup()
    _CLIENTS.append(fn._client)
    return fn


class Call(NamedTuple):
    """What one ``process`` call did."""

    sequence_numbers: list[int]  # of the events emitted, in order
    marks: list[PositionMark]
    deferred: OffsetRange | None  # the rest of the piece, for a later call
    delay: float | None  # seconds until then (what is left of it when the call returns)


def drive(fn, element, tracker, watermark, threadsafe=None) -> Call:
    """One ``process`` call as a runner makes it, then the runner's checks."""
    threadsafe = threadsafe or ThreadsafeRestrictionTracker(tracker)
    outputs = list(fn.process(element, RestrictionTrackerView(threadsafe), watermark))
    threadsafe.check_done()  # every position of the piece is claimed or deferred
    events = [out for out in outputs if isinstance(out, TimestampedValue)]
    marks = [out.value.value for out in outputs if isinstance(out, TaggedOutput)]
    assert len(events) + len(marks) == len(outputs)
    assert [e.timestamp.micros for e in events] == [e.value.enqueued_time for e in events]
    status = threadsafe.deferred_status()
    deferred, delay = status if status else (None, None)
    seconds = None if delay is None else delay.micros / 1e6
    return Call([e.value.sequence_number for e in events], marks, deferred, seconds)


def waits(seconds: float):
    """A deferral's delay of about ``seconds``, what is left of it after the call."""
    return pytest.approx(seconds, abs=0.2)


def _new() -> ManualWatermarkEstimator:
    """The estimator of a restriction's first call."""
    return ManualWatermarkEstimator(None)


def resumed(watermark: ManualWatermarkEstimator) -> ManualWatermarkEstimator:
    """The estimator a runner makes for the next call, from the state it kept."""
    return ManualWatermarkEstimator(watermark.get_estimator_state())


def split_open_range(fraction: float):
    """The tracker of ``[0, sys.maxsize)`` after a runner's ``try_split(fraction)``, and the
    residual."""
    tracker = OffsetRestrictionTracker(OffsetRange(0, sys.maxsize))
    primary, residual = tracker.try_split(fraction)
    assert 0 < primary.stop == residual.start < sys.maxsize
    return tracker, residual


# ---- 1. pieces of the open range -------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.5, 1e-18], ids=["half", "near-zero"])
def test_a_split_piece_of_the_open_range_reads_polls_and_resumes(hub, fraction):
    """The crashed job: after a split the primary has a finite stop, yet the read is open."""
    append(hub, 0, 5)
    fn = reader(str(hub.path))
    tracker, residual = split_open_range(fraction)
    stop = residual.start  # 4611686018427387903 or 8
    watermark = ManualWatermarkEstimator(None)

    first = drive(fn, OPEN, tracker, watermark)
    assert first.sequence_numbers == [0, 1, 2, 3, 4]  # claimed all, in order
    assert first.deferred == OffsetRange(5, stop) and first.delay == waits(POLL)
    assert not any(mark.final for mark in first.marks)
    assert first.marks[-1].sequence_number == 4  # everything up to 4 is read

    append(hub, 5, 6)  # 5..10 arrive while the piece waits
    second = drive(fn, OPEN, OffsetRestrictionTracker(first.deferred), resumed(watermark))
    assert second.sequence_numbers == [n for n in range(5, 11) if n < stop]
    if stop > 11:
        assert second.deferred == OffsetRange(11, stop) and second.delay == waits(POLL)
    else:  # the piece is read (no final mark: the residual reads on from its stop)
        assert second.deferred is None
    assert not any(mark.final for mark in second.marks)

    rest = drive(fn, OPEN, OffsetRestrictionTracker(residual), _new())
    assert rest.sequence_numbers == [n for n in range(11) if n >= stop]
    assert rest.deferred == OffsetRange(max(stop, 11), sys.maxsize)
    assert rest.delay == waits(POLL)


def test_the_residual_beyond_the_partition_reads_nothing_and_polls_without_a_mark(hub):
    append(hub, 0, 5)
    fn = reader(str(hub.path))
    fn._client = _Reads(fn._client)
    _, residual = split_open_range(0.5)
    for _ in range(2):  # its watermark moves to now: a mark would be due, but is not true
        call = drive(fn, OPEN, OffsetRestrictionTracker(residual), _new())
        assert call == Call([], [], residual, waits(POLL))
    # Nor does it ask the hub for events (Event Hubs would move its reader there and back).
    assert fn._client.reads == []
    # A caught-up piece at the partition's end marks its position as read as its time moves on.
    read = drive(fn, OPEN, OffsetRestrictionTracker(OffsetRange(0, residual.start)), _new())
    assert [mark.sequence_number for mark in read.marks] == [4, 4]
    assert read.marks[1].event_time > T0 + 60 * SECOND  # the idle mark, at about now


def test_marks_carry_the_offset_of_their_event(hub):
    """The local hub has no offsets: the sequence number, as text, stands in for one. A caught-up
    piece's mark of the last event read carries that event's offset too."""
    append(hub, 0, 5)
    fn = reader(str(hub.path))
    tracker = OffsetRestrictionTracker(OffsetRange(0, sys.maxsize))
    call = drive(fn, OPEN, tracker, _new())  # the event's mark, then the caught-up one
    assert [(m.sequence_number, m.offset) for m in call.marks] == [(4, "4"), (4, "4")]
    assert call.marks[1].event_time > call.marks[0].event_time


def test_a_residual_split_off_near_the_end_reads_once_the_partition_reaches_it(hub):
    append(hub, 0, 5)
    fn = reader(str(hub.path))
    fn._client = _Reads(fn._client)
    piece = OffsetRange(8, sys.maxsize)
    waiting = drive(fn, OPEN, OffsetRestrictionTracker(piece), _new())
    assert waiting == Call([], [], piece, waits(POLL)) and fn._client.reads == []
    append(hub, 5, 6)  # the local hub knows its end exactly: no wait to find it reached
    read = drive(fn, OPEN, OffsetRestrictionTracker(piece), _new())
    assert read.sequence_numbers == [8, 9, 10] and fn._client.reads[0] == 8


class _Reads:
    """A hub client that records where each read starts."""

    def __init__(self, client):
        self._client = client
        self.reads = []

    def __getattr__(self, name):
        return getattr(self._client, name)

    def read(self, hub, partition, from_sequence_number, max_events):
        self.reads.append(from_sequence_number)
        return self._client.read(hub, partition, from_sequence_number, max_events)


class _SplitsWhileReading:
    """A hub client through which the runner splits the tracker at its current position
    (``try_split(0)``, as Prism does to checkpoint) during the second read of a call."""

    def __init__(self, client, threadsafe: ThreadsafeRestrictionTracker):
        self._client = client
        self._threadsafe = threadsafe
        self.reads = 0
        self.split = None

    def __getattr__(self, name):
        return getattr(self._client, name)

    def read(self, hub, partition, from_sequence_number, max_events):
        self.reads += 1
        if self.reads == 2:
            self.split = self._threadsafe.try_split(0)
        return self._client.read(hub, partition, from_sequence_number, max_events)


def test_a_split_at_the_current_position_while_reading_hands_the_rest_over(hub):
    append(hub, 0, 8)
    fn = reader(str(hub.path))
    threadsafe = ThreadsafeRestrictionTracker(OffsetRestrictionTracker(OffsetRange(0, 2**63 - 1)))
    fn._client = _SplitsWhileReading(fn._client, threadsafe)
    call = drive(fn, OPEN, None, _new(), threadsafe=threadsafe)
    primary, residual = fn._client.split
    assert (primary, residual) == (OffsetRange(0, 3), OffsetRange(3, sys.maxsize))
    assert call.sequence_numbers == [0, 1, 2] and call.deferred is None
    assert [(m.sequence_number, m.final) for m in call.marks] == [(2, False)]
    rest = drive(fn, OPEN, OffsetRestrictionTracker(residual), _new())
    assert rest.sequence_numbers == [3, 4, 5, 6, 7]


def test_truncate_on_drain_ends_every_piece_of_an_open_range_and_keeps_bounded_ranges():
    provider = _SequenceRangeProvider()
    for piece in (OffsetRange(5, sys.maxsize), OffsetRange(5, 2**62 + 2), OffsetRange(9, 10)):
        assert provider.truncate(OPEN, piece) is None
    bounded = PartitionRange(HUB, "0", 5, 100)
    assert provider.truncate(bounded, OffsetRange(5, 50)) == OffsetRange(5, 50)


def test_a_drain_ends_a_split_piece_where_it_is_with_its_final_mark(hub):
    append(hub, 0, 5)
    fn = reader(str(hub.path))
    tracker, residual = split_open_range(0.5)
    watermark = _new()
    first = drive(fn, OPEN, tracker, watermark)
    assert first.deferred == OffsetRange(5, residual.start)
    append(hub, 5, 3)
    progress.request_drain()
    ended = drive(fn, OPEN, OffsetRestrictionTracker(first.deferred), resumed(watermark))
    # Nothing more read, the piece done (drive checked the tracker), where it stopped marked.
    assert ended == Call([], [ended.marks[0]], None, None)
    assert ended.marks[0] == PositionMark(HUB, "0", 4, watermark.current_watermark().micros, True)
    rest = drive(fn, OPEN, OffsetRestrictionTracker(residual), _new())
    assert rest.sequence_numbers == [] and rest.deferred is None
    assert [mark.final for mark in rest.marks] == [True]


# ---- 2. bounded ranges whose events left the hub ---------------------------------------------


class _Retention:
    """A local hub whose retention drops the events before ``first`` after ``reads`` reads (while
    the job runs). ``first`` beyond the last event leaves the partition empty, reported as
    Event Hubs does (first = last + 1)."""

    def __init__(self, client: LocalHub, first: int, reads: int = 1, blank_reads: int = 0):
        self._client = client
        self._first = first
        self._reads_before = reads
        self._blank_reads = blank_reads  # reads that return nothing although events are there
        self.reads = 0

    def partition_ids(self, hub):
        return self._client.partition_ids(hub)

    def _expired(self) -> bool:
        return self.reads > self._reads_before

    def partition_properties(self, hub, partition):
        properties = self._client.partition_properties(hub, partition)
        if not self._expired():
            return properties
        last = max(properties.last_sequence_number, self._first - 1)
        return properties._replace(first_sequence_number=self._first, last_sequence_number=last)

    def known_end(self, hub, partition):
        return self.partition_properties(hub, partition).last_sequence_number + 1

    def read(self, hub, partition, from_sequence_number, max_events):
        self.reads += 1
        if self._blank_reads:
            self._blank_reads -= 1
            return []
        if self._expired():
            from_sequence_number = max(from_sequence_number, self._first)
        return self._client.read(hub, partition, from_sequence_number, max_events)

    def close(self):
        pass


@pytest.mark.parametrize(
    "held, first, message",
    [
        (10, 10, "events 3..9 expired"),  # the rest of the range is gone, the partition empty
        (15, 12, "events 3..11 expired"),  # later events came, the rest of the range is gone
    ],
)
def test_a_bounded_range_whose_events_expired_fails_saying_which(hub, held, first, message):
    append(hub, 0, held)
    fn = reader(str(hub.path), bounded=True, poll=0.01)
    fn._client = _Retention(hub, first)
    with pytest.raises(RuntimeError) as raised:
        drive(
            fn,
            PartitionRange(HUB, "0", 0, 10),
            OffsetRestrictionTracker(OffsetRange(0, 10)),
            _new(),
        )
    assert str(raised.value) == (
        f"partition 0 of hub 'bookingtopic' now starts at sequence number {first}, after 3: "
        f"{message} (retention) before they were read"
    )


def test_a_bounded_read_that_returns_nothing_from_events_still_held_is_retried(hub):
    append(hub, 0, 10)
    fn = reader(str(hub.path), bounded=True, poll=0.01)
    fn._client = _Retention(hub, first=0, blank_reads=1)
    element = PartitionRange(HUB, "0", 0, 10)
    watermark = _new()
    first = drive(fn, element, OffsetRestrictionTracker(OffsetRange(0, 10)), watermark)
    assert first.sequence_numbers == [] and first.deferred == OffsetRange(0, 10)
    second = drive(fn, element, OffsetRestrictionTracker(first.deferred), resumed(watermark))
    assert second.sequence_numbers == list(range(10)) and second.deferred is None
    assert second.marks[-1] == PositionMark(HUB, "0", 9, T0 + 9 * SECOND, True)


def test_a_bounded_read_that_keeps_returning_nothing_fails_after_a_while(hub, monkeypatch):
    monkeypatch.setattr(source, "READ_ANOMALY_TIMEOUT", 0.0)
    append(hub, 0, 10)
    fn = reader(str(hub.path), bounded=True, poll=0.01)
    fn._client = _Retention(hub, first=0, blank_reads=sys.maxsize)
    element = PartitionRange(HUB, "0", 0, 10)
    call = drive(fn, element, OffsetRestrictionTracker(OffsetRange(0, 10)), _new())
    with pytest.raises(RuntimeError, match=r"holds sequence numbers 0\.\.9, but reading from 0"):
        drive(fn, element, OffsetRestrictionTracker(call.deferred), _new())


def test_an_open_read_that_fell_behind_retention_reads_on(hub):
    append(hub, 0, 10)
    fn = reader(str(hub.path))
    fn._client = _Retention(hub, first=6)
    call = drive(fn, OPEN, OffsetRestrictionTracker(OffsetRange(0, sys.maxsize)), _new())
    assert call.sequence_numbers == [0, 1, 2, 6, 7, 8, 9]


# ---- 3. pausing while the warehouse is unavailable -------------------------------------------


@pytest.mark.parametrize("bounded", [False, True], ids=["open", "bounded"])
def test_a_paused_read_reads_nothing_until_resumed(hub, bounded):
    append(hub, 0, 5)
    fn = reader(str(hub.path), bounded=bounded, poll=0.01 if bounded else POLL)
    element = PartitionRange(HUB, "0", 0, 5 if bounded else None)
    if bounded:
        tracker = OffsetRestrictionTracker(OffsetRange(0, 5))
    else:
        tracker, _ = split_open_range(0.5)
    piece = tracker.current_restriction()
    watermark = _new()
    progress.pause_reading("database unavailable")
    paused = drive(fn, element, tracker, watermark)
    assert (paused.sequence_numbers, paused.marks) == ([], [])
    assert paused.deferred == piece  # nothing claimed: all of it is left for later
    assert paused.delay == waits(0.01 if bounded else POLL)
    assert watermark.current_watermark() is None  # held: nothing is known to be read
    progress.resume_reading()
    read = drive(fn, element, OffsetRestrictionTracker(paused.deferred), resumed(watermark))
    assert read.sequence_numbers == [0, 1, 2, 3, 4]


def test_a_bounded_run_waits_while_paused_and_finishes_once_resumed(tmp_path):
    path = tmp_path / "hub.db"
    with LocalHub(path, partitions=2) as hub:
        append(hub, 0, 20)
    progress.pause_reading("database unavailable")
    resume = threading.Timer(1.0, progress.resume_reading)
    started = time.monotonic()
    resume.start()
    try:
        with beam.Pipeline() as pipeline:
            events = pipeline | ReadFromHub(str(path), HUB, bounded=True, poll_interval=0.05)
            assert_that(
                events | beam.Map(lambda e: e.body), equal_to([f"e{n}".encode() for n in range(20)])
            )
    finally:
        resume.cancel()
    assert time.monotonic() - started >= 1.0


class _PausesWhileReading:
    """A hub client during whose first read the warehouse writer pauses reading."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def read(self, hub, partition, from_sequence_number, max_events):
        progress.pause_reading("database unavailable")
        return self._client.read(hub, partition, from_sequence_number, max_events)


def test_a_pause_during_a_long_read_stops_it_after_the_batch_in_hand(hub):
    append(hub, 0, 10)
    fn = reader(str(hub.path), bounded=True, poll=0.01)  # a bounded call reads all it can
    fn._client = _PausesWhileReading(fn._client)
    element = PartitionRange(HUB, "0", 0, 10)
    watermark = _new()
    first = drive(fn, element, OffsetRestrictionTracker(OffsetRange(0, 10)), watermark)
    assert first.sequence_numbers == [0, 1, 2] and first.deferred == OffsetRange(3, 10)
    assert [(m.sequence_number, m.final) for m in first.marks] == [(2, False)]
    paused = drive(fn, element, OffsetRestrictionTracker(first.deferred), resumed(watermark))
    assert paused.sequence_numbers == [] and paused.deferred == OffsetRange(3, 10)
    progress.resume_reading()
    fn._client = fn._client._client
    rest = drive(fn, element, OffsetRestrictionTracker(paused.deferred), resumed(watermark))
    assert rest.sequence_numbers == [3, 4, 5, 6, 7, 8, 9]
    assert rest.marks[-1] == PositionMark(HUB, "0", 9, T0 + 9 * SECOND, True)


# ---- 4. partitions added while a streaming job runs ------------------------------------------


class Listing(NamedTuple):
    """What one call of the partition watcher did."""

    ranges: list[tuple[PartitionRange, int | None]]  # with their timestamps (µs) if set
    deferred: OffsetRange | None
    delay: float | None


def watcher(hub_url: str, start: StartPosition, interval: float = 2.0):
    fn = source._WatchPartitions(hub_url, start, None, interval, idle_allowance=5.0)
    fn.setup()
    _CLIENTS.append(fn._client)
    return fn


def watch(fn, restriction: OffsetRange, watermark: ManualWatermarkEstimator) -> Listing:
    """One call of the partition watcher as a runner makes it."""
    threadsafe = ThreadsafeRestrictionTracker(source._ListingTracker(restriction))
    outputs = list(fn.process(HUB, RestrictionTrackerView(threadsafe), watermark))
    threadsafe.check_done()
    ranges = [
        (out.value, out.timestamp.micros) if isinstance(out, TimestampedValue) else (out, None)
        for out in outputs
    ]
    status = threadsafe.deferred_status()
    deferred, delay = status if status else (None, None)
    return Listing(ranges, deferred, None if delay is None else delay.micros / 1e6)


def key_in_partition(partition: int, partitions: int) -> str:
    return next(f"o{n}" for n in range(1000) if partition_for_key(f"o{n}", partitions) == partition)


def test_a_streaming_read_finds_a_partition_added_while_it_runs(tmp_path):
    """Failure mode 6: partitions were listed once, at job start. Now a streaming job lists them
    every few seconds and reads a new one from its first event (also when it started at the
    latest events: the partition is younger than the job), emitted at the time of the listing
    before, behind which the watcher held the watermark: its events are not late."""
    with LocalHub(tmp_path / "hub.db", partitions=2) as hub:
        hub.append(HUB, [OutgoingEvent(None, b"x", T0)] * 4)  # two in each partition
        fn = watcher(str(hub.path), StartPosition.latest())
        watermark = _new()
        before = time.time_ns() // 1_000
        first = watch(fn, OffsetRange(0, sys.maxsize), watermark)
        assert first.ranges == [
            (PartitionRange(HUB, "0", 2, None), None),  # the latest: after what they hold
            (PartitionRange(HUB, "1", 2, None), None),
        ]
        assert first.deferred == OffsetRange(2, sys.maxsize) and first.delay == waits(2.0)
        held = watermark.current_watermark().micros
        assert before - 5 * SECOND <= held <= time.time_ns() // 1_000 - 5 * SECOND

        same = watch(fn, first.deferred, resumed(watermark))
        assert same == Listing([], first.deferred, waits(2.0))
        listed = watermark.current_watermark().micros  # the listing before the one that finds it
        assert listed >= held

        hub.add_partitions(HUB, 3)
        hub.append(HUB, [OutgoingEvent(key_in_partition(2, 3), b"new")])
        found = watch(fn, same.deferred, resumed(watermark))
        assert found.ranges == [(PartitionRange(HUB, "2", 0, None), listed)]
        assert found.deferred == OffsetRange(3, sys.maxsize)
        assert watermark.current_watermark().micros >= listed

        progress.request_drain()  # a drain ends the watch
        assert watch(fn, found.deferred, resumed(watermark)) == Listing([], None, None)


def test_only_checkpoints_split_the_partition_watcher():
    tracker = source._ListingTracker(OffsetRange(2, sys.maxsize))
    assert tracker.try_split(0.5) is None  # a second watcher would only list the hub again
    assert tracker.try_split(0) == (OffsetRange(2, 2), OffsetRange(2, sys.maxsize))


class _FailingListings:
    """A hub client whose next ``failures`` listings of partitions fail."""

    def __init__(self, client, failures: int):
        self._client = client
        self.failures = failures

    def __getattr__(self, name):
        return getattr(self._client, name)

    def partition_ids(self, hub):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the namespace is unreachable")
        return self._client.partition_ids(hub)


def test_a_failed_listing_keeps_the_watermark_and_tries_again(tmp_path, monkeypatch, caplog):
    """Listing every few seconds must not let a passing failure kill a streaming job: the
    partitions found so far are read on, the watermark waits for a listing that succeeds, and
    only failures for longer than LISTING_FAILURE_TIMEOUT (or at job start) fail it."""
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        assert hub.partition_ids(HUB) == ["0"]
        fn = watcher(str(hub.path), StartPosition.earliest())
        fn._client = _FailingListings(fn._client, failures=1)
        with pytest.raises(ConnectionError):  # at job start: nothing to carry on with
            watch(fn, OffsetRange(0, sys.maxsize), _new())
        watermark = _new()
        first = watch(fn, OffsetRange(0, sys.maxsize), watermark)
        held = watermark.current_watermark()
        hub.add_partitions(HUB, 2)
        fn._client.failures = 2
        for _ in range(2):
            failed = watch(fn, first.deferred, watermark)
            assert failed == Listing([], first.deferred, waits(2.0))
            assert watermark.current_watermark() == held
        assert "listing the partitions of hub 'bookingtopic' failed (ConnectionError" in caplog.text
        found = watch(fn, first.deferred, watermark)
        assert [found for found, _ in found.ranges] == [PartitionRange(HUB, "1", 0, None)]
        assert watermark.current_watermark() > held
        monkeypatch.setattr(source, "LISTING_FAILURE_TIMEOUT", 0.0)
        fn._client.failures = 2
        assert watch(fn, found.deferred, watermark).ranges == []  # the first failure: carry on
        time.sleep(0.01)
        with pytest.raises(ConnectionError):
            watch(fn, found.deferred, watermark)
