"""The warehouse sink and its readers, for real: on SQLite always, on PostgreSQL when it runs
(``scripts/setup-services``). Batches, column layout and types, appends, dead letters."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from collections import Counter

import apache_beam as beam
import pytest
import sqlalchemy as sa
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.io.warehouse import (
    WriteToWarehouse,
    create_engine,
    read_dead_letters,
    read_facts,
    write_rows,
)
from pipeline.schema import FACT_COLUMN_NAMES, FACT_SCHEMA, DeadLetter

POSTGRES_URL = os.environ.get(
    "BMS_TEST_POSTGRES_URL", "postgresql+psycopg://bms:bms@127.0.0.1:5432/bms_test"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def warehouse(request, tmp_path):
    """(url, fact table name): a fresh SQLite file in a folder that does not exist yet, or a
    fresh fact table in the PostgreSQL test database (dropped afterwards)."""
    table = f"facts_{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'not' / 'yet' / 'warehouse.db'}", table
        return
    pytest.importorskip("psycopg")
    engine = sa.create_engine(POSTGRES_URL)
    try:
        engine.connect().close()
    except sa.exc.OperationalError as error:
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} ({error.orig}); run scripts/setup-services")
    yield POSTGRES_URL, table
    with engine.begin() as connection:
        connection.execute(sa.text(f'DROP TABLE IF EXISTS {FACT_SCHEMA}."{table}"'))
    engine.dispose()


def fact(n: int) -> tuple:
    """A fact row with microsecond times, unicode, NULLs, floats and an int."""
    booked = dt.datetime(2026, 2, 8, 23, 59, 59, 999_999) + dt.timedelta(microseconds=n)
    paid = booked + dt.timedelta(seconds=120)
    return (
        f"o{n}", booked, "c1", "Zoë Ünicode ✓", None, "e1", "Rock Concert", "1 Main St",
        f"A{n}", 75.25 + n, "Music", "Sunday", 23, f"p{n}", None, 0.1, "PayPal", "Online",
        booked, paid,
    )  # fmt: skip


def run_write(rows, url, **kwargs):
    pipeline = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions())
    _ = pipeline | beam.Create(rows) | WriteToWarehouse(url, **kwargs)
    result = pipeline.run()
    result.wait_until_finish()
    return result


@contextlib.contextmanager
def inserts_into(table: str):
    """Records the number of rows of every INSERT into ``table`` issued by any engine."""
    sizes: list[int] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO") and table in statement.split("(")[0]:
            sizes.append(len(parameters) if executemany else 1)

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        yield sizes
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)


def test_rows_are_written_in_batches_and_read_back_exactly(warehouse):
    url, table = warehouse
    rows = [fact(n) for n in range(23)]
    with inserts_into(table) as sizes:
        result = run_write(rows, url, fact_table=table, batch_size=5)
    assert sum(sizes) == 23 and max(sizes) <= 5 and len(sizes) < 23
    written = result.metrics().query(MetricsFilter().with_name("facts_written"))["counters"]
    assert sum(counter.committed for counter in written) == 23
    back = read_facts(url, table=table)
    assert Counter(back) == Counter(rows)
    one = next(row for row in back if row[0] == "o7")
    assert one[1] == dt.datetime(2026, 2, 9, 0, 0, 0, 6) and one[1].tzinfo is None
    assert isinstance(one[9], float) and isinstance(one[12], int) and one[4] is None


def test_a_second_write_appends_and_the_table_keeps_its_layout(warehouse):
    url, table = warehouse
    rows = [fact(n) for n in range(3)]
    write_rows(url, rows, fact_table=table)
    run_write(rows, url, fact_table=table)  # the sink finds the table and appends
    assert Counter(read_facts(url, table=table)) == Counter(rows * 2)

    engine = create_engine(url)
    try:
        schema = None if engine.dialect.name == "sqlite" else FACT_SCHEMA
        columns = sa.inspect(engine).get_columns(table, schema=schema)
    finally:
        engine.dispose()
    assert tuple(c["name"] for c in columns) == FACT_COLUMN_NAMES
    types = {c["name"]: c["type"] for c in columns}
    assert isinstance(types["seat_price"], sa.Float) and isinstance(types["amount"], sa.Float)
    assert isinstance(types["booking_hour"], sa.Integer)
    assert isinstance(types["booking_event_time"], sa.DateTime)
    assert isinstance(types["seat_number"], sa.String) and types["seat_number"].length == 10
    assert types["event_location"].length == 200
    assert [c["nullable"] for c in columns][:2] == [False, True]


def test_idempotent_writes_add_only_rows_whose_natural_key_is_new(warehouse):
    url, table = warehouse
    rows = [fact(n) for n in range(6)]
    with_null_key = fact(6)[:8] + (None,) + fact(6)[9:]  # NULL seat_number equals NULL
    write_rows(url, [*rows[:4], with_null_key], fact_table=table)
    replay = [*rows, with_null_key, rows[5], rows[2][:10] + ("Other",) + rows[2][11:]]
    result = run_write(replay, url, fact_table=table, batch_size=3, idempotent=True)
    # New: o4 and o5 once each; o2 with another category has the same key, so it is not new.
    assert Counter(read_facts(url, table=table)) == Counter([*rows, with_null_key])
    written = result.metrics().query(MetricsFilter().with_name("facts_written"))["counters"]
    assert sum(counter.committed for counter in written) == 2


def test_idempotent_dead_letters_are_keyed_by_their_place_in_the_hub(warehouse):
    url, _ = warehouse
    hub = f"hub-{uuid.uuid4().hex[:8]}"
    letters = [DeadLetter(hub, "0", n, 1_770_595_199_999_999, b"x", "why") for n in range(3)]
    run_write(letters[:2], url, target="dead_letters", idempotent=True)
    run_write(letters, url, target="dead_letters", idempotent=True)
    back = [letter for letter in read_dead_letters(url) if letter.hub == hub]
    assert sorted(back) == letters


def test_dead_letters_keep_raw_bytes_and_microseconds(warehouse):
    url, _ = warehouse
    hub = f"hub-{uuid.uuid4().hex[:8]}"  # the dead-letter table is shared on PostgreSQL
    letters = [
        DeadLetter(hub, "3", n, 1_770_595_199_999_999 + n, b"\xff{not json" + bytes([n]), "why")
        for n in range(7)
    ]
    run_write(letters, url, target="dead_letters", batch_size=2)
    back = [letter for letter in read_dead_letters(url) if letter.hub == hub]
    assert sorted(back) == sorted(letters)


def test_read_facts_names_what_is_missing(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    with pytest.raises(ValueError, match="no table nope"):
        read_facts(url, table="nope")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE half (order_id TEXT, booking_time TEXT)"))
    engine.dispose()
    with pytest.raises(ValueError, match="no column.*customer_id"):
        read_facts(url, table="half")


def test_the_sink_checks_its_arguments_at_construction():
    with pytest.raises(ValueError, match="target"):
        WriteToWarehouse("sqlite:///w.db", "facts_and_more")
    with pytest.raises(ValueError, match="batch_size"):
        WriteToWarehouse("sqlite:///w.db", batch_size=0)
    with pytest.raises(sa.exc.ArgumentError):
        WriteToWarehouse("not a url")
