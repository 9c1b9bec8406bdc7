"""The ASA job's rules as plain functions: parsing, flattening, categories, TRY_CAST, join bound.

Everything here mirrors ``sql/stream_analytics_job_query.sql`` as Azure Stream Analytics evaluates
it (compatibility level 1.2, no TIMESTAMP BY); the facts are in ``shared/docs/asa-semantics.md``.
Where Microsoft's documentation is silent the choice is an *assumption*, and each assumption is one
named constant below so it can be corrected in one place. No Beam or Azure imports: the pipeline,
the benchmarks and the tests all call these same functions.

Rows are tuples (cheap to build, pickle and compare):

- a *booking row* is the 13 booking columns of the fact table, one per seat, ``order_id`` first;
- a *payment row* is ``(order_id, payment_id, payment_time, amount, payment_method,
  payment_type)``;
- a *fact row* is the 20 columns of ``bookymyshow.bookings_fact`` in DDL order.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import orjson

from pipeline.schema import FactRow, micros_to_datetime

# --- assumptions (documentation silent) -------------------------------------------------------
#: LIKE and IN compare case-sensitively ('concert' is not a Concert).
CASE_SENSITIVE_MATCHING = True
#: A payment exactly 120 s (to the microsecond) after its booking still joins.
JOIN_UPPER_BOUND_INCLUSIVE = True
#: A JSON value whose type does not fit its column (a number where a string is expected, a
#: string where a number is expected, a scalar where a record is expected) reads as NULL.
#: Timestamps keep DATETIME2's 100 ns digits only down to the microsecond (truncated).

# --- documented facts -------------------------------------------------------------------------
#: DATEDIFF(minute, b, p) BETWEEN 0 AND 2 inside a JOIN: 0 <= p.ts - b.ts <= 120 s.
JOIN_WINDOW_MICROS = 120_000_000
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
EVENT_CATEGORIES = (("Concert", "Music"), ("Play", "Theater"), ("Movie", "Cinema"))
OTHER_CATEGORY = "Other"
PAYMENT_TYPES = {"Credit Card": "Card", "Debit Card": "Card", "PayPal": "Online"}
DEFAULT_PAYMENT_TYPE = "Cash"

BookingRow = tuple
PaymentRow = tuple
#: Where the payload times sit in those rows (see booking_rows and payment_row).
BOOKING_TIME_INDEX = 1
PAYMENT_TIME_INDEX = 2


class MalformedEvent(ValueError):
    """An event the ASA job could not read; the message is the dead-letter reason."""


# ISO 8601 as TRY_CAST(... AS datetime) reads it: a date, optionally a time (seconds and up to
# seven fractional digits optional), optionally an offset. No offset means UTC.
_ISO_DATETIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,7}))?)?"
    r"(Z|[+-]\d{2}:?\d{2})?)?",
    re.ASCII,  # \d must not match other scripts' digits
)
_MAX_OFFSET = dt.timedelta(hours=14)


def try_cast_datetime(value: Any) -> dt.datetime | None:
    """TRY_CAST(value AS datetime): a naive UTC datetime, or None if value is not an ISO string."""
    if not isinstance(value, str):
        return None
    match = _ISO_DATETIME.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        parsed = dt.datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")),
        )
        if offset and offset != "Z":
            sign = -1 if offset[0] == "-" else 1
            digits = offset[1:].replace(":", "")
            shift = dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            if shift > _MAX_OFFSET or int(digits[2:]) > 59:
                return None
            parsed -= sign * shift
    except (ValueError, OverflowError):  # 2026-02-30, 25:00, or an offset past year 1/9999
        return None
    return parsed


def _matches(text: str, pattern: str) -> bool:
    if CASE_SENSITIVE_MATCHING:
        return pattern in text
    return pattern.casefold() in text.casefold()


def event_category(event_name: Any) -> str:
    """CASE WHEN event_name LIKE '%Concert%' THEN 'Music' ... ELSE 'Other' (first match wins)."""
    if isinstance(event_name, str):
        for pattern, category in EVENT_CATEGORIES:
            if _matches(event_name, pattern):
                return category
    return OTHER_CATEGORY


def payment_type(payment_method: Any) -> str:
    """CASE WHEN payment_method IN ('Credit Card', 'Debit Card') THEN 'Card' ... ELSE 'Cash'."""
    if not isinstance(payment_method, str):
        return DEFAULT_PAYMENT_TYPE
    if not CASE_SENSITIVE_MATCHING:
        folded = {method.casefold(): kind for method, kind in PAYMENT_TYPES.items()}
        return folded.get(payment_method.casefold(), DEFAULT_PAYMENT_TYPE)
    return PAYMENT_TYPES.get(payment_method, DEFAULT_PAYMENT_TYPE)


def day_of_week(value: dt.datetime | None) -> str | None:
    """DATENAME(weekday, value) in English; NULL stays NULL."""
    return None if value is None else WEEKDAYS[value.weekday()]


def hour_of_day(value: dt.datetime | None) -> int | None:
    """DATEPART(hour, value); NULL stays NULL."""
    return None if value is None else value.hour


def joins(booking_micros: int, payment_micros: int) -> bool:
    """The join's time condition on the two events' enqueued times (microseconds)."""
    elapsed = payment_micros - booking_micros
    if JOIN_UPPER_BOUND_INCLUSIVE:
        return 0 <= elapsed <= JOIN_WINDOW_MICROS
    return 0 <= elapsed < JOIN_WINDOW_MICROS


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _record(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _load_object(body: bytes | str) -> dict:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise MalformedEvent(f"malformed JSON: {error}") from None
    if not isinstance(document, dict):
        raise MalformedEvent(f"not a JSON object: the body is a JSON {type(document).__name__}")
    return document


def booking_rows(body: bytes | str) -> list[BookingRow]:
    """TransformedBookingStream for one booking message: one row per seat, possibly none.

    Raises MalformedEvent for bodies ASA cannot read (bad JSON, not an object, seats not an array).
    """
    document = _load_object(body)
    customer = _record(document.get("customer"))
    details = _record(document.get("event_details"))
    seats = details.get("seats")
    if seats is None:
        return []
    if not isinstance(seats, list):
        raise MalformedEvent(
            f"event_details.seats is not an array: got a JSON {type(seats).__name__}"
        )
    booking_time = try_cast_datetime(document.get("booking_time"))
    event_name = _string(details.get("event_name"))
    booking = (
        _string(document.get("order_id")),
        booking_time,
        _string(customer.get("customer_id")),
        _string(customer.get("name")),
        _string(customer.get("email")),
        _string(details.get("event_id")),
        event_name,
        _string(details.get("event_location")),
    )
    derived = (event_category(event_name), day_of_week(booking_time), hour_of_day(booking_time))
    rows = []
    for seat in seats:
        seat = _record(seat)
        rows.append(
            booking + (_string(seat.get("seat_number")), _number(seat.get("price"))) + derived
        )
    return rows


def payment_row(body: bytes | str) -> PaymentRow:
    """TransformedPaymentStream for one payment message. Raises MalformedEvent like booking_rows."""
    document = _load_object(body)
    method = _string(document.get("payment_method"))
    return (
        _string(document.get("order_id")),
        _string(document.get("payment_id")),
        try_cast_datetime(document.get("payment_time")),
        _number(document.get("amount")),
        method,
        payment_type(method),
    )


def fact_row(
    booking: BookingRow, booking_micros: int, payment: PaymentRow, payment_micros: int
) -> FactRow:
    """The 20 output columns of one joined (seat, payment) pair."""
    return (
        booking
        + payment[1:]
        + (micros_to_datetime(booking_micros), micros_to_datetime(payment_micros))
    )
