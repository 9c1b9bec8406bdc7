"""Committing read positions only once their rows are written, resuming from them, draining.

``committable`` is checked by properties; ``CommitPositions`` on a TestStream (the
BundleBasedDirectRunner, the one that runs TestStream) against the event-time watermark and a
real checkpoint folder, and at the end of a bounded run (the watermark jumps to the end of time)
there and on the in-process runner; resuming end to end through ``bms run --bounded
--checkpoints`` twice over a growing hub, compared with the ASA query over everything. Draining a
streaming job on Prism is in ``test_streaming.py``; reading pieces of the source call by call in
``test_source.py``.
"""

from __future__ import annotations

import json
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import TestWindowedValue, assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow, TimestampedValue
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.io.hubs import checkpoint_scope, read_all
from pipeline.io.hubs.checkpoints import CheckpointScope, FileCheckpointStore
from pipeline.io.hubs.local import LocalHub
from pipeline.io.hubs.progress import CommitPositions, PositionMark, committable
from pipeline.io.warehouses import read_facts
from pipeline.parity.evaluator import evaluate
from tests.conftest import produce_into

SECOND = 1_000_000
T0 = 1_770_000_000 * SECOND  # a whole multiple of the 30 s commit interval

marks_strategy = st.lists(
    st.builds(
        PositionMark,
        hub=st.sampled_from(["bookingtopic", "paymentstopic"]),
        partition=st.sampled_from(["0", "1"]),
        sequence_number=st.integers(-1, 50),
        event_time=st.integers(0, 1_000),
        final=st.booleans(),
    ),
    max_size=30,
)


@given(marks_strategy, st.integers(0, 1_200), st.integers(0, 300), st.integers(0, 300))
def test_commits_stay_behind_the_watermark_by_the_span_and_every_stop_by_the_bound(
    marks, watermark, span, bound
):
    commits, kept = committable(marks, watermark, span, bound)
    frontier = max((m.event_time for m in marks), default=watermark)
    finals = [m.event_time for m in marks if m.final]

    def due(mark):  # its windows are written, and nothing read later can pair with it
        return (
            mark.event_time + span <= watermark
            and mark.event_time + bound <= frontier
            and all(mark.event_time + bound <= final for final in finals)
        )

    for mark in marks:
        key = (mark.hub, mark.partition)
        if mark.final or not due(mark):
            assert mark in kept  # nothing pending is forgotten
        elif mark.sequence_number >= 0:  # everything else is committed
            assert commits[key] >= mark.sequence_number
            assert mark not in kept
    for key, sequence_number in commits.items():
        # The commit is a mark that was due, never a position beyond what was due.
        assert any(
            (m.hub, m.partition) == key
            and m.sequence_number == sequence_number
            and not m.final
            and due(m)
            for m in marks
        )
    assert {m for m in marks if m.final} <= set(kept)


def test_a_watermark_at_the_end_of_time_commits_only_a_bound_behind_the_latest_mark():
    # Dataflow's drain stops partitions without final marks and jumps the watermark to the end.
    marks = [PositionMark("bookingtopic", "0", n, n * 10, False) for n in range(30)]
    commits, kept = committable(marks, watermark=10**18, span=150, bound=120)
    assert commits == {("bookingtopic", "0"): 17}  # 170 s + 120 s <= 290 s, the latest mark
    assert [m.sequence_number for m in kept] == list(range(18, 30))


def test_the_bound_defaults_to_the_join_window():
    marks = [PositionMark("bookingtopic", "0", n, n * 10 * SECOND, False) for n in range(30)]
    commits, _ = committable(marks, watermark=10**18, span=720 * SECOND)
    assert commits == {("bookingtopic", "0"): 17}  # 290 s - 120 s


def _mark(partition, sequence_number, seconds, final=False, hub="bookingtopic", offset=None):
    mark = PositionMark(hub, partition, sequence_number, T0 + seconds * SECOND, final, offset)
    return TimestampedValue(mark, mark.event_time / SECOND)


