"""The ASA rules as pure functions: TRY_CAST, categories, weekday/hour, flattening, odd inputs."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import rules
from pipeline.schema import FACT_COLUMN_NAMES, micros_to_datetime

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=8,
)


# --- TRY_CAST(x AS datetime) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-02-08T10:30:00Z", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08 10:30:00", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08T10:30", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08", dt.datetime(2026, 2, 8)),
        ("2026-02-08T10:30:00.5Z", dt.datetime(2026, 2, 8, 10, 30, 0, 500000)),
        ("2026-02-08T10:30:00.1234567Z", dt.datetime(2026, 2, 8, 10, 30, 0, 123456)),
        ("2026-02-08T10:30:00+05:30", dt.datetime(2026, 2, 8, 5, 0)),
        ("2026-02-08T23:30:00-0800", dt.datetime(2026, 2, 9, 7, 30)),
        (" 2026-02-08T10:30:00Z ", dt.datetime(2026, 2, 8, 10, 30)),
    ],
)
def test_try_cast_reads_iso_8601_as_utc(text, expected):
    assert rules.try_cast_datetime(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2026-02-30T10:00:00Z",
        "2026-02-08T25:00:00Z",
        "2026-W06-1",
        "20260208T103000",
        "2026-02-08T10:30:00.12345678Z",
        "2026-02-08T10:30:00+15:00",
        "0001-01-01T00:30:00+01:00",
        "٢٠٢٦-٠٢-٠٨",
    ],
)
def test_try_cast_gives_null_for_what_it_cannot_read(text):
    assert rules.try_cast_datetime(text) is None


@given(st.datetimes(timezones=st.timezones(), min_value=dt.datetime(1900, 1, 1)))
def test_try_cast_round_trips_any_aware_datetime_to_naive_utc(moment):
    expected = moment.astimezone(dt.UTC).replace(tzinfo=None)
    assert rules.try_cast_datetime(moment.isoformat()) == expected


@given(st.datetimes(min_value=dt.datetime(1, 1, 1)))
def test_try_cast_takes_a_string_without_offset_as_utc(moment):
    assert rules.try_cast_datetime(moment.isoformat()) == moment


@given(json_values)
def test_try_cast_never_raises_and_reads_only_strings(value):
    result = rules.try_cast_datetime(value)
    assert result is None or (isinstance(value, str) and result.tzinfo is None)


# --- derived columns --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("Rock Concert", "Music"),
        ("Concert Play", "Music"),  # first match wins
        ("Broadway Play", "Theater"),
        ("Movie Premiere", "Cinema"),
        ("Playful Movie", "Theater"),
        ("concert in the park", "Other"),  # case-sensitive
        ("Stand-up Comedy", "Other"),
        ("", "Other"),
        (None, "Other"),
        (42, "Other"),
    ],
)
def test_event_category(name, category):
    assert rules.event_category(name) == category


@given(st.text(), st.sampled_from(["Concert", "Play", "Movie"]), st.text())
def test_event_category_finds_the_word_anywhere(before, word, after):
    category = rules.event_category(before + word + after)
    assert category == next(c for w, c in rules.EVENT_CATEGORIES if w in before + word + after)


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("Credit Card", "Card"),
        ("Debit Card", "Card"),
        ("PayPal", "Online"),
        ("paypal", "Cash"),
        ("Bank Transfer", "Cash"),
        (None, "Cash"),
        (["PayPal"], "Cash"),
    ],
)
def test_payment_type(method, kind):
    assert rules.payment_type(method) == kind


@pytest.mark.parametrize(
    ("day", "name"),
    [
        (dt.datetime(2026, 2, 8), "Sunday"),
        (dt.datetime(2026, 2, 9), "Monday"),
        (dt.datetime(2024, 2, 29), "Thursday"),
        (dt.datetime(2000, 1, 1), "Saturday"),
    ],
)
def test_day_of_week_is_english(day, name):
    assert rules.day_of_week(day) == name


def test_null_dates_give_null_weekday_and_hour():
    assert rules.day_of_week(None) is None
    assert rules.hour_of_day(None) is None


@given(st.datetimes())
def test_hour_of_day(moment):
    assert rules.hour_of_day(moment) == moment.hour


@given(st.integers(-(10**12), 10**12), st.integers(-(10**9), 10**9))
def test_joins_is_the_inclusive_two_minute_bound(booking, elapsed):
    assert rules.joins(booking, booking + elapsed) == (0 <= elapsed <= 120_000_000)


# --- flattening -------------------------------------------------------------------------------


def text_or_odd():
    return st.text() | json_scalars | st.just({"nested": 1}) | st.just([1])


seats = st.lists(
    st.fixed_dictionaries({}, optional={"seat_number": text_or_odd(), "price": json_scalars})
    | json_scalars,
    max_size=6,
)
bookings = st.fixed_dictionaries(
    {},
    optional={
        "order_id": text_or_odd(),
        "booking_time": st.one_of(st.datetimes().map(dt.datetime.isoformat), text_or_odd()),
        "customer": st.fixed_dictionaries(
            {},
            optional={"customer_id": text_or_odd(), "name": text_or_odd(), "email": text_or_odd()},
        )
        | json_scalars,
        "event_details": st.fixed_dictionaries(
            {},
            optional={
                "event_id": text_or_odd(),
                "event_name": text_or_odd(),
                "event_location": text_or_odd(),
                "seats": seats,
            },
        )
        | json_scalars,
    },
)


def expected_string(value):
    return value if isinstance(value, str) else None


def expected_number(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def record(value):
    return value if isinstance(value, dict) else {}


@given(bookings)
def test_booking_rows_flatten_one_row_per_seat(document):
    rows = rules.booking_rows(orjson.dumps(document))
    details = record(document.get("event_details"))
    customer = record(document.get("customer"))
    seat_list = details.get("seats") or []
    assert len(rows) == len(seat_list)
    booking_time = rules.try_cast_datetime(document.get("booking_time"))
    for row, seat in zip(rows, seat_list, strict=True):
        seat = record(seat)
        assert row == (
            expected_string(document.get("order_id")),
            booking_time,
            expected_string(customer.get("customer_id")),
            expected_string(customer.get("name")),
            expected_string(customer.get("email")),
            expected_string(details.get("event_id")),
            expected_string(details.get("event_name")),
            expected_string(details.get("event_location")),
            expected_string(seat.get("seat_number")),
            expected_number(seat.get("price")),
            rules.event_category(details.get("event_name")),
            None if booking_time is None else booking_time.strftime("%A"),
            None if booking_time is None else booking_time.hour,
        )


@pytest.mark.parametrize(
    "details", [{}, {"seats": None}, {"seats": []}, {"event_name": "Rock Concert"}]
)
def test_bookings_without_seats_produce_no_rows(details):
    assert rules.booking_rows(orjson.dumps({"order_id": "o1", "event_details": details})) == []


@pytest.mark.parametrize("seat_value", ["A1,A2", 3, {"seat_number": "A1"}, True])
def test_seats_that_are_not_an_array_are_malformed(seat_value):
    body = orjson.dumps({"order_id": "o1", "event_details": {"seats": seat_value}})
    with pytest.raises(rules.MalformedEvent, match="event_details.seats is not an array"):
        rules.booking_rows(body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"12", "not a JSON object"),
    ],
)
def test_unreadable_bodies_are_malformed_with_a_reason(body, reason):
    for parse in (rules.booking_rows, rules.payment_row):
        with pytest.raises(rules.MalformedEvent, match=reason):
            parse(body)


def test_unicode_passes_through_and_str_bodies_equal_bytes():
    document = {
        "order_id": "订单-1",
        "customer": {"name": "Zoë Ñúñez 🎟"},
        "event_details": {"event_name": "Концерт Concert", "seats": [{"seat_number": "Ä1"}]},
    }
    rows = rules.booking_rows(orjson.dumps(document))
    assert rows == rules.booking_rows(orjson.dumps(document).decode())
    assert rows[0][0] == "订单-1" and rows[0][3] == "Zoë Ñúñez 🎟" and rows[0][10] == "Music"
    assert rows[0][8] == "Ä1" and rows[0][9] is None


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "order_id": text_or_odd(),
            "payment_id": text_or_odd(),
            "payment_time": text_or_odd(),
            "amount": json_scalars,
            "payment_method": st.sampled_from(["Credit Card", "Debit Card", "PayPal"])
            | text_or_odd(),
            "payment_status": text_or_odd(),
        },
    )
)
def test_payment_row(document):
    method = expected_string(document.get("payment_method"))
    assert rules.payment_row(orjson.dumps(document)) == (
        expected_string(document.get("order_id")),
        expected_string(document.get("payment_id")),
        rules.try_cast_datetime(document.get("payment_time")),
        expected_number(document.get("amount")),
        method,
        rules.payment_type(method),
    )


def test_fact_row_has_the_20_columns_in_ddl_order():
    booking = rules.booking_rows(
        orjson.dumps(
            {
                "order_id": "o1",
                "booking_time": "2026-02-08T10:30:00Z",
                "customer": {"customer_id": "c1", "name": "Ana", "email": "a@x"},
                "event_details": {
                    "event_id": "e1",
                    "event_name": "Movie Night",
                    "event_location": "Main St",
                    "seats": [{"seat_number": "A1", "price": 75}],
                },
            }
        )
    )[0]
    payment = rules.payment_row(
        orjson.dumps(
            {
                "payment_id": "p1",
                "order_id": "o1",
                "payment_time": "2026-02-08T10:31:00Z",
                "amount": 75,
                "payment_method": "PayPal",
                "payment_status": "Failed",
            }
        )
    )
    row = dict(zip(FACT_COLUMN_NAMES, rules.fact_row(booking, 5, payment, 7), strict=True))
    assert row == {
        "order_id": "o1",
        "booking_time": dt.datetime(2026, 2, 8, 10, 30),
        "customer_id": "c1",
        "customer_name": "Ana",
        "customer_email": "a@x",
        "event_id": "e1",
        "event_name": "Movie Night",
        "event_location": "Main St",
        "seat_number": "A1",
        "seat_price": 75.0,
        "event_category": "Cinema",
        "booking_day_of_week": "Sunday",
        "booking_hour": 10,
        "payment_id": "p1",
        "payment_time": dt.datetime(2026, 2, 8, 10, 31),
        "amount": 75.0,
        "payment_method": "PayPal",
        "payment_type": "Online",
        "booking_event_time": micros_to_datetime(5),
        "payment_event_time": micros_to_datetime(7),
    }
