"""The shapes that cross module boundaries: hub events, the 20 fact columns, dead letters.

The fact columns follow the seed's Synapse DDL for ``bookymyshow.bookings_fact`` column for
column, in order; every writer and the parity checker rely on that order.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

import orjson

BOOKING_HUB = "bookingtopic"
PAYMENT_HUB = "paymentstopic"
HUBS = (BOOKING_HUB, PAYMENT_HUB)

FACT_SCHEMA = "bookymyshow"
FACT_TABLE = "bookings_fact"
DEAD_LETTER_TABLE = "dead_letters"


class Column(NamedTuple):
    name: str
    sql_type: str  # as written in the Synapse DDL


FACT_COLUMNS: tuple[Column, ...] = (
    Column("order_id", "NVARCHAR(50)"),
    Column("booking_time", "DATETIME2"),
    Column("customer_id", "NVARCHAR(50)"),
    Column("customer_name", "NVARCHAR(100)"),
    Column("customer_email", "NVARCHAR(100)"),
    Column("event_id", "NVARCHAR(50)"),
    Column("event_name", "NVARCHAR(100)"),
    Column("event_location", "NVARCHAR(200)"),
    Column("seat_number", "NVARCHAR(10)"),
    Column("seat_price", "FLOAT"),
    Column("event_category", "NVARCHAR(50)"),
    Column("booking_day_of_week", "NVARCHAR(20)"),
    Column("booking_hour", "INT"),
    Column("payment_id", "NVARCHAR(50)"),
    Column("payment_time", "DATETIME2"),
    Column("amount", "FLOAT"),
    Column("payment_method", "NVARCHAR(50)"),
    Column("payment_type", "NVARCHAR(50)"),
    Column("booking_event_time", "DATETIME2"),
    Column("payment_event_time", "DATETIME2"),
)
FACT_COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in FACT_COLUMNS)

#: The row identity column, after the original 20 in every target table: where a row's inputs
#: came from in the hubs (see ``fact_row_key``), never business fields, which repeat in ASA's
#: output. Every target holds each key at most once, so replays, retries and restarts never
#: double a row.
ROW_KEY = Column("row_key", "NVARCHAR(100)")
FACT_TABLE_COLUMNS: tuple[Column, ...] = (*FACT_COLUMNS, ROW_KEY)
DEAD_LETTER_COLUMNS: tuple[Column, ...] = (
    Column("hub", "NVARCHAR(50)"),
    Column("partition", "NVARCHAR(10)"),
    Column("sequence_number", "BIGINT"),
    Column("enqueued_time", "DATETIME2"),
    Column("body", "VARBINARY(MAX)"),
    Column("reason", "NVARCHAR(4000)"),
    ROW_KEY,
)
#: Columns that may hold NULL; every other column is NOT NULL.
NULLABLE_FACT_COLUMNS = frozenset(FACT_COLUMN_NAMES) - {"order_id"}
MAX_REASON_LENGTH = 4000

# A fact row is a plain tuple of 21 values in FACT_TABLE_COLUMNS order: the 20 fact columns
# (str | float | int | None, naive UTC datetime for DATETIME2) and the row key. Tuples keep the
# hot path cheap to encode.
FactRow = tuple


class HubEvent(NamedTuple):
    """One event as an event hub stores it, whatever the hub (Azure Event Hubs or the local hub)."""

    hub: str
    partition: str
    sequence_number: int
    enqueued_time: int  # microseconds since the Unix epoch, UTC: the event's ASA System.Timestamp
    partition_key: str | None
    body: bytes


def event_key(partition: str, sequence_number: int) -> str:
    """An event's place in its hub: ``PARTITION:SEQUENCE``."""
    return f"{partition}:{sequence_number}"


def fact_row_key(seat_key: str, payment_key: str) -> str:
    """The identity of the fact row of one (seat, payment) pair, from ``seat_key`` (the booking's
    ``event_key`` and ``:SEAT_INDEX``, 0-based) and the payment's ``event_key``:
    ``0:1234:2/1:567`` is seat 2 of the booking at partition 0, sequence 1234 of the booking hub,
    paid by the payment at partition 1, sequence 567 of the payment hub. Unique for one pair of
    hubs."""
    return f"{seat_key}/{payment_key}"


class RowKeyParts(NamedTuple):
    booking_partition: str
    booking_sequence_number: int
    seat_index: int
    payment_partition: str
    payment_sequence_number: int


