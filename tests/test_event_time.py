"""The payload event-time policy: TIMESTAMP BY with ASA's "adjust" late-arrival policy."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.event_time import payload_event_time
from pipeline.pipeline import ComputeFacts
from pipeline.schema import datetime_to_micros, micros_to_datetime

SECOND = 1_000_000
ENQUEUED = datetime_to_micros(dt.datetime(2026, 2, 8, 10, 0))

times = st.integers(-3600 * SECOND, 3600 * SECOND).map(lambda d: micros_to_datetime(ENQUEUED + d))


@given(times, st.integers(0, 600 * SECOND))
def test_payload_times_are_kept_within_the_tolerance_before_the_enqueued_time(payload, tolerance):
    micros = payload_event_time(payload, ENQUEUED, tolerance)
    assert ENQUEUED - tolerance <= micros <= ENQUEUED  # never late for a watermark this far back
    if ENQUEUED - tolerance <= datetime_to_micros(payload) <= ENQUEUED:
        assert micros == datetime_to_micros(payload)  # in the tolerance: the payload's own time


def test_examples_and_an_unreadable_time():
    five = 5 * SECOND
    assert payload_event_time(micros_to_datetime(ENQUEUED - SECOND), ENQUEUED, five) == (
        ENQUEUED - SECOND
    )
    assert payload_event_time(micros_to_datetime(ENQUEUED - 60 * SECOND), ENQUEUED, five) == (
        ENQUEUED - five
    )  # adjusted, as ASA does, not dropped
    assert payload_event_time(micros_to_datetime(ENQUEUED + SECOND), ENQUEUED, five) == ENQUEUED
    assert payload_event_time(None, ENQUEUED, five) is None


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="event_time must be one of enqueued, payload"):
        ComputeFacts(event_time="arrival")
