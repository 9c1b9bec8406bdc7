"""The pipeline: read both hubs -> parse (good / dead letter) -> join -> write. Nothing else."""

from __future__ import annotations

import functools
from collections.abc import Callable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline import rules
from pipeline.io.checkpoints import open_checkpoint_store
from pipeline.io.hub import checkpoint_scope
from pipeline.io.progress import CommitPositions
from pipeline.io.source import EVENTS, POSITIONS, ReadFromHub
from pipeline.io.warehouse import WriteToWarehouse
from pipeline.join import DEFAULT_PERIOD_SECONDS, JoinBookingsToPayments, window_size_micros
from pipeline.options import BmsOptions
from pipeline.schema import BOOKING_HUB, PAYMENT_HUB, DeadLetter, HubEvent

DEAD_LETTERS = "dead_letters"


def _payment_rows(body: bytes) -> list[rules.PaymentRow]:
    return [rules.payment_row(body)]


class _ParseFn(beam.DoFn):
    """Turns hub events into keyed rows ``(order_id, (micros, row))``; bad ones into dead letters.

    Rows whose order_id is NULL are dropped here: ASA never joins them (counted, not lost).
    """

    def __init__(self, name: str, parse: Callable[[bytes], list[tuple]]):
        self._name = name
        self._parse = parse

    def setup(self):
        self._events = Metrics.counter("bms", f"{self._name}_events")
        self._dead = Metrics.counter("bms", "dead_letters")
        self._no_order_id = Metrics.counter("bms", f"{self._name}_rows_without_order_id")

    def process(self, event: HubEvent, timestamp=beam.DoFn.TimestampParam):
        self._events.inc()
        try:
            rows = self._parse(event.body)
        except rules.MalformedEvent as error:
            self._dead.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter.of(event, str(error)))
            return
        except Exception as error:  # a bug must not stop the job: keep the event and the reason
            self._dead.inc()
            reason = f"unexpected {type(error).__name__}: {error}"
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter.of(event, reason))
            return
        micros = timestamp.micros
        for row in rows:
            if row[0] is None:
                self._no_order_id.inc()
            else:
                # Grouping drops each element's own timestamp, so the join gets it in the value;
                # read from the element (not the body), it follows whatever time the source set.
                yield row[0], (micros, row)


class ComputeFacts(beam.PTransform):
    """The ASA query: ``(bookings, payments)`` of timestamped HubEvents -> facts and dead letters.

    Returns ``{"facts": PCollection of 20-tuples, "dead_letters": PCollection of DeadLetter}``.
    """

    def __init__(self, window_period: float = DEFAULT_PERIOD_SECONDS):
        super().__init__()
        self._join = JoinBookingsToPayments(window_period)

    def expand(self, events):
        bookings, payments = events
        parsed_bookings = bookings | "ParseBookings" >> beam.ParDo(
            _ParseFn("booking", rules.booking_rows)
        ).with_outputs(DEAD_LETTERS, main="rows")
        parsed_payments = payments | "ParsePayments" >> beam.ParDo(
            _ParseFn("payment", _payment_rows)
        ).with_outputs(DEAD_LETTERS, main="rows")
        facts = (parsed_bookings.rows, parsed_payments.rows) | "Join" >> self._join
        dead_letters = (
            parsed_bookings[DEAD_LETTERS],
            parsed_payments[DEAD_LETTERS],
        ) | "AllDeadLetters" >> beam.Flatten()
        return {"facts": facts, DEAD_LETTERS: dead_letters}


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
        )
        for hub in (BOOKING_HUB, PAYMENT_HUB)
    ]
    result = tuple(read[EVENTS] for read in reads) | ComputeFacts(options.join_period())
    idempotent = checkpoints is not None
    written = [
        result[target]
        | f"Write{label}"
        >> WriteToWarehouse(
            options.warehouse,
            target,
            batch_size=options.write_batch_size,
            idempotent=idempotent,
        )
        for target, label in (("facts", "Facts"), (DEAD_LETTERS, "DeadLetters"))
    ]
    if checkpoints is not None:
        open_store = functools.partial(
            open_checkpoint_store, checkpoints, checkpoint_scope(options.hub)
        )
        span = window_size_micros(options.join_period())
        _ = (*(read[POSITIONS] for read in reads), *written) | "CommitPositions" >> CommitPositions(
            open_store, span
        )
