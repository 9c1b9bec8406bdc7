"""Our fix for Beam's in-process runner: metrics of a stage run as thousands of bundles (a timer
that re-arms itself, like the position commits) stay readable."""

from __future__ import annotations

import sys

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from pipeline import runners

FIRINGS = 1500
_TIMER = TimerSpec("again", TimeDomain.WATERMARK)
_AGAIN = beam.DoFn.TimerParam(_TIMER)


class _RearmingTimer(beam.DoFn):
    """Each firing is a bundle of its own on the FnApiRunner, run after the previous one."""

    def setup(self):
        self._fired = Metrics.counter("test", "fired")

    def process(self, element, timer=_AGAIN):
        timer.set(Timestamp(1))

    @on_timer(_TIMER)
    def again(self, fired_at=beam.DoFn.TimestampParam, timer=_AGAIN):
        self._fired.inc()
        if fired_at.micros // 1_000_000 < FIRINGS:
            timer.set(Timestamp(fired_at.micros // 1_000_000 + 1))


def test_metrics_of_thousands_of_bundles_are_readable_and_readable_twice():
    runners.fold_fn_api_metrics_eagerly()
    pipeline = beam.Pipeline(runner="FnApiRunner")
    _ = pipeline | beam.Create([("key", 1)]) | beam.ParDo(_RearmingTimer())
    result = pipeline.run()
    result.wait_until_finish()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # Python's default; Beam 2.77 alone recursed once per bundle
    try:
        for _ in range(2):
            counters = result.metrics().query()["counters"]
            assert [c.committed for c in counters if c.key.metric.name == "fired"] == [FIRINGS]
    finally:
        sys.setrecursionlimit(limit)
