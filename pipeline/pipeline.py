"""The pipeline: read both hubs -> parse (good / dead letter) -> join -> write. Nothing else."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from operator import itemgetter

import apache_beam as beam
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from pipeline import metrics, rules
from pipeline.event_time import (
    DEFAULT_LATE_ARRIVAL_TOLERANCE_SECONDS,
    ENQUEUED,
    PAYLOAD,
    POLICIES,
    payload_event_time,
)
from pipeline.interval_join import IntervalJoinBookingsToPayments
from pipeline.io.hubs import checkpoint_scope
from pipeline.io.hubs.checkpoints import open_checkpoint_store
from pipeline.io.hubs.progress import CommitPositions
from pipeline.io.hubs.source import EVENTS, POSITIONS, ReadFromHub
from pipeline.io.warehouses import DEAD_LETTERS, FACTS, WriteToWarehouse
from pipeline.join import DEFAULT_PERIOD_SECONDS, JoinBookingsToPayments, window_size_micros
from pipeline.options import INTERVAL_JOIN, JOIN_MODES, WINDOWED_JOIN, BmsOptions
from pipeline.schema import BOOKING_HUB, PAYMENT_HUB, DeadLetter, HubEvent, event_key


def _payment_rows(body: bytes) -> list[rules.PaymentRow]:
    return [rules.payment_row(body)]


class _ParseFn(beam.DoFn):
    """Turns hub events into keyed rows ``(order_id, (micros, row, key))``; bad ones into dead
    letters. ``key`` is where the row came from: ``schema.event_key`` of its event, plus
    ``:SEAT_INDEX`` for booking rows (``seat_rows``), the parts of the fact rows' identity.

    Rows whose order_id is NULL are dropped here: ASA never joins them (counted, not lost).
    ``payload_time`` (the ``payload`` event-time policy) reads an event's time from its first
    row and re-timestamps its rows with ``event_time.payload_event_time``.
    """

    def __init__(
        self,
        name: str,
        parse: Callable[[bytes], list[tuple]],
        seat_rows: bool,
        payload_time: Callable[[tuple], dt.datetime | None] | None = None,
        tolerance_micros: int = 0,
    ):
        self._name = name
        self._parse = parse
        self._seat_rows = seat_rows
        self._payload_time = payload_time
        self._tolerance_micros = tolerance_micros

    def _dead_letter(self, event: HubEvent, reason: str):
        metrics.DEAD_LETTERS.inc()
        return beam.pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter.of(event, reason))

    def process(self, event: HubEvent, timestamp=beam.DoFn.TimestampParam):
        metrics.PARSED_EVENTS.inc(kind=self._name)
        try:
            rows = self._parse(event.body)
        except rules.MalformedEvent as error:
            yield self._dead_letter(event, str(error))
            return
        except Exception as error:  # a bug must not stop the job: keep the event and the reason
            yield self._dead_letter(event, f"unexpected {type(error).__name__}: {error}")
            return
        if self._payload_time is None or not rows:
            micros, retimestamp = timestamp.micros, False
        else:
            micros = payload_event_time(
                self._payload_time(rows[0]), timestamp.micros, self._tolerance_micros
            )
            if micros is None:
                yield self._dead_letter(
                    event, f"no readable {self._name}_time for --event-time {PAYLOAD}"
                )
                return
            retimestamp = True
        key = event_key(event.partition, event.sequence_number)
        for index, row in enumerate(rows):
            if row[0] is None:
                metrics.ROWS_WITHOUT_ORDER_ID.inc(kind=self._name)
                continue
            # Grouping drops each element's own timestamp, so the join gets it in the value;
            # read from the element (not the body), it follows whatever time the source set.
            value = (row[0], (micros, row, f"{key}:{index}" if self._seat_rows else key))
            yield TimestampedValue(value, Timestamp(micros=micros)) if retimestamp else value


def _single_batch(letter: DeadLetter) -> list[DeadLetter]:
    return [letter]


class ComputeFacts(beam.PTransform):
    """The ASA query: ``(bookings, payments)`` of timestamped HubEvents -> facts and dead letters.

    Returns ``{"facts": PCollection of lists of fact rows (``pipeline.join``), "dead_letters":
    PCollection of DeadLetter}``.

    Args:
      window_period: seconds between the starts of the join's sliding windows (None: the
        global window, for bounded input).
      event_time: ``"enqueued"`` (the events' own timestamps, the ASA job's choice) or
        ``"payload"`` (booking_time / payment_time, see ``pipeline.event_time``; the source's
        watermark must then trail the enqueued times by ``late_arrival_tolerance``).
      late_arrival_tolerance: seconds, for ``event_time="payload"``.
      join: ``"windowed"`` (``pipeline.join``) or ``"interval"`` (``pipeline.interval_join``):
        the same rows, written when a window closes or as soon as a pair is complete.
    """

    def __init__(
        self,
        window_period: float | None = DEFAULT_PERIOD_SECONDS,
        event_time: str = ENQUEUED,
        late_arrival_tolerance: float = DEFAULT_LATE_ARRIVAL_TOLERANCE_SECONDS,
        join: str = WINDOWED_JOIN,
    ):
        super().__init__()
        if event_time not in POLICIES:
            raise ValueError(f"event_time must be one of {', '.join(POLICIES)}, got {event_time!r}")
        if join not in JOIN_MODES:
            raise ValueError(f"join must be one of {', '.join(JOIN_MODES)}, got {join!r}")
        if join == INTERVAL_JOIN:
            self._join = IntervalJoinBookingsToPayments(window_period)
        else:
            self._join = JoinBookingsToPayments(window_period)
        payload = event_time == PAYLOAD
        tolerance = round(late_arrival_tolerance * 1_000_000)
        self._parse_bookings = _ParseFn(
            "booking",
            rules.booking_rows,
            True,
            itemgetter(rules.BOOKING_TIME_INDEX) if payload else None,
            tolerance,
        )
        self._parse_payments = _ParseFn(
            "payment",
            _payment_rows,
            False,
            itemgetter(rules.PAYMENT_TIME_INDEX) if payload else None,
            tolerance,
        )

    def expand(self, events):
        bookings, payments = events
        parsed_bookings = bookings | "ParseBookings" >> beam.ParDo(
            self._parse_bookings
        ).with_outputs(DEAD_LETTERS, main="rows")
        parsed_payments = payments | "ParsePayments" >> beam.ParDo(
            self._parse_payments
        ).with_outputs(DEAD_LETTERS, main="rows")
        facts = (parsed_bookings.rows, parsed_payments.rows) | "Join" >> self._join
        dead_letters = (
            parsed_bookings[DEAD_LETTERS],
            parsed_payments[DEAD_LETTERS],
        ) | "AllDeadLetters" >> beam.Flatten()
        return {"facts": facts, DEAD_LETTERS: dead_letters}


COMMIT_INTERVAL_MICROS = 30_000_000
BOUNDED_COMMIT_INTERVAL_MICROS = 24 * 3600 * 1_000_000


def build(pipeline: beam.Pipeline, options: BmsOptions) -> None:
    """Wires the whole job into ``pipeline``: both hubs -> ComputeFacts -> the warehouse, and
    with ``--checkpoints`` the commits of read positions once their rows are written."""
    checkpoints = options.checkpoints
    reads = [
        pipeline
        | f"Read {hub}"
        >> ReadFromHub(
            options.hub,
            hub,
            bounded=options.bounded,
            start=options.start,
            checkpoints=checkpoints,
            with_positions=True,
            batch_size=options.read_batch_size,
            watermark_delay=options.watermark_delay(),
        )
        for hub in (BOOKING_HUB, PAYMENT_HUB)
    ]
    result = tuple(read[EVENTS] for read in reads) | ComputeFacts(
        options.join_period(),
        options.event_time,
        options.late_arrival_tolerance,
        options.join_mode(),
    )
    unstorable = result["facts"] | "WriteFacts" >> WriteToWarehouse(
        options.warehouse,
        FACTS,
        batch_size=options.write_batch_size,
        retry_deadline=options.write_retry_deadline,
        batch_seconds=options.write_batch_seconds,
        staging=options.staging,
        staging_batch_size=options.staging_batch_rows,
    )
    written = (
        (result[DEAD_LETTERS], unstorable)
        | "AllDeadLetters" >> beam.Flatten()
        | "OneLetterBatches" >> beam.Map(_single_batch)  # few: not worth gathering
    )
    written |= "WriteDeadLetters" >> WriteToWarehouse(
        options.warehouse,
        DEAD_LETTERS,
        batch_size=options.write_batch_size,
        retry_deadline=options.write_retry_deadline,
        batch_seconds=options.write_batch_seconds,
        staging=options.staging,
    )
    if checkpoints is not None:
        open_store = functools.partial(
            open_checkpoint_store, checkpoints, checkpoint_scope(options.hub)
        )
        span = window_size_micros(options.join_period())
        # The dead-letter writer's output follows the fact writer's (unstorable rows go through
        # it), so its watermark passes a time once both tables hold the rows up to it.
        # Each commit is a timer firing, and on the in-process runner each firing is a bundle
        # run after the previous one: a bounded run commits once per day of event time, not
        # once per 30 s (every commit of a bounded run happens at its end anyway).
        interval = BOUNDED_COMMIT_INTERVAL_MICROS if options.bounded else COMMIT_INTERVAL_MICROS
        _ = (*(read[POSITIONS] for read in reads), written) | "CommitPositions" >> CommitPositions(
            open_store, span, interval
        )
