"""The reference evaluator runs the kept query file, follows edits to it, and refuses guesses."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
import sqlglot
from sqlglot import exp

from pipeline.parity.evaluator import DEFAULT_QUERY, UnsupportedConstruct, evaluate, translate
from pipeline.schema import BOOKING_HUB, FACT_COLUMN_NAMES, PAYMENT_HUB
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
    ],
)
def test_what_it_does_not_understand_is_an_explicit_error(tmp_path, old, new, construct):
    with pytest.raises(UnsupportedConstruct, match=re.escape(construct)):
        evaluate(events(), edited(tmp_path, old, new))


def test_unreadable_events_are_reported_not_evaluated():
    bad = [
        hub_event(BOOKING_HUB, T0, b"{nope", sequence=5),
        hub_event(PAYMENT_HUB, T0, b"[1]", sequence=6),
        hub_event(PAYMENT_HUB, T0, b"\xff", sequence=7),
    ]
    result = evaluate(events() + bad)
    assert sorted(e.sequence_number for e in result.unreadable) == [5, 6, 7]
    assert len(result.rows) == 2


def test_the_translation_is_duckdb_sql():
    sql, _ = translate(DEFAULT_QUERY.read_text())
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
    statements = sqlglot.parse((SQL / "synapse_create_table.sql").read_text(), read="tsql")
    tables = {
        s.this.this.name: [c.name for c in s.this.expressions]
        for s in statements
        if isinstance(s, exp.Create) and s.kind == "TABLE"
    }
    assert tables["bookings_fact"] == list(FACT_COLUMN_NAMES)
    assert tables["dead_letters"] == [
        "hub",
        "partition",
        "sequence_number",
        "enqueued_time",
        "body",
        "reason",
    ]
    # sqlglot has no grammar for these two; check their shape instead
    commands = [s.sql("tsql", comments=False) for s in statements if isinstance(s, exp.Command)]
    assert len(commands) == 2
    assert re.fullmatch(r"CREATE USER \[[\w-]+\] FROM EXTERNAL PROVIDER", commands[0])
    assert re.fullmatch(r"GRANT SELECT, INSERT ON SCHEMA::bookymyshow TO \[[\w-]+\]", commands[1])
    create = next(s for s in statements if isinstance(s, exp.Create) and s.kind == "TABLE")
    assert "DISTRIBUTION=HASH(order_id)" in create.sql("tsql").replace(" ", "")
