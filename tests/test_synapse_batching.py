"""Batches across bundles (the sink's ``batch_seconds``, which ``--staging`` uses): rows kept in
Beam state are written when a batch is full, when its time is up, or when the input ends, and
meanwhile they hold the output watermark, so checkpoints are committed only once their rows are
written. On the in-process runner (batches by size) and, streaming, on Prism (by time), where
the watermark hold is what ``CommitPositions`` relies on."""

from __future__ import annotations

import datetime as dt
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.transforms.window import TimestampedValue

from pipeline import runners
from pipeline.io.hubs.progress import CommitPositions, PositionMark
from pipeline.io.warehouses.sink import WriteRows, bucket_of
from pipeline.schema import fact_row_key
from tests.conftest import missing, one_row_batches

#: What the recording writer and checkpoint store saw, in order: ("write", keys) and
#: ("commit", sequence number). Module-level: the runners' workers are threads of this process.
EVENTS: list[tuple] = []
_LOCK = threading.Lock()


class RecordingWriter:
    """A ``base.WarehouseWriter`` that writes nothing and remembers each batch."""

    description = "recording writer"
    nul_allowed = True

    def prepare(self) -> None:
        pass

    def write_batch(self, rows) -> int:
        with _LOCK:
            EVENTS.append(("write", [row[-1] for row in rows]))
        return len(rows)

    def is_transient(self, error: BaseException) -> bool:
        return False

    def is_data_error(self, error: BaseException) -> bool:
        return False

    def close(self) -> None:
        pass


class RecordingStore:
    """A checkpoint store that remembers each commit."""

    def commit(self, hub, partition, sequence_number, offset=None) -> None:
        with _LOCK:
            EVENTS.append(("commit", sequence_number))

    def close(self) -> None:
        pass


def row(n: int) -> tuple:
    booked = dt.datetime(2026, 2, 8, 10, 0, 0)
    return (
        f"o{n}", booked, "c1", "Ana", None, "e1", "Gig", "Hall", "A1", 1.0, "Music", "Sunday",
        10, f"p{n}", booked, 1.0, "Card", "Card", booked, booked,
        fact_row_key(f"0:{n}:0", f"1:{n}"),
    )  # fmt: skip


def test_rows_from_many_bundles_are_written_in_batches_of_the_size_asked():
    EVENTS.clear()
    pipeline = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions())
    _ = (
        pipeline
        | beam.Create([row(n) for n in range(25)])
        | one_row_batches()
        | WriteRows(RecordingWriter, "facts", batch_size=10, batch_seconds=60, writers=1)
    )
    pipeline.run().wait_until_finish()
    sizes = [len(keys) for kind, keys in EVENTS if kind == "write"]
    assert sorted(sizes) == [5, 10, 10]
    assert sorted(key for _, keys in EVENTS for key in keys) == sorted(
        row(n)[-1] for n in range(25)
    )


def test_a_row_key_always_meets_the_same_bucket():
    keys = [row(n)[-1] for n in range(1000)]
    assert [bucket_of(key, 4) for key in keys] == [bucket_of(key, 4) for key in keys]
    assert {bucket_of(key, 4) for key in keys} == {0, 1, 2, 3}
    assert {bucket_of(key, 1) for key in keys} == {0}
    with pytest.raises(ValueError, match="writers"):
        WriteRows(RecordingWriter, "facts", batch_size=10, batch_seconds=1, writers=0)
    with pytest.raises(ValueError, match="batch_seconds"):
        WriteRows(RecordingWriter, "facts", batch_size=10, batch_seconds=-1)


def _row_and_mark(fired) -> list:
    """One row and the position mark of the event it came from, both at the impulse's time."""
    n = round(float(fired) * 10)
    mark = PositionMark("bookingtopic", "0", n, round(float(fired) * 1e6), False, None)
    return [TimestampedValue(row(n), float(fired)), TimestampedValue(mark, float(fired))]


@pytest.mark.slow
def test_streaming_batches_are_written_on_time_and_hold_checkpoints_until_written():
    """On Prism, streaming: rows every 0.5 s, batches of up to 1,000 rows or 2 s. Batches are
    written while the stream runs (the processing-time timer), and no position is committed
    before the rows up to it are written (the timer's watermark hold): without the hold, each
    commit would come 1 s after its mark, before its row's batch is due."""
    try:
        prism = runners.prism_binary()
    except runners.RunnerNotInstalled as error:
        missing(str(error))
    EVENTS.clear()
    start = time.time() + 2
    options = PipelineOptions(
        streaming=True,
        runner="pipeline.prism.PrismRunner",
        prism_location=prism,
        environment_type="LOOPBACK",
    )
    with beam.Pipeline(options=options) as pipeline:
        rows, marks = (
            pipeline
            | PeriodicImpulse(start_timestamp=start, stop_timestamp=start + 10, fire_interval=0.5)
            | beam.FlatMap(_row_and_mark)
            | beam.Partition(lambda element, _: int(isinstance(element, PositionMark)), 2)
        )
        written = (
            rows
            | one_row_batches()
            | WriteRows(RecordingWriter, "facts", batch_size=1000, batch_seconds=2)
        )
        second = 1_000_000
        _ = (marks, written) | CommitPositions(RecordingStore, second, second, bound=0)
    writes = [keys for kind, keys in EVENTS if kind == "write"]
    assert len(writes) >= 3  # on time while streaming, not all at the end
    sequences = {_sequence(key) for keys in writes for key in keys}
    assert len(sequences) == sum(len(keys) for keys in writes) == 20  # each row once
    written: set[int] = set()
    commits = []
    for kind, value in EVENTS:
        if kind == "write":
            written.update(_sequence(key) for key in value)
        else:
            # the mark of sequence n came with the row of n: every row up to it is written
            assert {m for m in sequences if m <= value} <= written, f"commit {value} too early"
            commits.append(value)
    assert len(commits) >= 3 and commits == sorted(commits)


def _sequence(key: str) -> int:
    return int(key.split(":")[1])
