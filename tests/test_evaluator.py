"""The reference evaluator runs the kept query file, follows edits to it, and refuses guesses."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
import sqlglot
from sqlglot import exp

from pipeline import rules
from pipeline.parity.evaluator import DEFAULT_QUERY, UnsupportedConstruct, evaluate, translate
from pipeline.schema import (
    BOOKING_HUB,
    DEAD_LETTER_COLUMNS,
    FACT_COLUMN_NAMES,
    FACT_TABLE_COLUMNS,
    PAYMENT_HUB,
)
from tests.conftest import booking_body, hub_event, payment_body

SECOND = 1_000_000
T0 = 1_770_000_000 * SECOND
SQL = Path(DEFAULT_QUERY).parent
CATEGORY = FACT_COLUMN_NAMES.index("event_category")


def events():
    return [
        hub_event(
            BOOKING_HUB,
            T0,
            booking_body("o1", seats=[{"seat_number": s, "price": 75} for s in ("A1", "A2")]),
        ),
        hub_event(BOOKING_HUB, T0, booking_body("o2", event_name="Broadway Play"), sequence=1),
        hub_event(PAYMENT_HUB, T0 + 60 * SECOND, payment_body("o1", "p1")),
        hub_event(PAYMENT_HUB, T0 + 240 * SECOND, payment_body("o2", "p2"), sequence=1),
    ]


def edited(tmp_path, old, new):
    text = DEFAULT_QUERY.read_text()
    assert old in text
    path = tmp_path / "query.sql"
    path.write_text(text.replace(old, new))
    return path


def test_the_kept_query_gives_the_20_fact_columns():
    result = evaluate(events())
    assert result.columns == FACT_COLUMN_NAMES
    assert sorted((row[0], row[8], row[13]) for row in result.rows) == [
        ("o1", "A1", "p1"),
        ("o1", "A2", "p1"),
    ]
    row = dict(zip(result.columns, result.rows[0], strict=True))
    assert row["booking_event_time"] == dt.datetime(2026, 2, 2, 2, 40)
    assert row["seat_price"] == 75.0 and row["booking_hour"] == 10
    assert row["booking_day_of_week"] == "Sunday" and row["payment_type"] == "Card"


def test_an_edited_case_mapping_changes_the_output(tmp_path):
    query = edited(tmp_path, "THEN 'Music'", "THEN 'Concerts'")
    assert {row[CATEGORY] for row in evaluate(events(), query).rows} == {"Concerts"}


def test_an_edited_join_bound_changes_the_output(tmp_path):
    query = edited(tmp_path, "BETWEEN 0 AND 2", "BETWEEN 0 AND 5")
    assert sorted(row[13] for row in evaluate(events(), query).rows) == ["p1", "p1", "p2"]


def test_a_dropped_column_is_dropped_from_the_output(tmp_path):
    query = edited(tmp_path, "    b.customer_email,\n", "")
    result = evaluate(events(), query)
    assert "customer_email" not in result.columns and len(result.rows[0]) == 19


@pytest.mark.parametrize(
    ("old", "new", "construct"),
    [
        ("DATEPART(hour,", "DATEPART(minute,", "DATEPART(minute"),
        ("DATEDIFF(minute, b, p)", "DATEDIFF(week, b, p)", "DATEDIFF unit WEEK"),
        ("GetArrayElements(", "GetRecordProperties(", "CROSS APPLY GETRECORDPROPERTIES"),
        ("seat.ArrayValue.price", "seat.ArrayIndex", "only ArrayValue"),
        ("FROM [payments] p", "FROM [refunds] p", "unknown input or step 'refunds'"),
        ("JOIN TransformedPaymentStream p", "LEFT JOIN TransformedPaymentStream p", "LEFT"),
        ("p.amount,", "UPPER(p.amount) AS amount,", "Upper"),
        ("FROM [bookings] b", "FROM [bookings] b TIMESTAMP BY b.booking_time", "TIMESTAMP BY"),
        ("FROM [payments] p", "FROM [payments] p WHERE p.amount > 0", "WHERE"),
        (
            "    SELECT\n        p.payment_id",
            "    SELECT TOP 5\n        p.payment_id",
            "TOP in a step",
        ),
        ("    AND DATEDIFF(minute, b, p) BETWEEN 0 AND 2", "", "without a DATEDIFF time bound"),
        ("BETWEEN 0 AND 2", "BETWEEN 0 AND", "not readable as T-SQL"),
    ],
)
def test_what_it_does_not_understand_is_an_explicit_error(tmp_path, old, new, construct):
    with pytest.raises(UnsupportedConstruct, match=re.escape(construct)):
        evaluate(events(), edited(tmp_path, old, new))


def test_events_asa_cannot_read_are_dropped_with_a_reason():
    seats_not_array = booking_body("o1", seats="A1")
    bad = {
        b"{nope": "malformed JSON",
        b"[1]": "not a JSON object: the body is a JSON array",
        b"\xff": "not UTF-8 text",
        b'{"order_id": "o1", "amount": NaN}': "NaN is not JSON",
        b'{"order_id": "o1",}': "malformed JSON",
        b'{"order_id": "o1", "amount": 1e400}': "out of a double's range",
        b'{"order_id": "o1\\ud800"}': "unpaired surrogate",
        seats_not_array: "b.event_details.seats is not an array",
    }
    hub = {seats_not_array: BOOKING_HUB}
    dropped_events = [
        hub_event(hub.get(body, PAYMENT_HUB), T0, body, sequence=10 + n)
        for n, body in enumerate(bad)
    ]
    result = evaluate(events() + dropped_events)
    reasons = {letter.sequence_number: letter.reason for letter in result.dropped}
    assert sorted(reasons) == [event.sequence_number for event in dropped_events]
    for event, expected in zip(dropped_events, bad.values(), strict=True):
        assert expected in reasons[event.sequence_number]
    assert sorted((row[0], row[8], row[13]) for row in result.rows) == [
        ("o1", "A1", "p1"),
        ("o1", "A2", "p1"),
    ]


def test_a_repeated_key_keeps_its_last_value():
    body = booking_body("o1").replace(b'"order_id":"o1"', b'"order_id":"o0","order_id":"o1"')
    payment = hub_event(PAYMENT_HUB, T0, payment_body("o1"))
    assert [row[0] for row in evaluate([hub_event(BOOKING_HUB, T0, body), payment]).rows] == ["o1"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-02-08T10:30:00Z", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08 10:30", dt.datetime(2026, 2, 8, 10, 30)),
        ("2026-02-08", dt.datetime(2026, 2, 8)),
        ("2026-02-08T10:30:00.9999999", dt.datetime(2026, 2, 8, 10, 30, 0, 999999)),
        ("2026-02-08T23:30:00-08:00", dt.datetime(2026, 2, 9, 7, 30)),
        ("2026-02-08T10:30:00+0530", dt.datetime(2026, 2, 8, 5)),
        ("2026-02-08T10:30:00+14:00", dt.datetime(2026, 2, 7, 20, 30)),
        ("\t2026-02-08T10:30:00Z\u3000", dt.datetime(2026, 2, 8, 10, 30)),
        ("0001-01-01T00:00:00-01:00", dt.datetime(1, 1, 1, 1)),
        ("2026-02-08T10:30:00+14:01", None),
        ("2026-02-08T24:00:00", None),
        ("2026-02-08T23:59:60", None),
        ("2026-02-30", None),
        ("0000-01-01", None),
        ("0001-01-01T00:00:00+01:00", None),  # before year 1 in UTC
        ("9999-12-31T23:00:00-02:00", None),  # after year 9999 in UTC
        ("2026-02-08T10:30:00,5", None),
        ("2026-02-08T1:30:00", None),
        ("２０２６-02-08", None),  # not ASCII digits
        ("soon", None),
        (1770000000, None),
    ],
)
def test_try_cast_reads_iso_8601_as_utc(text, expected):
    booking = hub_event(BOOKING_HUB, T0, booking_body("o1", booking_time=text))
    payment = hub_event(PAYMENT_HUB, T0, payment_body("o1"))
    (row,) = evaluate([booking, payment]).rows
    booked = dict(zip(FACT_COLUMN_NAMES, row, strict=True))
    assert booked["booking_time"] == expected
    assert booked["booking_hour"] == (expected.hour if expected else None)


def test_the_translation_is_duckdb_sql():
    sql = translate(DEFAULT_QUERY.read_text()).sql
    assert sqlglot.parse_one(sql, read="duckdb").find(exp.Join) is not None


def test_the_asa_query_parses_as_t_sql():
    tree = sqlglot.parse_one(DEFAULT_QUERY.read_text(), read="tsql")
    assert [cte.alias for cte in tree.args["with_"].expressions] == [
        "TransformedBookingStream",
        "TransformedPaymentStream",
    ]
    assert tree.args["into"].this.name == "bookings-synapse"
    assert [e.alias_or_name for e in tree.expressions] == list(FACT_COLUMN_NAMES)


def test_every_synapse_statement_parses_as_t_sql():
    text = (SQL / "synapse_create_table.sql").read_text()
    # sqlglot has no grammar for a dedicated pool's index options: check them, then parse
    # without them. GO ends a batch (sqlcmd's separator, never sent to the server).
    options = {
        "WITH (DISTRIBUTION = HASH(order_id), CLUSTERED INDEX (booking_event_time));": (
            "WITH (DISTRIBUTION = HASH(order_id));"
        ),
        "WITH (DISTRIBUTION = HASH(row_key), CLUSTERED INDEX (row_key));": (
            "WITH (DISTRIBUTION = HASH(row_key));"
        ),
    }
    for dedicated, parseable in options.items():
        assert text.count(dedicated) == 1
        text = text.replace(dedicated, parseable)
    statements = [
        statement
        for batch in re.split(r"(?m)^GO$", text)
        for statement in sqlglot.parse(batch, read="tsql")
        if statement is not None
    ]
    creates = [c for s in statements for c in s.find_all(exp.Create) if c.kind == "TABLE"]
    tables = {
        c.this.this.name: [(col.name, col.args["kind"].sql("tsql")) for col in c.this.expressions]
        for c in creates
    }
    assert tables["bookings_fact"] == [  # the names, order and types of pipeline.schema
        (column.name, exp.DataType.build(column.sql_type, dialect="tsql").sql("tsql"))
        for column in FACT_TABLE_COLUMNS
    ]
    assert [name for name, _ in tables["dead_letters"]] == [c.name for c in DEAD_LETTER_COLUMNS]
    # every table and the schema only if missing: the file can run again
    guards = [s for s in statements if isinstance(s, exp.IfBlock)]
    assert len(guards) == 4 and all(" IS NULL" in s.this.sql("tsql") for s in guards)
    # sqlglot has no grammar for these three; check their shape instead
    commands = [c.sql("tsql", comments=False) for s in statements for c in s.find_all(exp.Command)]
    assert len(commands) == 3
    assert re.fullmatch(r"CREATE USER \[[\w-]+\] FROM EXTERNAL PROVIDER", commands[0])
    assert re.fullmatch(r"GRANT SELECT, INSERT ON SCHEMA::bookymyshow TO \[[\w-]+\]", commands[1])
    assert re.fullmatch(r"GRANT ADMINISTER DATABASE BULK OPERATIONS TO \[[\w-]+\]", commands[2])
    assert "db_owner" not in " ".join(commands)


def test_the_assumption_switches_are_followed_or_refused(monkeypatch):
    booking = hub_event(BOOKING_HUB, T0, booking_body("o1"))
    on_the_bound = hub_event(PAYMENT_HUB, T0 + 120 * SECOND, payment_body("o1"))
    assert len(evaluate([booking, on_the_bound]).rows) == 1
    monkeypatch.setattr(rules, "JOIN_UPPER_BOUND_INCLUSIVE", False)
    assert evaluate([booking, on_the_bound]).rows == []
    monkeypatch.setattr(rules, "CASE_SENSITIVE_MATCHING", False)
    with pytest.raises(UnsupportedConstruct, match="case-insensitive matching"):
        evaluate([booking, on_the_bound])


def test_each_property_path_is_loaded_once_per_event():
    """Seat rows never read their booking's document: each path the query reads is extracted
    once per event as the events are loaded (a 10,000-seat booking once cost 10,000 parses of
    the whole booking per path)."""
    translation = translate(DEFAULT_QUERY.read_text())
    bookings = {column.path: column.elements for column in translation.inputs["bookings"]}
    assert bookings[("event_details", "seats")] is True  # the GetArrayElements argument
    assert bookings[("customer", "name")] is False
    assert ("order_id",) in {column.path for column in translation.inputs["payments"]}
    assert re.findall(r"json_extract\((\S+?),", translation.sql) == ['"seat".value'] * 2


def test_a_path_both_read_and_unnested_is_loaded_for_both(tmp_path):
    query = edited(
        tmp_path,
        "b.event_details.event_location AS event_location",
        "b.event_details.seats AS event_location",
    )
    seats = [{"seat_number": "A1", "price": 75}, {"seat_number": "A2", "price": 75}]
    booking = hub_event(BOOKING_HUB, T0, booking_body("o1", seats=seats))
    payment = hub_event(PAYMENT_HUB, T0, payment_body("o1"))
    rows = evaluate([booking, payment], query).rows
    location = FACT_COLUMN_NAMES.index("event_location")
    assert sorted(row[8] for row in rows) == ["A1", "A2"]
    assert {row[location] for row in rows} == {None}  # an array is not text
