"""The shapes that cross module boundaries: hub events, the 20 fact columns, dead letters.

The fact columns follow the seed's Synapse DDL for ``bookymyshow.bookings_fact`` column for
column, in order; every writer and the parity checker rely on that order.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

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
#: What identifies a fact row for idempotent writes (a replay must not add it twice); the most
#: selective column first. Rows equal in all of these collapse into one.
FACT_KEY = ("order_id", "seat_number", "payment_id", "booking_event_time", "payment_event_time")
#: What identifies a dead letter: the event's place in its hub.
DEAD_LETTER_KEY = ("sequence_number", "hub", "partition")

# A fact row is a plain tuple of 20 values in FACT_COLUMNS order: str | float | int | None, and
# naive UTC datetime for the DATETIME2 columns. Tuples keep the hot path cheap to encode.
FactRow = tuple


class HubEvent(NamedTuple):
    """One event as an event hub stores it, whatever the hub (Azure Event Hubs or the local hub)."""

    hub: str
    partition: str
    sequence_number: int
    enqueued_time: int  # microseconds since the Unix epoch, UTC: the event's ASA System.Timestamp
    partition_key: str | None
    body: bytes


class DeadLetter(NamedTuple):
    """An event the pipeline could not use, kept with everything needed to find and replay it."""

    hub: str
    partition: str
    sequence_number: int
    enqueued_time: int  # microseconds since the Unix epoch, UTC
    body: bytes
    reason: str

    @classmethod
    def of(cls, event: HubEvent, reason: str) -> DeadLetter:
        return cls(
            event.hub,
            event.partition,
            event.sequence_number,
            event.enqueued_time,
            event.body,
            reason,
        )


_EPOCH = dt.datetime(1970, 1, 1)


def micros_to_datetime(micros: int) -> dt.datetime:
    """Naive UTC datetime (DATETIME2 semantics) of a microsecond epoch timestamp."""
    return _EPOCH + dt.timedelta(microseconds=micros)


def datetime_to_micros(value: dt.datetime) -> int:
    """Microseconds since the epoch of a datetime; a naive one is taken as UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return (value - _EPOCH) // dt.timedelta(microseconds=1)
