"""The Synapse writer: its T-SQL parsed with sqlglot, and its pyodbc code path run for real against
PostgreSQL through the Debian ODBC driver (scripts/setup-services), plus live tests."""

from __future__ import annotations

import datetime as dt
import os
import struct
import sys
import uuid

import apache_beam as beam
import pytest
import sqlglot
from apache_beam.testing.test_pipeline import TestPipeline

from pipeline.errors import UsageError
from pipeline.io import synapse
from pipeline.io.synapse import (
    DEAD_LETTERS,
    FACTS,
    POSTGRES,
    TSQL,
    SynapseWriter,
    Target,
    WarehouseWriteError,
    access_token_attribute,
    column_mismatch,
    create_staging_statement,
    insert_statement,
    is_transient,
    merge_staging_statement,
    parse_target,
)
from pipeline.io.warehouse import WriteToWarehouse
from pipeline.schema import FACT_COLUMN_NAMES, DeadLetter

ODBC = os.environ.get(
    "BMS_TEST_ODBC",
    "Driver={PostgreSQL Unicode};Server=127.0.0.1;Port=5432;Database=bms_test;Uid=bms;Pwd=bms",
)


# ---- the T-SQL the writer issues, parsed as T-SQL ----


def tsql_statements():
    for table in (FACTS, DEAD_LETTERS):
        yield insert_statement(table)
        yield synapse.stage_statement(table, TSQL)
        yield create_staging_statement(table, TSQL)
        yield merge_staging_statement(table, TSQL)
    yield synapse.clear_staging_statement(TSQL)
    yield synapse.columns_query()


