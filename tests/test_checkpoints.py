"""Checkpoint stores and start positions, on the real local hub and real files."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.io.checkpoints import (
    CheckpointScope,
    FileCheckpointStore,
    resume_positions,
)
from pipeline.io.hub import OutgoingEvent
from pipeline.io.localhub import LocalHub
from pipeline.io.positions import StartPosition, first_sequence_number
from pipeline.schema import datetime_to_micros

SCOPE = CheckpointScope("local", "$Default")


def test_file_store_commits_move_forward_only_and_resume_after_the_last(tmp_path):
    store = FileCheckpointStore(tmp_path, SCOPE)
    assert store.last_processed("bookingtopic") == {}
    store.commit("bookingtopic", "0", 10)
    store.commit("bookingtopic", "0", 7)  # a late commit of an older position
    store.commit("bookingtopic", "1", 3)
    store.commit("paymentstopic", "0", 99)
    reopened = FileCheckpointStore(tmp_path, SCOPE)
    assert reopened.last_processed("bookingtopic") == {"0": 10, "1": 3}
    assert resume_positions(reopened, "bookingtopic") == {"0": 11, "1": 4}
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp files left


def test_file_store_scopes_are_separate(tmp_path):
    FileCheckpointStore(tmp_path, SCOPE).commit("bookingtopic", "0", 5)
    other = FileCheckpointStore(tmp_path, CheckpointScope("ns.servicebus.windows.net", "bms/x"))
    assert other.last_processed("bookingtopic") == {}
    other.commit("bookingtopic", "0", 1)
    assert FileCheckpointStore(tmp_path, SCOPE).last_processed("bookingtopic") == {"0": 5}


def test_a_failed_commit_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = FileCheckpointStore(tmp_path, SCOPE)
    store.commit("bookingtopic", "0", 5)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.io.checkpoints.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.commit("bookingtopic", "0", 9)
    monkeypatch.undo()
    assert store.last_processed("bookingtopic") == {"0": 5}
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_start_positions_parse():
    assert StartPosition.parse("earliest") == StartPosition.earliest()
    assert StartPosition.parse("latest") == StartPosition.latest()
    assert StartPosition.parse("2026-02-08T10:00:00Z") == StartPosition.at_time(
        datetime_to_micros(dt.datetime(2026, 2, 8, 10))
    )
    assert StartPosition.parse("1:7, 0:3") == StartPosition.at_sequence_numbers({"0": 3, "1": 7})
    with pytest.raises(ValueError, match="not a start position"):
        StartPosition.parse("yesterday")


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub.db", partitions=1) as hub:
        yield hub


BASE = datetime_to_micros(dt.datetime(2026, 2, 8, 10))


def test_first_sequence_number_for_each_kind_of_start(hub):
    hub.append("bookingtopic", [OutgoingEvent(None, b"x", BASE + n * 1_000_000) for n in range(10)])
    at = first_sequence_number
    assert at(hub, "bookingtopic", "0", StartPosition.earliest()) == 0
    assert at(hub, "bookingtopic", "0", StartPosition.latest()) == 10
    assert at(hub, "bookingtopic", "0", StartPosition.at_time(BASE + 3_500_000)) == 4
    assert at(hub, "bookingtopic", "0", StartPosition.at_time(BASE - 1)) == 0
    assert at(hub, "bookingtopic", "0", StartPosition.at_time(BASE + 10**9)) == 10
    assert at(hub, "bookingtopic", "0", StartPosition.at_sequence_numbers({"0": 6})) == 6
    assert at(hub, "bookingtopic", "0", StartPosition.latest(), resume_at=3) == 3


@given(
    gaps=st.lists(st.integers(min_value=0, max_value=3), min_size=0, max_size=40),
    target=st.integers(min_value=-2, max_value=130),
)
def test_enqueued_time_start_is_the_first_event_at_or_after_it(tmp_path_factory, gaps, target):
    with LocalHub(tmp_path_factory.mktemp("hub") / "hub.db", partitions=1) as hub:
        times = [sum(gaps[: i + 1]) for i in range(len(gaps))]  # never decreasing, with ties
        hub.append("bookingtopic", [OutgoingEvent(None, b"x", BASE + t) for t in times])
        found = first_sequence_number(
            hub, "bookingtopic", "0", StartPosition.at_time(BASE + target)
        )
        assert found == next((i for i, t in enumerate(times) if t >= target), len(times))
