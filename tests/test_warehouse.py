"""The warehouse sink for real, on SQLite and on PostgreSQL (``scripts/setup-services``): row
identity enforced by the database, validation against the DDL, refused rows isolated by
bisection, transient failures waited out, and readers."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
from collections import Counter

import apache_beam as beam
import pytest
import sqlalchemy as sa
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from pipeline.io.hubs import progress
from pipeline.io.warehouses import (
    WriteToWarehouse,
    create_engine,
    read_dead_letters,
    read_facts,
    write_rows,
)
from pipeline.io.warehouses.base import WarehouseUnavailable, row_checker
from pipeline.schema import (
    BOOKING_HUB,
    FACT_COLUMN_NAMES,
    FACT_SCHEMA,
    PAYMENT_HUB,
    DeadLetter,
    datetime_to_micros,
    decode_fact_row,
)
from tests.conftest import POSTGRES_URL, one_row_batches, postgres_or_skip

NAME = FACT_COLUMN_NAMES.index("customer_name")
PRICE = FACT_COLUMN_NAMES.index("seat_price")
METHOD = FACT_COLUMN_NAMES.index("payment_method")


@pytest.fixture(params=["sqlite", "postgresql"])
def warehouse(request, tmp_path):
    """(url, fact table name): a fresh SQLite file in a folder that does not exist yet, or a
    fresh fact table in the PostgreSQL test database (dropped afterwards)."""
    table = f"facts_{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        folder = tmp_path / "not" / "yet"
        folder.mkdir(parents=True)
        yield f"sqlite:///{folder / 'warehouse.db'}", table
        return
    engine = postgres_or_skip()
    yield POSTGRES_URL, table
    with engine.begin() as connection:
        connection.execute(sa.text(f'DROP TABLE IF EXISTS {FACT_SCHEMA}."{table}"'))
    engine.dispose()


def fact(n: int, partition: str = "0") -> tuple:
    """A fact row with microsecond times, unicode, NULLs, floats and an int, and its row key:
    seat 0 of booking n and payment n, both in ``partition`` of their hubs."""
    booked = dt.datetime(2026, 2, 8, 23, 59, 59, 999_999) + dt.timedelta(microseconds=n)
    paid = booked + dt.timedelta(seconds=120)
    return (
        f"o{n}", booked, "c1", "Zoë Ünicode ✓", None, "e1", "Rock Concert", "1 Main St",
        f"A{n}", 75.25 + n, "Music", "Sunday", 23, f"p{n}", None, 0.1, "PayPal", "Online",
        booked, paid, f"{partition}:{n}:0/{partition}:{n}",
    )  # fmt: skip


def run_write(rows, url, **kwargs):
    """Writes rows through the sink in a real Beam pipeline, and the dead letters of refused
    fact rows into the dead-letter table as the job does; returns (result, those letters)."""
    pipeline = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions())
    refused = (
        pipeline
        | beam.Create(rows)
        | one_row_batches()
        | "Write" >> WriteToWarehouse(url, **kwargs)
    )
    if kwargs.get("target", "facts") == "facts":
        deadline = {k: v for k, v in kwargs.items() if k == "retry_deadline"}
        _ = (
            refused
            | one_row_batches("RefusedBatches")
            | "Refused" >> WriteToWarehouse(url, "dead_letters", **deadline)
        )
    result = pipeline.run()
    result.wait_until_finish()
    keys = {row[-1] for row in rows}
    return result, [letter for letter in read_dead_letters(url) if letter.row_key in keys]


def counter(result, name: str) -> int:
    found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(c.committed for c in found)


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
        result, _ = run_write(rows, url, fact_table=table, batch_size=5)
    assert sum(sizes) == 23 and max(sizes) <= 5
    assert counter(result, "facts_written") == 23 and counter(result, "facts_received") == 23
    back = read_facts(url, table=table)
    assert Counter(back) == Counter(row[:20] for row in rows)
    one = next(row for row in back if row[0] == "o7")
    assert one[1] == dt.datetime(2026, 2, 9, 0, 0, 0, 6) and one[1].tzinfo is None
    assert isinstance(one[9], float) and isinstance(one[12], int) and one[4] is None


def test_a_row_key_is_written_once_however_often_it_comes(warehouse):
    url, table = warehouse
    rows = [fact(n) for n in range(6)]
    run_write(rows[:4], url, fact_table=table, batch_size=3)
    # A replay: rows already there, a row twice in one batch, and new ones.
    result, _ = run_write([*rows, rows[5], rows[1]], url, fact_table=table, batch_size=3)
    assert Counter(read_facts(url, table=table)) == Counter(row[:20] for row in rows)
    assert counter(result, "facts_written") == 2
    assert counter(result, "facts_already_present") == 6


def test_rows_equal_in_every_column_but_the_key_are_all_kept(warehouse):
    # ASA's output repeats rows: the same seat number twice in a booking, a booking message sent
    # twice, seats without a number. Only where they came from tells them apart.
    url, table = warehouse
    twin = fact(1)
    rows = [twin, twin[:20] + ("0:1:1/1:1",), twin[:20] + ("0:2:0/1:1",)]
    run_write(rows, url, fact_table=table)
    run_write(rows, url, fact_table=table)  # and a rerun adds none of them again
    assert Counter(read_facts(url, table=table)) == Counter({twin[:20]: 3})


def test_the_database_enforces_the_row_key(warehouse):
    url, table = warehouse
    write_rows(url, [], fact_table=table)  # creates the tables
    engine = create_engine(url)
    schema = None if engine.dialect.name == "sqlite" else FACT_SCHEMA
    try:
        indexes = sa.inspect(engine).get_indexes(table, schema=schema)
        assert {"column_names": ["row_key"], "unique": True}.items() <= next(
            index for index in indexes if index["column_names"] == ["row_key"]
        ).items()
        columns = sa.inspect(engine).get_columns(table, schema=schema)
    finally:
        engine.dispose()
    assert tuple(c["name"] for c in columns) == (*FACT_COLUMN_NAMES, "row_key")
    types = {c["name"]: c["type"] for c in columns}
    assert isinstance(types["seat_price"], sa.Float) and isinstance(types["amount"], sa.Float)
    assert isinstance(types["booking_hour"], sa.Integer)
    assert isinstance(types["booking_event_time"], sa.DateTime)
    assert isinstance(types["seat_number"], sa.String) and types["seat_number"].length == 10
    assert types["event_location"].length == 200
    assert [c["nullable"] for c in columns][:2] == [False, True] and not columns[-1]["nullable"]


def test_poison_values_become_dead_letters_and_every_good_row_is_written(warehouse):
    url, table = warehouse
    part = table[-8:]  # the dead-letter table is shared on PostgreSQL: keys of this test only
    good = [fact(n, part) for n in range(10)]
    too_long = fact(10, part)[:NAME] + ("x" * 1_000_000,) + fact(10, part)[NAME + 1 :]
    tiny_price = fact(11, part)[:PRICE] + (1e-320,) + fact(11, part)[PRICE + 1 :]  # < FLOAT's
    emoji = fact(12, part)[:METHOD] + ("🎟" * 26,) + fact(12, part)[METHOD + 1 :]  # 52 units
    rows = [*good[:5], too_long, tiny_price, emoji, *good[5:]]
    result, letters = run_write(rows, url, fact_table=table, batch_size=4)
    assert Counter(read_facts(url, table=table)) == Counter(row[:20] for row in good)
    assert counter(result, "facts_unstorable") == 3
    by_key = {letter.row_key: letter for letter in letters}
    assert by_key.keys() == {too_long[-1], tiny_price[-1], emoji[-1]}
    assert by_key[too_long[-1]].reason.startswith("unstorable fact row: column customer_name:")
    assert "NVARCHAR(100)" in by_key[too_long[-1]].reason
    assert by_key[tiny_price[-1]].reason.startswith("unstorable fact row: column seat_price:")
    # Where to find the event with the bad value, and the row itself to replay it.
    assert by_key[too_long[-1]][:4] == (BOOKING_HUB, part, 10, datetime_to_micros(too_long[18]))
    assert by_key[emoji[-1]][:3] == (PAYMENT_HUB, part, 12)
    assert decode_fact_row(by_key[too_long[-1]].body) == too_long
    assert all("x" * 50 not in letter.reason for letter in letters)  # no values in reasons


def test_nul_characters_are_dead_letters_only_where_the_database_cannot_hold_them(warehouse):
    url, table = warehouse
    part = table[-8:]
    with_nul = fact(1, part)[:NAME] + ("Ana\x00Bel",) + fact(1, part)[NAME + 1 :]
    _, letters = run_write([fact(0, part), with_nul], url, fact_table=table)
    stored = read_facts(url, table=table)
    if url.startswith("postgresql"):
        assert stored == [fact(0)[:20]] and [letter.row_key for letter in letters] == [with_nul[-1]]
        assert "NUL" in letters[0].reason
    else:
        assert sorted(stored) == sorted([fact(0)[:20], with_nul[:20]]) and letters == []


def test_rows_the_database_refuses_are_isolated_by_halving_the_batch():
    # A CHECK constraint the sink's own validation knows nothing about: only the database can
    # refuse these rows, and the sink must find them without holding back the good ones.
    engine = postgres_or_skip()
    table = f"facts_{uuid.uuid4().hex[:8]}"
    write_rows(POSTGRES_URL, [], fact_table=table)
    with engine.begin() as connection:
        connection.execute(
            sa.text(f'ALTER TABLE {FACT_SCHEMA}."{table}" ADD CHECK (seat_price < 80)')
        )
    try:
        rows = [fact(n, table[-8:]) for n in range(13)]  # prices 75.25 + n: n >= 5 refused
        result, letters = run_write(rows, POSTGRES_URL, fact_table=table, batch_size=8)
        assert sorted(read_facts(POSTGRES_URL, table=table)) == sorted(r[:20] for r in rows[:5])
        assert sorted(letter.row_key for letter in letters) == sorted(r[-1] for r in rows[5:])
        assert all("refused: CheckViolation" in letter.reason for letter in letters)
        assert counter(result, "facts_written") == 5
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text(f'DROP TABLE {FACT_SCHEMA}."{table}"'))
        engine.dispose()


def test_a_locked_sqlite_warehouse_is_waited_out(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    write_rows(url, [])
    blocker = sa.create_engine(url)
    connection = blocker.connect()
    connection.exec_driver_sql("BEGIN EXCLUSIVE")
    paused = []

    def release():
        deadline = time.monotonic() + 60
        while not progress.reading_paused() and time.monotonic() < deadline:
            time.sleep(0.05)
        paused.append(progress.reading_paused())
        connection.rollback()
        connection.close()

    threading.Thread(target=release, daemon=True).start()
    with (
        caplog.at_level(logging.WARNING),
        _sqlite_timeout(0.2),  # fail fast on the lock, so the sink's retries do the waiting
    ):
        result, _ = run_write([fact(0), fact(1)], url)
    blocker.dispose()
    assert paused == [True] and not progress.reading_paused()
    assert counter(result, "warehouse_write_retries") >= 1
    assert sorted(read_facts(url)) == sorted([fact(0)[:20], fact(1)[:20]])
    assert "reading paused" in caplog.text and "Zoë" not in caplog.text


@contextlib.contextmanager
def _sqlite_timeout(seconds: float):
    from pipeline.io.warehouses import sqldb

    original = sqldb.create_engine

    def quick(url):
        engine = original(url)
        engine.pool._creator = lambda: engine.dialect.dbapi.connect(
            engine.url.database, timeout=seconds, check_same_thread=False
        )
        return engine

    sqldb.create_engine = quick
    try:
        yield
    finally:
        sqldb.create_engine = original


def test_a_warehouse_down_past_the_deadline_fails_in_one_line_without_values(tmp_path):
    # Nothing listens on port 9: every connection is refused.
    url = "postgresql+psycopg://bms:secret@127.0.0.1:9/nowhere"
    with pytest.raises(WarehouseUnavailable) as raised:
        run_write([fact(0)], url, retry_deadline=1.5)
    message = str(raised.value)
    assert message.count("\n") == 0
    assert "127.0.0.1:9/nowhere" in message and "unavailable for" in message
    assert "secret" not in message and "Zoë" not in message and "o0" not in message
    assert not progress.reading_paused()


def test_a_table_without_row_identity_is_refused_in_one_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        columns = ", ".join(f"{name} TEXT" for name in FACT_COLUMN_NAMES)
        connection.execute(sa.text(f"CREATE TABLE bookings_fact ({columns})"))
    engine.dispose()
    with pytest.raises(Exception, match="no row_key column") as raised:
        run_write([fact(0)], url)
    assert "bookings_fact" in str(raised.value)


def test_dead_letters_keep_raw_bytes_microseconds_and_are_written_once(warehouse):
    url, _ = warehouse
    hub = f"hub-{uuid.uuid4().hex[:8]}"  # the dead-letter table is shared on PostgreSQL
    letters = [
        DeadLetter(
            hub, "3", n, 1_770_595_199_999_999 + n, b"\xff\x00{not json" + bytes([n]), "why",
            f"{hub}:3:{n}",
        )
        for n in range(7)
    ]  # fmt: skip
    run_write(letters[:3], url, target="dead_letters", batch_size=2)
    result, _ = run_write(letters, url, target="dead_letters", batch_size=2)
    back = [letter for letter in read_dead_letters(url) if letter.hub == hub]
    assert sorted(back) == sorted(letters)
    assert counter(result, "dead_letters_written") == 4


def test_refused_rows_keep_their_window_and_timestamp():
    # The sink's output (dead letters of refused rows) carries each row's own timestamp, so
    # commits downstream still wait for it.
    rows = [fact(0)[:NAME] + ("x" * 101,) + fact(0)[NAME + 1 :]]
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        refused = (
            pipeline
            | beam.Create(rows)
            | beam.Map(lambda row: beam.window.TimestampedValue(row, 1_770_000_000))
            | one_row_batches()
            | WriteToWarehouse("sqlite:///:memory:")
        )
        assert_that(
            refused | beam.Map(lambda letter, t=beam.DoFn.TimestampParam: (letter.row_key, t)),
            equal_to([(rows[0][-1], beam.utils.timestamp.Timestamp(1_770_000_000))]),
        )


def test_row_checker_accepts_every_value_the_pipeline_makes_and_names_the_column():
    check = row_checker("facts", nul_allowed=False)
    assert check(fact(0)) is None
    assert check(fact(0)[:20] + (None,)) == ("row_key", "NULL in a NOT NULL column")
    assert check(fact(0)[:12] + (2**31,) + fact(0)[13:])[0] == "booking_hour"
    assert check(fact(0)[:PRICE] + (float("nan"),) + fact(0)[PRICE + 1 :])[0] == "seat_price"
    assert check(fact(0)[:PRICE] + (-0.0,) + fact(0)[PRICE + 1 :]) is None
    assert check(fact(0)[:8] + ("😀" * 5,) + fact(0)[9:]) is None  # 10 UTF-16 units fit (10)
    assert check(fact(0)[:8] + ("😀" * 5 + "x",) + fact(0)[9:])[0] == "seat_number"


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
    with pytest.raises(ValueError, match="bms writes to"):
        WriteToWarehouse("mysql://host/db")