@pytest.mark.parametrize("statement", list(tsql_statements()))
def test_every_tsql_statement_parses_as_tsql(statement):
    parsed = sqlglot.parse(statement, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
    assert len(parsed) == 1 and parsed[0] is not None


def test_inserts_are_single_row_and_parameterised_for_all_20_columns():
    insert = sqlglot.parse_one(insert_statement(FACTS), read="tsql")
    assert [c.name for c in insert.this.expressions] == list(FACT_COLUMN_NAMES)
    (row,) = insert.expression.expressions  # one VALUES tuple: dedicated pools reject more
    assert len(row.expressions) == 20
    assert all(isinstance(value, sqlglot.exp.Placeholder) for value in row.expressions)


def test_idempotent_insert_checks_the_natural_key_against_the_target():
    merge = sqlglot.parse_one(merge_staging_statement(FACTS, TSQL), read="tsql")
    exists = merge.find(sqlglot.exp.Exists)
    compared = {column.name for column in exists.find_all(sqlglot.exp.Column)}
    assert compared == set(FACTS.key)
    staging = sqlglot.parse_one(create_staging_statement(FACTS, TSQL), read="tsql")
    name = staging.find(sqlglot.exp.Table).this
    assert name.name == "bms_staging" and name.args["temporary"]  # a #session temp table


# ---- pure parts ----


def test_access_token_is_length_prefixed_utf16le():
    attribute = access_token_attribute("eyJ0eXAi.token")
    (length,) = struct.unpack_from("<I", attribute)
    assert length == len("eyJ0eXAi.token") * 2 == len(attribute) - 4
    assert attribute[4:].decode("utf-16-le") == "eyJ0eXAi.token"


@pytest.mark.parametrize(
    ("sqlstate", "message", "transient"),
    [
        (
            "08S01",
            "[Microsoft][ODBC Driver 18 for SQL Server]TCP Provider: Error code 0x68 (104)",
            True,
        ),
        (
            "40001",
            "[SQL Server]Transaction (Process ID 52) was deadlocked (1205) (SQLExecDirectW)",
            True,
        ),
        (
            "42000",
            "[Microsoft][SQL Server]The service is currently busy. (40501) (SQLExecDirectW)",
            True,
        ),
        (
            "42000",
            "[SQL Server]Database is not currently available. (40613) (SQLDriverConnect)",
            True,
        ),
        ("HY000", "[Microsoft][SQL Server]Not enough resources. (49918) (SQLExecDirectW)", True),
        ("42S02", "[Microsoft][SQL Server]Invalid object name 'x'. (208) (SQLExecDirectW)", False),
        (
            "28000",
            "[Microsoft][SQL Server]Login failed for user 'bms'. (18456) (SQLDriverConnect)",
            False,
        ),
        ("22001", "[22001] ERROR: value too long (1) (SQLExecDirectW)", False),
    ],
)
def test_transient_errors_are_told_apart(sqlstate, message, transient):
    pyodbc = pytest.importorskip("pyodbc")
    assert is_transient(pyodbc.Error(sqlstate, message)) is transient


def test_column_mismatch_messages():
    assert column_mismatch(FACTS, [n.upper() for n in FACT_COLUMN_NAMES]) is None
    assert "does not exist; create it with sql/synapse_create_table.sql" in column_mismatch(
        FACTS, []
    )
    problem = column_mismatch(FACTS, [*FACT_COLUMN_NAMES[:-1], "payment_time_utc"])
    assert "missing payment_event_time; unexpected payment_time_utc" in problem


def test_targets_from_urls_and_odbc_strings(monkeypatch):
    target = parse_target("mssql+pyodbc://ws.sql.azuresynapse.net/pool")
    assert target.dialect == TSQL and target.idempotent
    assert "Driver={ODBC Driver 18 for SQL Server};Server=tcp:ws.sql.azuresynapse.net;" in (
        target.connection_string
    )
    assert "Database=pool;Encrypt=yes" in target.connection_string
    plain = parse_target("mssql+pyodbc://bms@ws.sql.azuresynapse.net:1433/pool?idempotent=false")
    assert (
        not plain.idempotent
        and "Server=tcp:ws.sql.azuresynapse.net,1433" in plain.connection_string
    )
    assert ";UID=bms" in plain.connection_string
    assert parse_target(ODBC) == Target(ODBC, POSTGRES, True)
    assert "Pwd=***" in repr(parse_target(ODBC))
    with pytest.raises(UsageError, match="SYNAPSE_PASSWORD"):
        parse_target("mssql+pyodbc://bms:secret@ws/pool")
    with pytest.raises(UsageError, match="server and a database"):
        parse_target("mssql+pyodbc://ws.sql.azuresynapse.net")


def test_access_token_goes_to_the_driver_before_connecting(monkeypatch):
    """Microsoft's driver is not installable here: capture what pyodbc.connect is given."""
    pyodbc = pytest.importorskip("pyodbc")
    monkeypatch.delenv(synapse.USER_ENV, raising=False)
    monkeypatch.delenv(synapse.PASSWORD_ENV, raising=False)
    calls = []
    monkeypatch.setattr(pyodbc, "drivers", lambda: ["ODBC Driver 18 for SQL Server"])
    monkeypatch.setattr(pyodbc, "connect", lambda *args, **kwargs: calls.append((args, kwargs)))

    class Credential:
        def get_token(self, scope):
            assert scope == "https://database.windows.net/.default"
            return type("AccessToken", (), {"token": "tok"})()

    synapse.connect(parse_target("mssql+pyodbc://ws.sql.azuresynapse.net/pool"), Credential())
    ((args, kwargs),) = calls
    assert kwargs["attrs_before"] == {1256: access_token_attribute("tok")}
    assert "UID" not in args[0] and "PWD" not in args[0]

    class NoCredential:
        def get_token(self, scope):
            raise RuntimeError("DefaultAzureCredential failed to retrieve a token")

    with pytest.raises(UsageError, match="no Azure token for Synapse.*SYNAPSE_USER"):
        synapse.connect(parse_target("mssql+pyodbc://ws/pool"), NoCredential())


def test_missing_driver_says_what_to_install(monkeypatch):
    pytest.importorskip("pyodbc")
    monkeypatch.setenv(synapse.PASSWORD_ENV, "x")
    monkeypatch.setenv(synapse.USER_ENV, "bms")
    with pytest.raises(
        UsageError, match="ODBC Driver 18 for SQL Server' is not installed.*msodbcsql18"
    ):
        synapse.connect(parse_target("mssql+pyodbc://ws.sql.azuresynapse.net/pool"))


def test_missing_pyodbc_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyodbc", None)
    with pytest.raises(UsageError, match=r"apt-get install unixodbc.*msodbcsql18.*\[synapse\]"):
        synapse.require_pyodbc()


# ---- the pyodbc path for real, against PostgreSQL through psqlODBC ----


@pytest.fixture(scope="module")
def pyodbc():
    module = pytest.importorskip("pyodbc")
    try:
        module.connect(ODBC, timeout=5).close()
    except module.Error as error:
        pytest.skip(f"no PostgreSQL via ODBC ({error.args[0]}); run scripts/setup-services")
    return module


@pytest.fixture
def table(pyodbc):
    """A fresh fact table shaped like the Synapse one, in schema bookymyshow."""
    spec = FACTS._replace(name=f"facts_{uuid.uuid4().hex[:8]}")
    columns = ", ".join(
        f'"{c.name}" {synapse._staging_type(c.sql_type, POSTGRES)}' for c in spec.columns
    )
    with pyodbc.connect(ODBC, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{spec.schema}"')
        connection.execute(f"CREATE TABLE {spec.qualified_name} ({columns})")
    yield spec
    with pyodbc.connect(ODBC, autocommit=True) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {spec.qualified_name}")


def fact(order: int, seat: str = "A1", payment: str | None = "p1") -> tuple:
    booked = dt.datetime(2026, 2, 8, 10, 30, 0, 123456) + dt.timedelta(seconds=order)
    return (
        f"o{order}", booked, "c1", "Ana", "ana@example.com", "e1", "Rock Concert", "1 Main St",
        seat, 75.5, "Concert", "Sunday", 10, payment, booked + dt.timedelta(seconds=30), 75.5,
        "Credit Card", "Card", booked, booked + dt.timedelta(seconds=30),
    )  # fmt: skip


def rows_in(pyodbc, table) -> list[tuple]:
    with pyodbc.connect(ODBC) as connection:
        names = ", ".join(f'"{n}"' for n in FACT_COLUMN_NAMES)
        return sorted(
            tuple(row) for row in connection.execute(f"SELECT {names} FROM {table.qualified_name}")
        )


def pg_writer(pyodbc, table, **options) -> SynapseWriter:
    options.setdefault("fast_executemany", False)  # psqlODBC has no parameter arrays
    return SynapseWriter(
        lambda: pyodbc.connect(ODBC, autocommit=False), table, dialect=POSTGRES, **options
    )


def test_batched_inserts_round_trip_every_value(pyodbc, table):
    rows = [fact(n) for n in range(25)] + [fact(99, seat=None, payment=None)]
    writer = pg_writer(pyodbc, table, idempotent=False, batch_size=10)
    writer.check_table()
    assert writer.write(rows) == 26
    writer.close()
    assert rows_in(pyodbc, table) == sorted(rows)


def test_idempotent_mode_writes_each_natural_key_once(pyodbc, table):
    writer = pg_writer(pyodbc, table, batch_size=4)
    first = [fact(n) for n in range(6)] + [fact(7, seat=None, payment=None)]
    assert writer.write(first) == 7
    replay = [*first[3:], fact(6), fact(6), fact(7, seat=None, payment=None)]
    assert writer.write(replay) == 1  # only o6, once: duplicates in a batch collapse too
    writer.close()
    assert rows_in(pyodbc, table) == sorted([*first, fact(6)])
    plain = pg_writer(pyodbc, table, idempotent=False)
    plain.write([fact(0)])  # without it, a replay duplicates: the test above can fail
    plain.close()
    assert len(rows_in(pyodbc, table)) == 9


def test_a_dropped_connection_is_retried_on_a_new_one(pyodbc, table):
    sleeps = []
    writer = pg_writer(pyodbc, table, sleep=sleeps.append, backoff=0.25)
    writer.check_table()  # opens the connection the server is about to drop
    (backend,) = writer._connection.execute("SELECT pg_backend_pid()").fetchone()
    writer._connection.commit()
    with pyodbc.connect(ODBC, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(?)", backend)
    assert writer.write([fact(1), fact(2)]) == 2
    writer.close()
    assert sleeps == [0.25]
    assert rows_in(pyodbc, table) == [fact(1), fact(2)]


class Throttled:
    """A real connection whose first statements fail as a throttled Synapse would."""

    def __init__(self, pyodbc, failures: list[tuple[str, str]]):
        self._connection = pyodbc.connect(ODBC, autocommit=False)
        self._pyodbc = pyodbc
        self._failures = failures

    def cursor(self):
        if self._failures:
            raise self._pyodbc.Error(*self._failures.pop(0))
        return self._connection.cursor()

    def __getattr__(self, name):
        return getattr(self._connection, name)


def test_throttling_and_deadlocks_back_off_then_succeed_or_give_up(pyodbc, table):
    failures = [
        ("42000", "[SQL Server]The service is currently busy. (40501) (SQLExecDirectW)"),
        ("40001", "[SQL Server]Transaction was deadlocked (1205) (SQLExecDirectW)"),
    ]
    sleeps = []
    writer = SynapseWriter(
        lambda: Throttled(pyodbc, failures),
        table,
        dialect=POSTGRES,
        fast_executemany=False,
        sleep=sleeps.append,
    )
    assert writer.write([fact(1)]) == 1
    assert sleeps == [1.0, 2.0]
    writer.close()
    busy = ("42000", "[SQL Server]The service is currently busy. (40501) (SQLExecDirectW)")
    always = SynapseWriter(
        lambda: Throttled(pyodbc, [busy]),
        table,
        dialect=POSTGRES,
        attempts=3,
        sleep=lambda s: None,
    )
    with pytest.raises(WarehouseWriteError, match="after 3 attempts.*throttled.*40501"):
        always.write([fact(2)])
    assert rows_in(pyodbc, table) == [fact(1)]


def test_a_permanent_error_fails_at_once_with_the_server_message(pyodbc, table):
    sleeps = []
    writer = pg_writer(pyodbc, table, idempotent=False, sleep=sleeps.append)
    with pytest.raises(WarehouseWriteError, match="value too long"):
        writer.write([fact(1, seat="A-VERY-LONG-SEAT")])
    assert sleeps == []
    writer.close()


def test_missing_table_and_column_mismatch_are_one_clear_line(pyodbc, table):
    missing = pg_writer(pyodbc, table._replace(name="no_such_table"))
    with pytest.raises(
        UsageError, match="bookymyshow.no_such_table does not exist.*synapse_create"
    ):
        missing.check_table()
    with pyodbc.connect(ODBC, autocommit=True) as connection:
        connection.execute(
            f'ALTER TABLE {table.qualified_name} RENAME COLUMN "payment_type" TO "pay_type"'
        )
    with pytest.raises(UsageError, match="missing payment_type; unexpected pay_type"):
        pg_writer(pyodbc, table).check_table()


def test_sql_authentication_from_environment_variables(pyodbc, table, monkeypatch):
    monkeypatch.setenv(synapse.USER_ENV, "bms")
    monkeypatch.setenv(synapse.PASSWORD_ENV, "bms")
    without_secret = ";".join(
        p for p in ODBC.split(";") if not p.lower().startswith(("uid", "pwd"))
    )
    connection = synapse.connect(parse_target(without_secret))
    assert connection.execute("SELECT current_user").fetchone()[0] == "bms"
    connection.close()


def test_the_warehouse_sink_writes_facts_and_dead_letters_through_odbc(pyodbc, table, monkeypatch):
    """WriteToWarehouse picks this writer for an ODBC target; Beam runs it for real."""
    letters = DEAD_LETTERS._replace(name=f"dead_{uuid.uuid4().hex[:8]}")
    columns = ", ".join(
        f'"{c.name}" {synapse._staging_type(c.sql_type, POSTGRES)}' for c in letters.columns
    )
    with pyodbc.connect(ODBC, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {letters.qualified_name} ({columns})")
    monkeypatch.setitem(synapse.TARGETS, "facts", table)
    monkeypatch.setitem(synapse.TARGETS, "dead_letters", letters)
    rows = [fact(n) for n in range(30)]
    letter = DeadLetter("bookingtopic", "3", 42, 1_770_546_600_123_456, b"\x00{", "not JSON")
    try:
        with TestPipeline(runner="DirectRunner") as pipeline:
            _ = (
                pipeline
                | "Facts" >> beam.Create(rows)
                | "W1" >> WriteToWarehouse(ODBC, batch_size=7)
            )
            _ = (
                pipeline
                | "Letters" >> beam.Create([letter, letter])
                | "W2" >> WriteToWarehouse(ODBC, "dead_letters")
            )
        assert rows_in(pyodbc, table) == sorted(rows)
        with pyodbc.connect(ODBC) as connection:
            stored = connection.execute(f"SELECT * FROM {letters.qualified_name}").fetchall()
        assert [tuple(row) for row in stored] == [synapse.dead_letter_row(letter)]
    finally:
        with pyodbc.connect(ODBC, autocommit=True) as connection:
            connection.execute(f"DROP TABLE {letters.qualified_name}")


# ---- live: a real Synapse pool ----


@pytest.mark.live
@pytest.mark.skipif(
    not os.environ.get("SYNAPSE_URL"),
    reason="live Synapse test: set SYNAPSE_URL=mssql+pyodbc://WORKSPACE.sql.azuresynapse.net/POOL "
    "(and SYNAPSE_USER/SYNAPSE_PASSWORD, or an Azure identity)",
)
def test_live_synapse_table_and_idempotent_write():
    writer = synapse.writer_for(os.environ["SYNAPSE_URL"], batch_size=10)
    try:
        writer.check_table()
        marker = ("bms-live-test", *fact(0)[1:])
        writer.write([marker, marker])  # idempotent: one marker row, however often this runs
        connection = writer._open()
        (count,) = connection.execute(
            'SELECT COUNT(*) FROM "bookymyshow"."bookings_fact" WHERE order_id = ?',
            "bms-live-test",
        ).fetchone()
        assert count == 1
    finally:
        writer.close()
