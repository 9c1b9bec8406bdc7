"""The ASA rules as pure functions: TRY_CAST, categories, weekday/hour, flattening, odd inputs.

Expectations are computed here independently of ``pipeline.rules`` (literal tables, plain
arithmetic, a separate reading of each document) so a wrong rule cannot agree with itself.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import orjson
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from pipeline import rules
from pipeline.schema import FACT_COLUMN_NAMES, datetime_to_micros, micros_to_datetime
from tests.conftest import booking_document

#: The central properties get more examples than the profile's default; the file stays < 5 s.
thorough = settings(max_examples=300)

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
#: Anything a caller could pass, JSON or not (no from_type(object): it can draw os.environ).
any_python_value = (
    json_values
    | st.binary()
    | st.datetimes()
    | st.dates()
    | st.timedeltas()
    | st.complex_numbers()
    | st.decimals()
    | st.fractions()
    | st.tuples(json_scalars)
    | st.frozensets(st.integers())
)
non_strings = json_values.filter(lambda value: not isinstance(value, str))


def naive_utc(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


# --- TRY_CAST(x AS datetime) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-02-08T10:30:00Z", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08 10:30:00", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08 10:30:00Z", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08T10:30", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08T10:30Z", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08", dt.datetime(2026, 2, 8)),
        ("2026-02-08T10:30:00.5Z", dt.datetime(2026, 2, 8, 10, 30, 0, 500000)),
        ("2026-02-08T10:30:00.12Z", dt.datetime(2026, 2, 8, 10, 30, 0, 120000)),
        ("2026-02-08T10:30:00.000001Z", dt.datetime(2026, 2, 8, 10, 30, 0, 1)),
        ("2026-02-08T10:30:00.1234567Z", dt.datetime(2026, 2, 8, 10, 30, 0, 123456)),
        ("2026-02-08T10:30:00.9999999Z", dt.datetime(2026, 2, 8, 10, 30, 0, 999999)),
        ("2026-02-08T10:30:00+05:30", dt.datetime(2026, 2, 8, 5, 0)),
        ("2026-02-08T10:30:00+0530", dt.datetime(2026, 2, 8, 5, 0)),
        ("2026-02-08T23:30:00-0800", dt.datetime(2026, 2, 9, 7, 30)),
        ("2026-02-08T23:30:00-08:00", dt.datetime(2026, 2, 9, 7, 30)),
        ("2026-02-08T10:30:00+00:00", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08T10:30:00+14:00", dt.datetime(2026, 2, 7, 20, 30)),
        ("2026-01-01T00:15:00+00:30", dt.datetime(2025, 12, 31, 23, 45)),
        ("2024-02-29T12:00:00Z", dt.datetime(2024, 2, 29, 12)),
        (" 2026-02-08T10:30:00Z ", dt.datetime(2026, 2, 8, 10, 30)),
    ],
)
def test_try_cast_reads_iso_8601_as_utc(text, expected):
    assert rules.try_cast_datetime(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "yesterday",
        "2026-02-30",
        "2026-02-30T10:00:00Z",
        "2025-02-29T10:00:00Z",
        "2026-13-01",
        "0000-01-01",
        "2026-02-08T25:00",
        "2026-02-08T25:00:00Z",
        "2026-02-08T24:00:00",
        "2026-02-08T10:60:00",
        "2026-02-08T10:30:60",
        "2026-W06-1",
        "2026-W06",
        "2026-039",  # ordinal date
        "20260208",
        "20260208T1030",
        "20260208T103000",
        "2026-02-08T10",
        "2026-2-8",
        "2026-02-08T10:30:00.",
        "2026-02-08T10:30:00.12345678Z",
        "2026-02-08T10:30:00+15:00",
        "2026-02-08T10:30:00+05:60",
        "2026-02-08T10:30:00+00:19:32",  # seconds in an offset (old local mean times)
        "2026-02-08T10:30:00Zjunk",
        "on 2026-02-08",
        "0001-01-01T00:30:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:30:00-01:00",  # after year 9999 in UTC
        "٢٠٢٦-٠٢-٠٨",  # Arabic-Indic digits
        "２０２６-０２-０８",  # fullwidth digits
    ],
)
def test_try_cast_gives_null_for_what_it_cannot_read(text):
    assert rules.try_cast_datetime(text) is None


@pytest.mark.parametrize(
    "value",
    [20260208, 1770546600, 1.5, 0, None, True, False, [], ["2026-02-08"], {}, {"a": 1}],
)
def test_try_cast_gives_null_for_non_strings(value):
    assert rules.try_cast_datetime(value) is None


@st.composite
def iso_texts(draw):
    """An ISO 8601 text built from parts, with the naive UTC datetime it denotes (or None)."""
    date = draw(st.dates(min_value=dt.date(1, 1, 1), max_value=dt.date(9999, 12, 31)))
    text = date.isoformat()
    local = dt.datetime(date.year, date.month, date.day)
    if draw(st.booleans()):  # date only: midnight UTC
        return text, local
    hour, minute = draw(st.integers(0, 23)), draw(st.integers(0, 59))
    text += draw(st.sampled_from("T ")) + f"{hour:02d}:{minute:02d}"
    local = local.replace(hour=hour, minute=minute)
    if draw(st.booleans()):
        second = draw(st.integers(0, 59))
        text += f":{second:02d}"
        local = local.replace(second=second)
        digits = draw(st.text("0123456789", min_size=1, max_size=7) | st.just(""))
        if digits:
            text += "." + digits
            # DATETIME2's 100 ns digits, kept down to the microsecond by truncation.
            micros = int(Decimal("0." + digits) * 1_000_000)
            local = local.replace(microsecond=micros)
    offset_minutes = draw(st.none() | st.just(0) | st.integers(-14 * 60, 14 * 60))
    if offset_minutes is None:
        return text, local
    if offset_minutes == 0 and draw(st.booleans()):
        text += "Z"
    else:
        sign = "-" if offset_minutes < 0 else "+"
        hours, minutes = divmod(abs(offset_minutes), 60)
        text += f"{sign}{hours:02d}{draw(st.sampled_from([':', '']))}{minutes:02d}"
    try:
        return text, local - dt.timedelta(minutes=offset_minutes)
    except OverflowError:  # the UTC instant falls outside years 1..9999
        return text, None


@thorough
@given(iso_texts())
def test_try_cast_reads_every_iso_form(case):
    text, expected = case
    assert rules.try_cast_datetime(text) == expected


@thorough
@given(st.datetimes(timezones=st.timezones(), min_value=dt.datetime(1900, 1, 1)))
@example(dt.datetime(2026, 2, 8, 10, 30, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5.5))))
@example(dt.datetime(2026, 2, 8, 23, 59, tzinfo=dt.timezone(-dt.timedelta(hours=8))))
def test_try_cast_round_trips_any_aware_datetime_to_naive_utc(moment):
    offset = moment.utcoffset()
    # ISO 8601 and T-SQL offsets are whole minutes; zoneinfo's old local mean times are not
    # (Africa/Abidjan before 1912 is -00:16:08), and those correctly read as NULL.
    assume(offset % dt.timedelta(minutes=1) == dt.timedelta(0))
    expected = naive_utc(moment)
    assert rules.try_cast_datetime(moment.isoformat()) == expected
    assert rules.try_cast_datetime(moment.isoformat(sep=" ")) == expected
    assert rules.try_cast_datetime(moment.isoformat(timespec="seconds")) == expected.replace(
        microsecond=0
    )


@given(st.datetimes(min_value=dt.datetime(1, 1, 1)))
def test_try_cast_takes_a_string_without_offset_as_utc(moment):
    assert rules.try_cast_datetime(moment.isoformat()) == moment
    assert rules.try_cast_datetime(moment.isoformat(timespec="minutes")) == moment.replace(
        second=0, microsecond=0
    )


@thorough
@given(st.text() | any_python_value)
def test_try_cast_never_raises_and_reads_only_strings(value):
    result = rules.try_cast_datetime(value)
    assert result is None or (isinstance(value, str) and result.tzinfo is None)


@given(non_strings)
def test_try_cast_of_any_non_string_json_value_is_null(value):
    assert rules.try_cast_datetime(value) is None


# --- derived columns --------------------------------------------------------------------------


def expected_category(name) -> str:
    """The CASE WHEN of the query, written out (LIKE '%x%' is a substring test)."""
    if not isinstance(name, str):
        return "Other"
    if not rules.CASE_SENSITIVE_MATCHING:
        name = name.casefold()

    def like(word: str) -> bool:
        return (word if rules.CASE_SENSITIVE_MATCHING else word.casefold()) in name

    if like("Concert"):
        return "Music"
    if like("Play"):
        return "Theater"
    if like("Movie"):
        return "Cinema"
    return "Other"


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("Rock Concert", "Music"),
        ("Concert", "Music"),
        ("Concert Play", "Music"),  # first match wins
        ("Play Concert", "Music"),  # the CASE order decides, not the position in the text
        ("Movie Concert", "Music"),
        ("Broadway Play", "Theater"),
        ("Movie Play", "Theater"),
        ("Playful Movie", "Theater"),
        ("Screenplay", "Other"),  # 'play', lower case
        ("Movie Premiere", "Cinema"),
        ("Concerto", "Music"),  # substring, not word
        ("concert in the park", "Other"),  # case-sensitive
        ("CONCERT", "Other"),
        ("MOVIE", "Other"),
        ("Stand-up Comedy", "Other"),
        ("", "Other"),
        (None, "Other"),
        (42, "Other"),
        (True, "Other"),
        (["Concert"], "Other"),
        ({"name": "Concert"}, "Other"),
    ],
)
def test_event_category(name, category):
    assert rules.CASE_SENSITIVE_MATCHING, "the examples assume case-sensitive LIKE"
    assert rules.event_category(name) == category


@given(st.text(), st.sampled_from(["Concert", "Play", "Movie"]), st.text())
def test_event_category_finds_the_word_anywhere(before, word, after):
    category = rules.event_category(before + word + after)
    assert category == expected_category(before + word + after)
    assert category != "Other"


@given(st.text() | st.text("ConcertPlayMovieCPM "))
def test_event_category_of_any_text(name):
    assert rules.event_category(name) == expected_category(name)


@given(st.sampled_from(["Concert", "Play", "Movie"]), st.data())
def test_event_category_is_case_sensitive(word, data):
    changed = data.draw(
        st.sampled_from([word.lower(), word.upper(), word.swapcase()]), label="changed"
    )
    name = data.draw(st.text("abc xyz"), label="before") + changed
    assert rules.event_category(name) == expected_category(name)
    if rules.CASE_SENSITIVE_MATCHING:
        assert rules.event_category(name) == "Other"


@given(non_strings)
def test_event_category_of_non_strings_is_other(value):
    assert rules.event_category(value) == "Other"


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("Credit Card", "Card"),
        ("Debit Card", "Card"),
        ("PayPal", "Online"),
        ("paypal", "Cash"),  # case-sensitive
        ("credit card", "Cash"),
        ("Credit Card ", "Cash"),  # IN is equality, not LIKE
        ("Card", "Cash"),
        ("Bank Transfer", "Cash"),
        ("Cash", "Cash"),
        ("", "Cash"),
        (None, "Cash"),
        (1, "Cash"),
        (["PayPal"], "Cash"),
        ({"method": "PayPal"}, "Cash"),
    ],
)
def test_payment_type(method, kind):
    assert rules.payment_type(method) == kind


PAYMENT_KINDS = {"Credit Card": "Card", "Debit Card": "Card", "PayPal": "Online"}


@given(st.text() | st.sampled_from(sorted(PAYMENT_KINDS)) | non_strings)
def test_payment_type_of_anything(method):
    assert rules.payment_type(method) == (
        PAYMENT_KINDS.get(method, "Cash") if isinstance(method, str) else "Cash"
    )


# A fixed table: strftime('%A') or calendar.day_name would follow the process locale.
ENGLISH_WEEKDAYS_FROM_MONDAY = (
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
)
A_KNOWN_MONDAY = dt.date(2024, 1, 1)


def expected_weekday(moment: dt.datetime) -> str:
    return ENGLISH_WEEKDAYS_FROM_MONDAY[(moment.date() - A_KNOWN_MONDAY).days % 7]


@pytest.mark.parametrize(
    ("day", "name"),
    [
        (dt.datetime(2026, 2, 8), "Sunday"),
        (dt.datetime(2026, 2, 9, 23, 59, 59, 999999), "Monday"),
        (dt.datetime(2026, 2, 10), "Tuesday"),
        (dt.datetime(2026, 2, 11), "Wednesday"),
        (dt.datetime(2024, 2, 29), "Thursday"),
        (dt.datetime(1970, 1, 2), "Friday"),
        (dt.datetime(2000, 1, 1), "Saturday"),
        (dt.datetime(1, 1, 1), "Monday"),
        (dt.datetime(9999, 12, 31), "Friday"),
    ],
)
def test_day_of_week_is_english(day, name):
    assert rules.day_of_week(day) == name


@given(st.datetimes())
def test_day_of_week_follows_the_calendar(moment):
    assert rules.day_of_week(moment) == expected_weekday(moment)


def test_null_dates_give_null_weekday_and_hour():
    assert rules.day_of_week(None) is None
    assert rules.hour_of_day(None) is None


@pytest.mark.parametrize(
    ("moment", "hour"),
    [
        (dt.datetime(2026, 2, 8), 0),
        (dt.datetime(2026, 2, 8, 0, 59, 59, 999999), 0),
        (dt.datetime(2026, 2, 8, 13, 0), 13),
        (dt.datetime(2026, 2, 8, 23, 59, 59, 999999), 23),
    ],
)
def test_hour_of_day_examples(moment, hour):
    assert rules.hour_of_day(moment) == hour


@given(st.datetimes())
def test_hour_of_day(moment):
    assert rules.hour_of_day(moment) == (moment - moment.replace(hour=0)) // dt.timedelta(hours=1)


TWO_MINUTES = 120_000_000  # µs


@pytest.mark.parametrize(
    ("elapsed", "matches"),
    [
        (0, True),
        (1, True),
        (60_000_000, True),
        (TWO_MINUTES - 1, True),
        (TWO_MINUTES, True),  # inclusive (assumed at µs precision)
        (TWO_MINUTES + 1, False),
        (150_000_000, False),  # 2 min 30 s
        (-1, False),
        (-1_000, False),  # 1 ms before the booking
        (-TWO_MINUTES, False),
    ],
)
def test_joins_at_the_bounds(elapsed, matches):
    booking = datetime_to_micros(dt.datetime(2026, 2, 8, 10, 30))
    assert rules.joins(booking, booking + elapsed) is matches


@thorough
@given(
    st.integers(-(10**15), 10**15),
    st.integers(-(10**10), 10**10)
    | st.sampled_from([-1, 0, 1, TWO_MINUTES - 1, TWO_MINUTES, TWO_MINUTES + 1]),
)
def test_joins_is_the_inclusive_two_minute_bound(booking, elapsed):
    assert rules.JOIN_UPPER_BOUND_INCLUSIVE, "the property assumes an inclusive upper bound"
    assert rules.joins(booking, booking + elapsed) == (0 <= elapsed <= TWO_MINUTES)


# --- flattening -------------------------------------------------------------------------------
# Each expected row is read straight from the document: JSON strings stay strings, JSON numbers
# (not booleans) become floats, every other type reads as NULL.


def expected_string(value):
    return value if isinstance(value, str) else None


def expected_number(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def record(value):
    return value if isinstance(value, dict) else {}


def text_or_odd():
    return st.text() | json_scalars | st.just({"nested": 1}) | st.just([1])


seat_elements = (
    st.fixed_dictionaries(
        {},
        optional={
            "seat_number": text_or_odd(),
            "price": json_scalars | st.integers(0, 500) | st.floats(0, 500),
            "row": st.text(),
        },
    )
    | json_scalars
    | st.just(["A1", 75])
)
seat_lists = st.lists(seat_elements, max_size=6)
booking_times = (
    st.datetimes().map(dt.datetime.isoformat)
    | st.datetimes(timezones=st.timezones()).map(dt.datetime.isoformat)
    | text_or_odd()
)


def booking_documents(seats: st.SearchStrategy, *, always_seated: bool = False):
    """Booking documents with any key missing or of the wrong type; seats drawn from ``seats``.

    ``always_seated`` keeps ``event_details.seats`` present so every document has rows.
    """
    event_fields = {
        "event_id": text_or_odd(),
        "event_name": text_or_odd() | st.sampled_from(["Rock Concert", "A Play"]),
        "event_location": text_or_odd(),
    }
    details = (
        st.fixed_dictionaries({"seats": seats}, optional=event_fields)
        if always_seated
        else st.fixed_dictionaries({}, optional={**event_fields, "seats": seats}) | json_scalars
    )
    fields = {
        "order_id": text_or_odd(),
        "booking_time": booking_times,
        "customer": st.fixed_dictionaries(
            {},
            optional={"customer_id": text_or_odd(), "name": text_or_odd(), "email": text_or_odd()},
        )
        | json_scalars,
        "extra": json_values,
    }
    if always_seated:
        return st.fixed_dictionaries({"event_details": details}, optional=fields)
    return st.fixed_dictionaries({}, optional={**fields, "event_details": details})


bookings = booking_documents(seat_lists | st.none() | json_values)
seated_bookings = booking_documents(
    st.lists(seat_elements, min_size=1, max_size=3), always_seated=True
)


def expected_booking_rows(document: dict) -> list[tuple]:
    """The bookings step of the query, evaluated by hand on one parsed document."""
    details = record(document.get("event_details"))
    customer = record(document.get("customer"))
    seat_list = details.get("seats")
    booking_time = rules.try_cast_datetime(document.get("booking_time"))
    shared = (
        expected_string(document.get("order_id")),
        booking_time,
        expected_string(customer.get("customer_id")),
        expected_string(customer.get("name")),
        expected_string(customer.get("email")),
        expected_string(details.get("event_id")),
        expected_string(details.get("event_name")),
        expected_string(details.get("event_location")),
    )
    derived = (
        expected_category(details.get("event_name")),
        None if booking_time is None else expected_weekday(booking_time),
        None if booking_time is None else booking_time.hour,
    )
    return [
        (
            *shared,
            expected_string(record(seat).get("seat_number")),
            expected_number(record(seat).get("price")),
            *derived,
        )
        for seat in seat_list or []
    ]


@thorough
@given(bookings)
def test_booking_rows_flatten_one_row_per_seat(document):
    body = orjson.dumps(document)
    seat_list = record(document.get("event_details")).get("seats")
    if seat_list is not None and not isinstance(seat_list, list):
        with pytest.raises(rules.MalformedEvent, match=r"event_details\.seats"):
            rules.booking_rows(body)
        return
    rows = rules.booking_rows(body)
    assert len(rows) == len(seat_list or [])
    assert rows == expected_booking_rows(document)
    # One booking: every row carries the same 8 booking fields and the same derived columns.
    assert len({row[:8] for row in rows}) <= 1
    assert len({row[10:] for row in rows}) <= 1
    assert all(len(row) == 13 for row in rows)
    assert rules.booking_rows(body.decode()) == rows


def booking(**overrides) -> dict:
    overrides.setdefault("order_id", "o1")
    overrides.setdefault(
        "seats", [{"seat_number": "A1", "price": 75}, {"seat_number": "A2", "price": 80.5}]
    )
    return booking_document(**overrides)


def test_booking_rows_one_row_per_seat_in_order():
    rows = rules.booking_rows(orjson.dumps(booking()))
    shared = (
        "o1",
        dt.datetime(2026, 2, 8, 10, 30),
        "c1",
        "Ana",
        "ana@example.com",
        "e1",
        "Rock Concert",
        "1 Main St",
    )
    assert rows == [
        (*shared, "A1", 75.0, "Music", "Sunday", 10),
        (*shared, "A2", 80.5, "Music", "Sunday", 10),
    ]
    assert type(rows[0][9]) is float  # a JSON integer price is a FLOAT column


@pytest.mark.parametrize(
    "details", [{}, {"seats": None}, {"seats": []}, {"event_name": "Rock Concert"}]
)
def test_bookings_without_seats_produce_no_rows(details):
    assert rules.booking_rows(orjson.dumps({"order_id": "o1", "event_details": details})) == []


@pytest.mark.parametrize("details", [None, "seats", 3, ["A1"], True])
def test_event_details_that_are_not_an_object_have_no_seats(details):
    assert rules.booking_rows(orjson.dumps({"order_id": "o1", "event_details": details})) == []


def test_a_booking_without_event_details_produces_no_rows():
    assert rules.booking_rows(b'{"order_id": "o1"}') == []
    assert rules.booking_rows(b"{}") == []


@pytest.mark.parametrize(
    "seat_value", ["A1,A2", "", 3, 0, 1.5, {"seat_number": "A1"}, {}, True, False]
)
def test_seats_that_are_not_an_array_are_malformed(seat_value):
    body = orjson.dumps(booking(seats=seat_value))
    with pytest.raises(rules.MalformedEvent, match=r"event_details\.seats is not an array"):
        rules.booking_rows(body)


@pytest.mark.parametrize("seat", [None, "A1", 7, 7.5, True, ["A1", 75], []])
def test_seat_elements_that_are_not_objects_keep_their_row(seat):
    rows = rules.booking_rows(orjson.dumps(booking(seats=[seat, {"seat_number": "B2"}])))
    assert len(rows) == 2
    assert rows[0][8:10] == (None, None)
    assert rows[0][:8] == rows[1][:8] and rows[0][10:] == rows[1][10:]
    assert rows[1][8:10] == ("B2", None)


@pytest.mark.parametrize(
    ("price", "expected"),
    [
        (75, 75.0),
        (0, 0.0),
        (-3, -3.0),
        (80.25, 80.25),
        (1e308, 1e308),
        (2**63 - 1, float(2**63 - 1)),
        (True, None),  # a JSON boolean is not a number
        (False, None),
        ("75", None),  # nor is a string of digits
        (None, None),
        ([75], None),
        ({"amount": 75}, None),
    ],
)
def test_seat_price_reads_numbers_only(price, expected):
    (row,) = rules.booking_rows(
        orjson.dumps(booking(seats=[{"seat_number": "A1", "price": price}]))
    )
    assert row[9] == expected
    assert expected is None or type(row[9]) is float


def test_fields_of_the_wrong_type_read_as_null():
    document = booking(
        order_id=12345,
        booking_time=1770546600,
        customer="Ana",
        event_id=["e1"],
        event_name={"name": "Rock Concert"},
        event_location=False,
    )
    rows = rules.booking_rows(orjson.dumps(document))
    assert rows == [
        (None,) * 8 + ("A1", 75.0, "Other", None, None),
        (None,) * 8 + ("A2", 80.5, "Other", None, None),
    ]


def test_null_and_missing_fields_read_as_null():
    document = booking(order_id=None, booking_time=None)
    del document["customer"]
    del document["event_details"]["event_name"]
    (row, _) = rules.booking_rows(orjson.dumps(document))
    assert row == (None, None, None, None, None, "e1", None, "1 Main St", "A1", 75.0) + (
        "Other",
        None,
        None,
    )


def test_an_unreadable_booking_time_keeps_the_row():
    (row, _) = rules.booking_rows(orjson.dumps(booking(booking_time="tomorrow at 8")))
    assert row[0] == "o1" and row[1] is None and row[11:] == (None, None)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "malformed JSON"),
        (b"   ", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b'{"order_id": "o1",}', "malformed JSON"),
        (b'{"order_id": "o1"} trailing', "malformed JSON"),
        (b'{"price": NaN}', "malformed JSON"),
        (b'{"price": 1e400}', "malformed JSON"),  # infinity is no FLOAT
        ("{not json", "malformed JSON"),
        ('{"a": "\ud800"}', "malformed JSON"),  # a lone surrogate in a str body
        (b"[1, 2]", "not a JSON object"),
        (b"[]", "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"12", "not a JSON object"),
        (b"1.5", "not a JSON object"),
        (b"true", "not a JSON object"),
        ("null", "not a JSON object"),
    ],
)
def test_unreadable_bodies_are_malformed_with_a_reason(body, reason):
    for parse in (rules.booking_rows, rules.payment_row):
        with pytest.raises(rules.MalformedEvent, match=reason):
            parse(body)


@thorough
@given(st.binary() | st.text() | json_values.map(orjson.dumps))
def test_any_body_gives_rows_or_a_malformed_event(body):
    for parse, kind in ((rules.booking_rows, list), (rules.payment_row, tuple)):
        try:
            result = parse(body)
        except rules.MalformedEvent as error:
            assert str(error)  # the dead-letter reason
        else:
            assert isinstance(result, kind)


def test_unicode_passes_through_and_str_bodies_equal_bytes():
    document = {
        "order_id": "订单-1",
        "customer": {"customer_id": "ク-1", "name": "Zoë Ñúñez 🎟", "email": "zoë@例え.jp"},
        "event_details": {
            "event_name": "Концерт Concert",
            "event_location": "Straße 1, \u202eRTL",
            "seats": [{"seat_number": "Ä1"}],
        },
    }
    rows = rules.booking_rows(orjson.dumps(document))
    assert rows == rules.booking_rows(orjson.dumps(document).decode())
    assert rows[0][0] == "订单-1"
    assert rows[0][2:5] == ("ク-1", "Zoë Ñúñez 🎟", "zoë@例え.jp")
    assert rows[0][7] == "Straße 1, \u202eRTL"
    assert rows[0][10] == "Music"
    assert rows[0][8] == "Ä1" and rows[0][9] is None


def test_escaped_unicode_reads_like_literal_unicode():
    escaped = (
        b'{"order_id": "\\u8ba2\\u5355", "event_details": {"seats": [{"seat_number": "\\u00c41"}]}}'
    )
    (row,) = rules.booking_rows(escaped)
    assert row[0] == "订单" and row[8] == "Ä1"


# --- payments and the joined row ----------------------------------------------------------------

payments = st.fixed_dictionaries(
    {},
    optional={
        "order_id": text_or_odd(),
        "payment_id": text_or_odd(),
        "payment_time": booking_times,
        "amount": json_scalars | st.integers(0, 10_000) | st.floats(0, 10_000),
        "payment_method": st.sampled_from(["Credit Card", "Debit Card", "PayPal"]) | text_or_odd(),
        "payment_status": st.sampled_from(["Success", "Failed"]) | text_or_odd(),
        "extra": json_values,
    },
)


def expected_payment_row(document: dict) -> tuple:
    method = expected_string(document.get("payment_method"))
    return (
        expected_string(document.get("order_id")),
        expected_string(document.get("payment_id")),
        rules.try_cast_datetime(document.get("payment_time")),
        expected_number(document.get("amount")),
        method,
        PAYMENT_KINDS.get(method, "Cash") if method is not None else "Cash",
    )


@thorough
@given(payments)
def test_payment_row(document):
    body = orjson.dumps(document)
    row = rules.payment_row(body)
    assert row == expected_payment_row(document)
    assert rules.payment_row(body.decode()) == row


def payment(**overrides) -> dict:
    return {
        "payment_id": "p1",
        "order_id": "o1",
        "payment_time": "2026-02-08T10:31:00+05:30",
        "amount": 75,
        "payment_method": "PayPal",
        "payment_status": "Success",
        **overrides,
    }


def test_payment_row_example():
    row = rules.payment_row(orjson.dumps(payment()))
    assert row == ("o1", "p1", dt.datetime(2026, 2, 8, 5, 1), 75.0, "PayPal", "Online")
    assert type(row[3]) is float


@pytest.mark.parametrize("status", ["Failed", "Pending", None, 0, "anything"])
def test_payment_status_is_ignored(status):
    with_status = rules.payment_row(orjson.dumps(payment(payment_status=status)))
    without = payment()
    del without["payment_status"]
    assert with_status == rules.payment_row(orjson.dumps(without))


def test_payment_fields_of_the_wrong_type_read_as_null():
    document = payment(order_id=1, payment_id=None, payment_time=0, amount="75", payment_method=3)
    assert rules.payment_row(orjson.dumps(document)) == (None, None, None, None, None, "Cash")
    assert rules.payment_row(b"{}") == (None, None, None, None, None, "Cash")
    assert rules.payment_row(orjson.dumps(payment(amount=True)))[3] is None


def test_fact_row_has_the_20_columns_in_ddl_order():
    (seat, _) = rules.booking_rows(orjson.dumps(booking(event_name="Movie Night")))
    paid = rules.payment_row(orjson.dumps(payment(payment_status="Failed")))
    booking_micros = datetime_to_micros(dt.datetime(2026, 2, 8, 10, 30, 0, 1))
    payment_micros = booking_micros + TWO_MINUTES
    row = dict(
        zip(
            FACT_COLUMN_NAMES,
            rules.fact_row(seat, booking_micros, paid, payment_micros),
            strict=True,
        )
    )
    assert row == {
        "order_id": "o1",
        "booking_time": dt.datetime(2026, 2, 8, 10, 30),
        "customer_id": "c1",
        "customer_name": "Ana",
        "customer_email": "ana@example.com",
        "event_id": "e1",
        "event_name": "Movie Night",
        "event_location": "1 Main St",
        "seat_number": "A1",
        "seat_price": 75.0,
        "event_category": "Cinema",
        "booking_day_of_week": "Sunday",
        "booking_hour": 10,
        "payment_id": "p1",
        "payment_time": dt.datetime(2026, 2, 8, 5, 1),
        "amount": 75.0,
        "payment_method": "PayPal",
        "payment_type": "Online",
        "booking_event_time": dt.datetime(2026, 2, 8, 10, 30, 0, 1),
        "payment_event_time": dt.datetime(2026, 2, 8, 10, 32, 0, 1),
    }


enqueued_micros = st.datetimes(
    min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1)
).map(datetime_to_micros)


@thorough
@given(
    seated_bookings,
    payments,
    enqueued_micros,
    enqueued_micros,
)
def test_fact_row_joins_the_columns_by_name(booking_document, payment_document, b_us, p_us):
    booking_names = FACT_COLUMN_NAMES[:13]
    payment_names = ("order_id", "payment_id", "payment_time", "amount")
    payment_names += ("payment_method", "payment_type")
    paid = rules.payment_row(orjson.dumps(payment_document))
    for seat in rules.booking_rows(orjson.dumps(booking_document)):
        fact = rules.fact_row(seat, b_us, paid, p_us)
        assert len(fact) == len(FACT_COLUMN_NAMES) == 20
        columns = dict(zip(FACT_COLUMN_NAMES, fact, strict=True))
        assert columns == {
            **dict(zip(booking_names, seat, strict=True)),
            # The booking's order_id is the fact's: the payment's equals it whenever they join.
            **{k: v for k, v in zip(payment_names, paid, strict=True) if k != "order_id"},
            "booking_event_time": micros_to_datetime(b_us),
            "payment_event_time": micros_to_datetime(p_us),
        }
        assert columns["booking_event_time"] == dt.datetime(1970, 1, 1) + dt.timedelta(
            microseconds=b_us
        )