class _FolderStore:
    """Picklable opener of a real checkpoint folder, as the pipeline passes one."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __call__(self):
        return FileCheckpointStore(self.folder, CheckpointScope("test", "$Default"))


def test_positions_are_committed_once_the_watermark_passes_them_by_the_span(tmp_path):
    span = 150 * SECOND
    stream = (
        TestStream()
        .advance_watermark_to(T0 / SECOND)
        .add_elements([_mark("0", 10, 1), _mark("1", 5, 10, hub="paymentstopic")])
        .add_elements([_mark("0", 20, 40), _mark("0", 30, 60)])
        .advance_watermark_to((T0 + 60 * SECOND) / SECOND)
        # The payment partition is caught up and idle: its time moves on, its position not.
        .add_elements([_mark("1", 5, 150, hub="paymentstopic")])
        .advance_watermark_to((T0 + 100 * SECOND) / SECOND)  # 1 s + 150 s not reached: nothing
        # The payment partition stops at 170 s (a drain): nothing after 170 s - 120 s commits.
        .add_elements([_mark("1", 5, 170, final=True, hub="paymentstopic")])
        .advance_watermark_to((T0 + 185 * SECOND) / SECOND)  # the timer at 180 s fires
        .advance_watermark_to((T0 + 300 * SECOND) / SECOND)  # as after a drain: far past all
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions(streaming=True)
    with TestPipeline(runner="BundleBasedDirectRunner", options=options) as pipeline:
        commits = (pipeline | stream,) | CommitPositions(_FolderStore(tmp_path), span)
        assert_that(
            commits,
            equal_to(
                [
                    TestWindowedValue(
                        ("bookingtopic", "0", 10), (T0 + 180 * SECOND) / SECOND, [GW]
                    ),
                    TestWindowedValue(
                        ("paymentstopic", "1", 5), (T0 + 180 * SECOND) / SECOND, [GW]
                    ),
                    TestWindowedValue(
                        ("bookingtopic", "0", 20), (T0 + 210 * SECOND) / SECOND, [GW]
                    ),
                ]
            ),
            reify_windows=True,
        )
    store = _FolderStore(tmp_path)()
    assert store.last_processed("bookingtopic") == {"0": 20}  # not 30: 60 s + 120 s > 170 s
    assert store.last_processed("paymentstopic") == {"1": 5}


def test_commits_name_the_offset_of_the_committed_event(tmp_path):
    """The event's own mark knows its offset; a later mark of the same position from a caught-up
    piece (which did not read the event) does not, and the commit takes it from the former."""
    stream = (
        TestStream()
        .advance_watermark_to(T0 / SECOND)
        .add_elements([_mark("0", 10, 1, offset="5120"), _mark("0", 10, 30)])
        .add_elements([_mark("1", 3, 2, offset="1536"), _mark("1", 4, 3, offset="2048")])
        .add_elements([_mark("0", 40, 200, offset="9216")])
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions(streaming=True)
    with TestPipeline(runner="BundleBasedDirectRunner", options=options) as pipeline:
        _ = (pipeline | stream,) | CommitPositions(_FolderStore(tmp_path), 150 * SECOND)
    records = {path.stem: json.loads(path.read_text()) for path in tmp_path.rglob("*.json")}
    assert {p: (r["sequence_number"], r["offset"]) for p, r in records.items()} == {
        "0": (10, "5120"),
        "1": (4, "2048"),
    }


def _bounded_run_marks():
    """The marks of a bounded run over 330 s of events: one per 10 s in four partitions, and
    each partition's final mark where its events end, at 330 s."""
    marks = []
    for hub in ("bookingtopic", "paymentstopic"):
        for partition in ("0", "1"):
            marks += [_mark(partition, n, n * 10, hub=hub) for n in range(34)]
            marks.append(_mark(partition, 33, 330, final=True, hub=hub))
    return marks


@pytest.mark.parametrize("seconds", [150, 720])  # the spans of streaming and of bounded runs
def test_a_bounded_run_commits_up_to_the_join_bound_before_its_end_whatever_the_span(
    tmp_path, seconds
):
    stream = (
        TestStream()
        .advance_watermark_to(T0 / SECOND)
        .add_elements(_bounded_run_marks())
        .advance_watermark_to_infinity()  # the end of a bounded run
    )
    options = PipelineOptions(streaming=True)
    with TestPipeline(runner="BundleBasedDirectRunner", options=options) as pipeline:
        _ = (pipeline | stream,) | CommitPositions(_FolderStore(tmp_path), seconds * SECOND)
    store = _FolderStore(tmp_path)()
    for hub in ("bookingtopic", "paymentstopic"):
        assert store.last_processed(hub) == {"0": 21, "1": 21}  # 210 s = 330 s - 120 s


def test_a_bounded_run_on_the_in_process_runner_commits_up_to_the_join_bound(tmp_path):
    """The batch runner: the watermark goes from the start of time to its end at once."""
    with TestPipeline() as pipeline:
        marks = pipeline | beam.Create(_bounded_run_marks())
        _ = (marks,) | CommitPositions(_FolderStore(tmp_path), 720 * SECOND)
    store = _FolderStore(tmp_path)()
    assert store.last_processed("bookingtopic") == {"0": 21, "1": 21}


GW = GlobalWindow()


def test_a_rerun_resumes_from_its_checkpoints_and_writes_no_row_twice(tmp_path):
    hub, folder = tmp_path / "hub.db", tmp_path / "checkpoints"
    warehouse = f"sqlite:///{tmp_path / 'warehouse.db'}"
    run = ["run", "--bounded", "--hub", str(hub), "--warehouse", warehouse]
    produce_into(hub, "--count", "1500", "--seed", "5", "--simulate", "2026-02-08T10:00:00Z")
    assert main([*run, "--checkpoints", str(folder)]) == 0

    store = FileCheckpointStore(folder, checkpoint_scope(str(hub)))
    with LocalHub(hub) as client:
        for name in ("bookingtopic", "paymentstopic"):
            committed = store.last_processed(name)
            last = {
                p: client.partition_properties(name, p).last_sequence_number
                for p in client.partition_ids(name)
            }
            assert committed.keys() == last.keys()
            # Behind the end by the join window: those events may still meet later ones.
            assert all(0 <= committed[p] < last[p] for p in last), (committed, last)
        first_run = read_all(client)
    first_rows = Counter(read_facts(warehouse))
    assert first_rows == Counter(evaluate(first_run).rows)

    # More events, starting where the first ones end (payments may meet earlier bookings).
    produce_into(hub, "--count", "1500", "--seed", "6", "--simulate", "2026-02-08T10:50:00Z")
    assert main([*run, "--checkpoints", str(folder)]) == 0
    with LocalHub(hub) as client:
        expected = Counter(evaluate(read_all(client)).rows)
    actual = Counter(read_facts(warehouse))
    assert max(actual.values()) == 1, "a row was written twice"
    assert actual == expected
    assert sum(expected.values()) > sum(first_rows.values())