def parse_fact_row_key(key: str) -> RowKeyParts:
    booking, _, payment = key.partition("/")
    booking_partition, booking_sequence, seat = booking.split(":")
    payment_partition, payment_sequence = payment.split(":")
    return RowKeyParts(
        booking_partition,
        int(booking_sequence),
        int(seat),
        payment_partition,
        int(payment_sequence),
    )


def dead_letter_key(hub: str, partition: str, sequence_number: int) -> str:
    """The identity of an event's dead letter: ``HUB:PARTITION:SEQUENCE`` (no ``/``, unlike the
    key of a fact row a warehouse could not store, which keeps its fact row key)."""
    return f"{hub}:{event_key(partition, sequence_number)}"


def _storable_reason(reason: str) -> str:
    # The reason column is NVARCHAR(4000) and PostgreSQL text cannot hold NUL: a reason quoting a
    # parser's message must fit every target.
    return reason.replace("\x00", "\\0")[:MAX_REASON_LENGTH]


class DeadLetter(NamedTuple):
    """Something the pipeline could not use, kept with everything needed to find and replay it.

    Either an event it could not read (``row_key`` from ``dead_letter_key``; ``body`` the raw
    event) or a fact row a warehouse could not store (``row_key`` the row's fact row key; hub,
    partition, sequence number and time of the event holding the offending value; ``body`` the
    row as JSON, see ``encode_fact_row``).
    """

    hub: str
    partition: str
    sequence_number: int
    enqueued_time: int  # microseconds since the Unix epoch, UTC
    body: bytes
    reason: str
    row_key: str

    @classmethod
    def of(cls, event: HubEvent, reason: str) -> DeadLetter:
        return cls(
            event.hub,
            event.partition,
            event.sequence_number,
            event.enqueued_time,
            event.body,
            _storable_reason(reason),
            dead_letter_key(event.hub, event.partition, event.sequence_number),
        )

    @classmethod
    def of_row(cls, row: FactRow, column: str, reason: str) -> DeadLetter:
        """The dead letter of a fact row that a warehouse cannot store because of ``column``."""
        parts = parse_fact_row_key(row[-1])
        if column in PAYMENT_SIDE_COLUMNS:
            hub, partition, sequence = PAYMENT_HUB, *parts[3:]
            time = row[PAYMENT_EVENT_TIME_INDEX]
        else:
            hub, partition, sequence = BOOKING_HUB, parts[0], parts[1]
            time = row[BOOKING_EVENT_TIME_INDEX]
        return cls(
            hub,
            partition,
            sequence,
            datetime_to_micros(time),
            encode_fact_row(row),
            _storable_reason(f"unstorable fact row: {reason}"),
            row[-1],
        )

    @property
    def is_fact_row(self) -> bool:
        """Whether this holds a fact row a warehouse could not store (not an unreadable event)."""
        return "/" in self.row_key


#: The columns whose values come from the payment event; the rest come from the booking.
PAYMENT_SIDE_COLUMNS = frozenset(
    ("payment_id", "payment_time", "amount", "payment_method", "payment_type", "payment_event_time")
)
BOOKING_EVENT_TIME_INDEX = FACT_COLUMN_NAMES.index("booking_event_time")
PAYMENT_EVENT_TIME_INDEX = FACT_COLUMN_NAMES.index("payment_event_time")
_DATETIME_INDICES = tuple(i for i, c in enumerate(FACT_COLUMNS) if c.sql_type == "DATETIME2")


def encode_fact_row(row: FactRow) -> bytes:
    """A fact row (with its key) as a JSON array, times as ISO 8601: ``decode_fact_row``'s input."""
    return orjson.dumps(list(row))


def decode_fact_row(body: bytes) -> FactRow:
    """The fact row ``encode_fact_row`` encoded, with its types back."""
    values = orjson.loads(body)
    for index in _DATETIME_INDICES:
        if values[index] is not None:
            values[index] = dt.datetime.fromisoformat(values[index])
    return tuple(values)


_EPOCH = dt.datetime(1970, 1, 1)


def micros_to_datetime(micros: int) -> dt.datetime:
    """Naive UTC datetime (DATETIME2 semantics) of a microsecond epoch timestamp."""
    return _EPOCH + dt.timedelta(microseconds=micros)


def datetime_to_micros(value: dt.datetime) -> int:
    """Microseconds since the epoch of a datetime; a naive one is taken as UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return (value - _EPOCH) // dt.timedelta(microseconds=1)
