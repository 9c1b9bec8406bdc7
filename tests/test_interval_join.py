"""The interval join on a streaming runner, with the watermark and processing time under control.

Both join modes run on the same ``TestStream`` scenarios: rows behind the watermark (late ones,
and ones whose window is still open) must give the same pairs in both; the interval join must
emit each pair before the watermark closes its window, and forget rows once it has. TestStream
runs on the BundleBasedDirectRunner only (see ``tests/test_join.py``).
"""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import FixedWindows, TimestampedValue

from pipeline import interval_join
from pipeline.interval_join import IntervalJoinBookingsToPayments
from pipeline.join import JoinBookingsToPayments
from tests import test_join
from tests.conftest import unbatched
from tests.test_join import (
    PAYMENT_ID,
    SEAT,
    SECOND,
    T0,
    join,  # noqa: F401 (the fixture: each join mode)
    keyed,
    run_streaming,
    streamed,
    streaming_pipeline,
)


def test_rows_behind_the_watermark_pair_while_their_window_is_open_in_both_modes(join):  # noqa: F811
    # Period 30 s: a booking at T0 + 10 s is in the window [T0, T0 + 150 s), which closes when
    # the watermark reaches T0 + 150 s; one at T0 + 45 s in [T0 + 30 s, T0 + 180 s).
    arrivals = [
        keyed("b", "o1", T0 + 10 * SECOND, seat="A1"),
        keyed("p", "o1", T0 + 20 * SECOND, payment_id="on-time"),
        ("watermark", T0 + 155 * SECOND),  # [T0, T0 + 150 s) has closed
        # late: its window has closed, so it pairs with nothing
        keyed("b", "o1", T0 + 15 * SECOND, seat="A2"),
        # behind the watermark, late for A1's and A2's window, on time for A3's (open to 180 s)
        keyed("p", "o1", T0 + 100 * SECOND, payment_id="behind"),
        keyed("b", "o1", T0 + 45 * SECOND, seat="A3"),  # behind the watermark, window open
        ("watermark", T0 + 185 * SECOND),  # A3's window has closed too
        keyed("p", "o1", T0 + 150 * SECOND, payment_id="too-late"),  # for A3's window
    ]
    run_streaming(join, arrivals, [("on-time", "A1"), ("behind", "A3")])


def test_a_late_payment_pairs_with_nothing_and_its_order_goes_on_in_both_modes(join):  # noqa: F811
    arrivals = [
        keyed("b", "o1", T0, seat="A1"),
        keyed("b", "o2", T0 + 5 * SECOND, seat="B1"),
        ("watermark", T0 + 160 * SECOND),
        keyed("p", "o1", T0 + 100 * SECOND, payment_id="late"),  # A1's window closed at 150 s
        keyed("p", "o2", T0 + 100 * SECOND, payment_id="late-too"),
        keyed("b", "o1", T0 + 170 * SECOND, seat="A2"),  # a new booking of the same order
        keyed("p", "o1", T0 + 200 * SECOND, payment_id="new"),
    ]
    run_streaming(join, arrivals, [("new", "A2")])


def early_and_late_stream() -> TestStream:
    """A booking and its payment, then the watermark held below their window's close while
    processing time moves on, then past it."""
    stream = TestStream(output_tags={"b", "p"})
    for tag in ("b", "p"):
        stream.advance_watermark_to(T0 / SECOND, tag=tag)
    _, micros, value = keyed("b", "o1", T0 + 10 * SECOND)
    stream.add_elements([TimestampedValue(value, micros / SECOND)], tag="b")
    _, micros, value = keyed("p", "o1", T0 + 20 * SECOND, payment_id="p1")
    stream.add_elements([TimestampedValue(value, micros / SECOND)], tag="p")
    for tag in ("b", "p"):
        stream.advance_watermark_to(T0 / SECOND + 30, tag=tag)
    stream.advance_processing_time(60)
    for tag in ("b", "p"):  # past the close of the booking's window, [T0, T0 + 150 s)
        stream.advance_watermark_to(T0 / SECOND + 200, tag=tag)
    stream.advance_processing_time(60)
    for tag in ("b", "p"):
        stream.advance_watermark_to_infinity(tag=tag)
    return stream


@pytest.mark.parametrize(
    ("transform", "expected"),
    [(IntervalJoinBookingsToPayments, [("p1", "A1")]), (JoinBookingsToPayments, [])],
    ids=["interval", "windowed"],
)
def test_the_interval_join_emits_a_pair_before_the_watermark_closes_its_window(transform, expected):
    # A downstream window [T0, T0 + 60 s) with no allowed lateness drops what reaches it after
    # the watermark passed T0 + 60 s: it keeps the pair only if the join emitted it while the
    # watermark was held at T0 + 30 s, long before the join's own window [T0, T0 + 150 s)
    # closed. The windowed join emits it at T0 + 150 s, too late for it: that shows the probe
    # tells the two apart.
    with streaming_pipeline() as p:
        streams = p | early_and_late_stream()
        facts = (streams["b"], streams["p"]) | transform() | unbatched()
        early = (
            facts
            | beam.WindowInto(FixedWindows(60), allowed_lateness=0)
            | beam.Map(lambda row: (row[PAYMENT_ID], row[SEAT]))
            | beam.Map(lambda pair: (pair, None))
            | beam.GroupByKey()
            | beam.Keys()
        )
        assert_that(early, equal_to(expected))


class _RowsHeldWhenSeen(beam.DoFn):
    """Each fact row with the rows the interval joins hold in this process when it is seen."""

    def process(self, row):
        yield row[PAYMENT_ID], interval_join.rows_held()


def test_rows_are_forgotten_once_the_watermark_closes_their_windows():
    arrivals = [
        keyed("b", "o1", T0 + 10 * SECOND),
        keyed("p", "o1", T0 + 20 * SECOND, payment_id="first"),
        ("watermark", T0 + 200 * SECOND),  # the windows of both close by T0 + 150 s
        keyed("b", "o2", T0 + 190 * SECOND),
        keyed("p", "o2", T0 + 195 * SECOND, payment_id="second"),
    ]
    with streaming_pipeline() as p:
        streams = p | streamed(arrivals)
        facts = (streams["b"], streams["p"]) | IntervalJoinBookingsToPayments() | unbatched()
        assert_that(
            facts | beam.ParDo(_RowsHeldWhenSeen()), equal_to([("first", 2), ("second", 2)])
        )
    assert interval_join.rows_held() == 0  # the input ended: every window closed


class _Forgetful(dict):
    """An index cache that keeps nothing (``interval_join._LIVE``)."""

    def __setitem__(self, key, value):
        pass


@pytest.mark.parametrize(
    "scenario",
    [
        test_rows_behind_the_watermark_pair_while_their_window_is_open_in_both_modes,
        test_a_late_payment_pairs_with_nothing_and_its_order_goes_on_in_both_modes,
        test_join.test_each_pair_is_emitted_once_as_windows_close_one_after_another,
        test_join.test_out_of_order_arrivals_across_partitions_still_join_once,
        test_join.test_two_payments_for_one_order_give_two_rows_per_seat,
    ],
)
def test_shards_rebuilt_from_beam_state_in_every_bundle_give_the_same_rows(scenario, monkeypatch):
    # What a retried bundle, a restarted worker or a shard moved to another worker does: the
    # index is rebuilt from the bag and the bookkeeping in Beam state.
    monkeypatch.setattr(interval_join, "_LIVE", _Forgetful())
    scenario(IntervalJoinBookingsToPayments)
