"""The Synapse writer: its T-SQL parsed with sqlglot, and its pyodbc code path run for real against
PostgreSQL through the Debian ODBC driver (scripts/setup-services), alone and under the generic
warehouse sink in a Beam pipeline, plus live tests."""

from __future__ import annotations

import datetime as dt
import os
import re
import struct
import sys
import uuid
from pathlib import Path

import apache_beam as beam
import pytest
import sqlglot
from apache_beam.testing.test_pipeline import TestPipeline

from pipeline.errors import UsageError
from pipeline.io.warehouses import WriteToWarehouse, synapse
from pipeline.io.warehouses.base import WarehouseWriteError, dead_letter_row
from pipeline.io.warehouses.synapse import (
    DEAD_LETTERS,
    FACTS,
    MSSQL,
    POSTGRES,
    SYNAPSE,
    TSQL,
    SynapseWriter,
    TableSpec,
    Target,
    access_token_attribute,
    column_mismatch,
    create_staging_statement,
    is_data_error,
    is_transient,
    move_statement,
    parse_target,
    rows_per_statement,
    stage_statement,
)
from pipeline.schema import (
    DEAD_LETTER_COLUMNS,
    FACT_COLUMN_NAMES,
    FACT_TABLE_COLUMNS,
    NULLABLE_FACT_COLUMNS,
    DeadLetter,
    decode_fact_row,
    fact_row_key,
)
from tests.conftest import missing, one_row_batches

ODBC = os.environ.get(
    "BMS_TEST_ODBC",
    "Driver={PostgreSQL Unicode};Server=127.0.0.1;Port=5432;Database=bms_test;Uid=bms;Pwd=bms",
)
SQL = Path(__file__).resolve().parents[1] / "sql"
SEAT = FACT_COLUMN_NAMES.index("seat_number")
PRICE = FACT_COLUMN_NAMES.index("seat_price")


# ---- the T-SQL the writer issues, parsed as T-SQL ----


def tsql_statements():
    for dialect in (SYNAPSE, MSSQL):
        for table in (FACTS, DEAD_LETTERS):
            yield stage_statement(table, dialect, 1)
            yield stage_statement(table, dialect, rows_per_statement(table))
            yield create_staging_statement(table, dialect)
            yield move_statement(table, dialect, time_range=False)
        yield move_statement(FACTS, dialect, time_range=True)
        yield synapse.clear_staging_statement(dialect)
    yield synapse.columns_query()
    yield synapse.engine_query()
    yield synapse.unique_key_query()


@pytest.mark.parametrize("statement", list(tsql_statements()))
def test_every_tsql_statement_parses_as_tsql(statement):
    parsed = sqlglot.parse(statement, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
    assert len(parsed) == 1 and parsed[0] is not None
    assert not isinstance(parsed[0], sqlglot.exp.Command)  # parsed, not just passed through
    assert statement.count("?") <= synapse.STATEMENT_PARAMETERS < synapse.MAX_PARAMETERS


@pytest.mark.parametrize("table", [FACTS, DEAD_LETTERS], ids=["facts", "dead_letters"])
@pytest.mark.parametrize("dialect", [SYNAPSE, MSSQL])
def test_staging_inserts_are_union_all_selects_of_parameters_within_the_limit(table, dialect):
    per = rows_per_statement(table)
    assert per * len(table.columns) <= 2099 < (per + 1) * len(table.columns)
    insert = sqlglot.parse_one(stage_statement(table, dialect, per), read="tsql")
    assert [c.name for c in insert.this.expressions] == [c.name for c in table.columns]
    assert insert.this.expressions[-1].name == "row_key"
    assert insert.this.this.this.args["temporary"]  # into the session's #temp table
    assert not list(insert.find_all(sqlglot.exp.Values))  # dedicated pools have no multi-row VALUES
    selects = list(insert.expression.find_all(sqlglot.exp.Select))
    assert len(selects) == per
    for select in selects:
        assert len(select.expressions) == len(table.columns)
        assert all(isinstance(value, sqlglot.exp.Placeholder) for value in select.expressions)
    with pytest.raises(ValueError):
        stage_statement(table, dialect, per + 1)


@pytest.mark.parametrize("dialect", [SYNAPSE, MSSQL])
def test_the_move_keys_on_the_row_key_and_looks_only_at_the_batch_time_range(dialect):
    move = sqlglot.parse_one(move_statement(FACTS, dialect, time_range=True), read="tsql")
    assert [c.name for c in move.this.expressions] == [c.name for c in FACTS.columns]
    (exists,) = list(move.find_all(sqlglot.exp.Exists))
    assert isinstance(exists.parent, sqlglot.exp.Not)
    matched = {
        tuple(sorted((c.table, c.name) for c in eq.find_all(sqlglot.exp.Column)))
        for eq in exists.find_all(sqlglot.exp.EQ)
    }
    assert matched == {
        (("s", "order_id"), ("t", "order_id")),  # the distribution column: a local join
        (("s", "row_key"), ("t", "row_key")),
    }
    bounds = [*exists.find_all(sqlglot.exp.GTE), *exists.find_all(sqlglot.exp.LTE)]
    assert [(b.this.table, b.this.name) for b in bounds] == [("t", "booking_event_time")] * 2
    assert all(isinstance(b.expression, sqlglot.exp.Placeholder) for b in bounds)
    assert not list(exists.find_all(sqlglot.exp.Or)) and not list(exists.find_all(sqlglot.exp.Is))
    assert not list(move.find_all(sqlglot.exp.Window))  # a batch's keys are made unique first
    # the dead letters have no time column; their distribution column is the key itself
    letters = sqlglot.parse_one(move_statement(DEAD_LETTERS, dialect, time_range=False), "tsql")
    assert {c.name for c in letters.find(sqlglot.exp.Exists).find_all(sqlglot.exp.Column)} == {
        "row_key"
    }
    with pytest.raises(ValueError):
        move_statement(DEAD_LETTERS, dialect, time_range=True)


def test_the_staging_table_is_a_session_temp_table_with_options_only_for_dedicated_pools():
    for table in (FACTS, DEAD_LETTERS):
        pool = create_staging_statement(table, SYNAPSE)
        assert pool.startswith("CREATE TABLE #bms_staging (")
        assert pool.endswith(") WITH (DISTRIBUTION = ROUND_ROBIN, HEAP)")
        database = create_staging_statement(table, MSSQL)
        assert database == pool.removesuffix(" WITH (DISTRIBUTION = ROUND_ROBIN, HEAP)")
        created = sqlglot.parse_one(database, read="tsql")
        assert created.this.this.this.args["temporary"]
        assert [c.args["kind"].sql("tsql") for c in created.this.expressions] == [
            sqlglot.exp.DataType.build(c.sql_type, dialect="tsql").sql("tsql")
            for c in table.columns
        ]
    assert synapse.clear_staging_statement(SYNAPSE) == "DELETE FROM #bms_staging"


def test_a_batch_is_unique_by_key_and_its_time_range_ignores_nothing():
    rows = [fact(2), fact(1), fact(2), fact(3, key=fact_row_key("0:1:0", "1:1"))]
    assert synapse.first_of_each_key(rows) == [fact(2), fact(1)]
    assert synapse.time_range(FACTS, [fact(2), fact(1)]) == (fact(1)[18], fact(2)[18])
    no_time = fact(4)[:18] + (None,) + fact(4)[19:]
    assert synapse.time_range(FACTS, [fact(1), no_time]) is None  # NULL lies in no range
    assert synapse.time_range(DEAD_LETTERS, [("x",) * 7]) is None


# ---- the DDL files ----

#: A dedicated pool's table options sqlglot has no grammar for, and what it can parse instead.
POOL_OPTIONS = re.compile(
    r"WITH \((DISTRIBUTION = (?:HASH\(\w+\)|ROUND_ROBIN)), "
    r"(?:HEAP|CLUSTERED INDEX \(\w+\)|CLUSTERED COLUMNSTORE INDEX(?: ORDER \(\w+\))?)\)"
)


def batches(path: Path) -> list[str]:
    """The batches of a script, split on GO lines as sqlcmd does."""
    return [batch for batch in re.split(r"(?m)^GO$", path.read_text()) if batch.strip()]


def parsed_script(path: Path) -> list[sqlglot.exp.Expression]:
    statements = []
    for batch in batches(path):
        batch = POOL_OPTIONS.sub(lambda match: f"WITH ({match.group(1)})", batch)
        for statement in sqlglot.parse(batch, read="tsql", error_level=sqlglot.ErrorLevel.RAISE):
            if statement is not None:
                statements.append(statement)
    return statements


def created_tables(statements) -> dict[str, list]:
    creates = [c for s in statements for c in s.find_all(sqlglot.exp.Create) if c.kind == "TABLE"]
    return {c.this.this.name: c.this.expressions for c in creates}


@pytest.mark.parametrize("script", ["synapse_create_table.sql", "mssql_create_table.sql"])
def test_the_ddl_scripts_match_the_schema_and_can_run_again(script):
    assert FACTS.columns == FACT_TABLE_COLUMNS and DEAD_LETTERS.columns == DEAD_LETTER_COLUMNS
    assert FACTS.key == DEAD_LETTERS.key == ("row_key",)
    statements = parsed_script(SQL / script)
    tables = created_tables(statements)
    for spec in (FACTS, DEAD_LETTERS):
        columns = [c for c in tables[spec.name] if isinstance(c, sqlglot.exp.ColumnDef)]
        assert [(c.name, c.args["kind"].sql("tsql")) for c in columns] == [
            (c.name, sqlglot.exp.DataType.build(c.sql_type, dialect="tsql").sql("tsql"))
            for c in spec.columns
        ]
        assert columns[-1].name == "row_key" and "NOT NULL" in columns[-1].sql("tsql")
        nullable = NULLABLE_FACT_COLUMNS if spec is FACTS else frozenset()
        assert [c.name for c in columns if "NOT NULL" in c.sql("tsql")] == [
            c.name for c in spec.columns if c.name not in nullable
        ]
    # every batch but a GRANT is guarded by IF ... IS NULL (schema, tables, user) or IF NOT
    # EXISTS (an index), so a second run changes nothing
    for batch in batches(SQL / script):
        code = "\n".join(line for line in batch.splitlines() if not line.startswith("--"))
        assert re.match(
            r"\s*(IF (SCHEMA_ID|OBJECT_ID|DATABASE_PRINCIPAL_ID)\(N'[\w.-]+'(, N'U')?\) IS NULL"
            r"|IF NOT EXISTS \(|GRANT )",
            code,
        ), code
    text = (SQL / script).read_text()
    assert "EXEC(N'CREATE SCHEMA bookymyshow')" in text  # CREATE SCHEMA must begin a batch
    assert all(batch.strip().endswith(";") for batch in batches(SQL / script) if "IF " in batch)


def test_only_the_dedicated_pool_script_has_distribution_options():
    pool = (SQL / "synapse_create_table.sql").read_text()
    assert (
        pool.count("WITH (DISTRIBUTION = HASH(order_id), CLUSTERED INDEX (booking_event_time))")
        == 1
    )
    assert pool.count("WITH (DISTRIBUTION = HASH(row_key), CLUSTERED INDEX (row_key))") == 1
    assert "GRANT ADMINISTER DATABASE BULK OPERATIONS TO [bms-pipeline];" in pool
    database = (SQL / "mssql_create_table.sql").read_text()
    code = "\n".join(line for line in database.splitlines() if not line.startswith("--"))
    assert not re.search(r"DISTRIBUTION|HEAP|COLUMNSTORE", code)
    # a real unique index on row_key, which ignores a racing writer's duplicate
    for name in ("bookings_fact", "dead_letters"):
        assert re.search(
            rf"CONSTRAINT pk_{name} PRIMARY KEY (NON)?CLUSTERED \(row_key\) "
            r"WITH \(IGNORE_DUP_KEY = ON\)",
            database,
        )


def test_the_dedupe_script_keeps_one_row_per_key():
    statements = parsed_script(SQL / "synapse_dedupe.sql")
    (view,) = [s for s in statements if isinstance(s, sqlglot.exp.Create) and s.kind == "VIEW"]
    assert [e.alias_or_name for e in view.expression.expressions] == [
        c.name for c in FACT_TABLE_COLUMNS
    ]
    (window,) = list(view.find_all(sqlglot.exp.Window))
    assert [c.name for c in window.args["partition_by"]] == ["order_id", "row_key"]
    assert view.expression.args["where"].sql("tsql") == "WHERE copy_number = 1"
    (ctas,) = [s for s in statements if isinstance(s, sqlglot.exp.Create) and s.kind == "TABLE"]
    assert ctas.expression.find(sqlglot.exp.Table).name == "bookings_fact_unique"
    renames = [s.sql("tsql") for s in statements if isinstance(s, sqlglot.exp.Command)]
    assert renames == [
        "RENAME OBJECT bookymyshow.bookings_fact TO bookings_fact_before_compaction",
        "RENAME OBJECT bookymyshow.bookings_fact_compacted TO bookings_fact",
    ]


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
        ("HY000", "[SQL Server]Too many create or update operations. (49919) (SQLExecute)", True),
        ("HY000", "[SQL Server]Too many operations in progress. (49920) (SQLExecute)", True),
        (
            "42000",
            "[SQL Server]Resource ID : 1. The request limit is 30. (10928) (SQLExecute)",
            True,
        ),
        (
            "42000",
            "[SQL Server]Resource ID : 1. The min guarantee is 0. (10929) (SQLExecute)",
            True,
        ),
        (
            "42000",
            "[SQL Server]An attempt to complete a transaction has failed. No corresponding "
            "transaction found. (111214) (SQLExecDirectW)",
            True,
        ),
        ("08S01", "[Microsoft][ODBC Driver 18 for SQL Server]Communication link failure", True),
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
    error = pyodbc.Error(sqlstate, message)
    assert is_transient(error) is transient
    writer = SynapseWriter(lambda: None, FACTS)
    assert writer.is_transient(error) is transient


@pytest.mark.parametrize(
    ("kind", "sqlstate", "message", "data"),
    [
        ("DataError", "22001", "[22001] ERROR: value too long for type character varying", True),
        (
            "DataError",
            "22003",
            "[Microsoft][SQL Server]Arithmetic overflow error converting (8115) (SQLExecute)",
            True,
        ),
        (
            "IntegrityError",
            "23000",
            "[Microsoft][SQL Server]Cannot insert the value NULL into column (515) (SQLExecute)",
            True,
        ),
        # a driver that raises its base class still names the SQLSTATE class
        ("Error", "22007", "[Microsoft][SQL Server]Conversion failed (241) (SQLExecute)", True),
        ("ProgrammingError", "42S02", "[SQL Server]Invalid object name 'x'. (208)", False),
        ("OperationalError", "08S01", "[ODBC Driver 18]Communication link failure", False),
        ("Error", "42000", "[SQL Server]The service is currently busy. (40501)", False),
    ],
)
def test_data_errors_are_told_apart(kind, sqlstate, message, data):
    pyodbc = pytest.importorskip("pyodbc")
    error = getattr(pyodbc, kind)(sqlstate, message)
    assert is_data_error(error) is data
    assert SynapseWriter(lambda: None, FACTS).is_data_error(error) is data


@pytest.mark.parametrize(
    ("kind", "status", "transient"),
    [
        ("ServiceRequestError", None, True),  # could not connect
        ("ServiceResponseError", None, True),  # connection reset while waiting
        ("HttpResponseError", 503, True),  # server busy
        ("HttpResponseError", 429, True),  # throttled
        ("ClientAuthenticationError", 403, False),  # no role assignment
        ("ResourceNotFoundError", 404, False),  # no such container
    ],
)
def test_storage_errors_of_the_staging_container_are_told_apart(kind, status, transient):
    exceptions = pytest.importorskip("azure.core.exceptions")
    error = getattr(exceptions, kind)("the service's message")
    if status is not None:
        error.status_code = status
    assert is_transient(error) is transient
    assert not is_data_error(error)


def test_our_own_errors_are_neither_transient_nor_data_errors():
    writer = SynapseWriter(lambda: None, FACTS)
    for error in (WarehouseWriteError("08S01 nothing"), UsageError("no Azure token")):
        assert not writer.is_transient(error) and not writer.is_data_error(error)


def test_column_mismatch_messages():
    assert column_mismatch(FACTS, [n.upper() for n in (*FACT_COLUMN_NAMES, "row_key")]) is None
    assert "does not exist; create it with sql/synapse_create_table.sql" in column_mismatch(
        FACTS, []
    )
    old = column_mismatch(FACTS, list(FACT_COLUMN_NAMES))  # a table from the earlier DDL
    assert old == (
        "table bookymyshow.bookings_fact does not have the expected columns (missing row_key); "
        "recreate it with sql/synapse_create_table.sql"
    )
    problem = column_mismatch(FACTS, [*FACT_COLUMN_NAMES[:-1], "payment_time_utc", "row_key"])
    assert "missing payment_event_time; unexpected payment_time_utc" in problem
    assert "\n" not in problem


def test_targets_from_urls_and_odbc_strings():
    target = parse_target("mssql+pyodbc://ws.sql.azuresynapse.net/pool")
    assert target == Target(target.connection_string, TSQL)
    assert "Driver={ODBC Driver 18 for SQL Server};Server=tcp:ws.sql.azuresynapse.net;" in (
        target.connection_string
    )
    assert "Database=pool;Encrypt=yes" in target.connection_string
    assert target.location == "ws.sql.azuresynapse.net/pool"
    with_port = parse_target("mssql+pyodbc://bms@ws.sql.azuresynapse.net:1433/pool")
    assert "Server=tcp:ws.sql.azuresynapse.net,1433" in with_port.connection_string
    assert ";UID=bms" in with_port.connection_string
    assert parse_target(ODBC) == Target(ODBC, POSTGRES)
    assert "Pwd=***" in repr(parse_target(ODBC))
    with pytest.raises(UsageError, match="SYNAPSE_PASSWORD"):
        parse_target("mssql+pyodbc://bms:secret@ws/pool")
    with pytest.raises(UsageError, match="server and a database"):
        parse_target("mssql+pyodbc://ws.sql.azuresynapse.net")
    with pytest.raises(UsageError, match="unknown option.*batch"):
        parse_target("mssql+pyodbc://ws/pool?batch=5")


@pytest.mark.parametrize(
    "url",
    [
        "mssql+pyodbc://ws.sql.azuresynapse.net/pool?idempotent=false",
        "mssql+pyodbc://ws.sql.azuresynapse.net/pool?driver=X&idempotent=true",
        "Driver={ODBC Driver 18 for SQL Server};Server=tcp:ws;Database=pool;idempotent=no",
    ],
)
def test_the_removed_idempotent_option_is_refused_in_one_line(url):
    with pytest.raises(UsageError) as raised:
        parse_target(url)
    message = str(raised.value)
    assert "every write is idempotent now" in message and "remove" in message
    assert "\n" not in message


def test_writer_for_describes_the_target_without_secrets():
    facts = synapse.writer_for("mssql+pyodbc://bms@ws.sql.azuresynapse.net/pool")
    assert isinstance(facts, SynapseWriter) and facts.table == FACTS and facts.nul_allowed
    assert facts.description == "ws.sql.azuresynapse.net/pool table bookymyshow.bookings_fact"
    letters = synapse.writer_for(ODBC.replace("Pwd=bms", "Pwd=s3cret"), "dead_letters")
    assert letters.table == DEAD_LETTERS
    assert letters.description == "127.0.0.1:5432/bms_test table bookymyshow.dead_letters"
    assert not letters.nul_allowed  # the tests' PostgreSQL: text cannot hold NUL
    with pytest.raises(ValueError, match="target must be"):
        synapse.writer_for(ODBC, "bookings")


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
        missing(f"no PostgreSQL via ODBC ({error.args[0]}); run scripts/setup-services")
    return module


def create_table(pyodbc, spec: TableSpec, *constraints: str) -> None:
    """A table shaped like the Synapse DDL's: NOT NULL where it says so, and, like Synapse, no
    unique index on row_key: only the writer keeps the keys unique."""
    nullable = NULLABLE_FACT_COLUMNS if spec.columns == FACT_TABLE_COLUMNS else frozenset()
    columns = [
        f'"{c.name}" {synapse._staging_type(c.sql_type, POSTGRES)}'
        + ("" if c.name in nullable else " NOT NULL")
        for c in spec.columns
    ]
    with pyodbc.connect(ODBC, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{spec.schema}"')
        connection.execute(
            f"CREATE TABLE {spec.qualified_name} ({', '.join([*columns, *constraints])})"
        )


def drop_table(pyodbc, spec: TableSpec) -> None:
    with pyodbc.connect(ODBC, autocommit=True) as connection:
        connection.execute(f"DROP TABLE IF EXISTS {spec.qualified_name}")


@pytest.fixture
def table(pyodbc):
    """A fresh fact table in schema bookymyshow."""
    spec = FACTS._replace(name=f"facts_{uuid.uuid4().hex[:8]}")
    create_table(pyodbc, spec)
    yield spec
    drop_table(pyodbc, spec)


def fact(order: int, seat: str | None = "A1", payment: str | None = "p1", key=None) -> tuple:
    """A fact row of order ``order`` and its row key (seat 0 of booking ``order`` at partition 0,
    paid by payment ``order`` at partition 1, unless ``key`` says otherwise)."""
    booked = dt.datetime(2026, 2, 8, 10, 30, 0, 123456) + dt.timedelta(seconds=order)
    return (
        f"o{order}", booked, "c1", "Zoë", "ana@example.com", "e1", "Rock Concert", "1 Main St",
        seat, 75.5, "Concert", "Sunday", 10, payment, booked + dt.timedelta(seconds=30), 75.5,
        "Credit Card", "Card", booked, booked + dt.timedelta(seconds=30),
        key or fact_row_key(f"0:{order}:0", f"1:{order}"),
    )  # fmt: skip


def rows_in(pyodbc, spec: TableSpec) -> list[tuple]:
    """Every row of the table, all its columns, in row key order."""
    with pyodbc.connect(ODBC) as connection:
        names = ", ".join(f'"{c.name}"' for c in spec.columns)
        rows = connection.execute(f"SELECT {names} FROM {spec.qualified_name}").fetchall()
    return sorted((tuple(row) for row in rows), key=lambda row: row[-1])


def by_key(rows) -> list[tuple]:
    return sorted(rows, key=lambda row: row[-1])


def pg_writer(pyodbc, spec: TableSpec, connect=None) -> SynapseWriter:
    return SynapseWriter(
        # pyodbc's default, autocommit off: the writer turns it on before its first statement
        connect or (lambda: pyodbc.connect(ODBC, autocommit=False)),
        spec,
        dialect=POSTGRES,
        location="127.0.0.1:5432/bms_test",
    )


def test_batches_round_trip_every_value(pyodbc, table):
    rows = [fact(n) for n in range(25)] + [fact(99, seat=None, payment=None)]
    writer = pg_writer(pyodbc, table)
    assert [writer.write_batch(rows[i : i + 10]) for i in range(0, len(rows), 10)] == [10, 10, 6]
    assert writer.write_batch([]) == 0
    assert writer._connection.autocommit  # every statement ran in autocommit mode
    writer.close()
    assert rows_in(pyodbc, table) == by_key(rows)


def test_a_large_batch_is_staged_in_statements_within_the_parameter_limit(pyodbc, table):
    rows = [fact(n) for n in range(1000)]  # 11 staging INSERTs of up to 99 rows, one move
    writer = pg_writer(pyodbc, table)
    assert writer.write_batch(rows) == 1000
    assert writer.write_batch([*rows[::7], fact(1000)]) == 1  # a replay's batch: one new row
    writer.close()
    assert len(rows_in(pyodbc, table)) == 1001


def test_the_move_skips_keys_stored_at_the_same_booking_time_only(pyodbc, table):
    # The row key determines the booking time (the booking event's): a stored key always lies in
    # the batch's time range, so the range restriction skips nothing it should not.
    writer = pg_writer(pyodbc, table)
    assert writer.write_batch([fact(5)]) == 1
    assert writer.write_batch([fact(1), fact(5), fact(9)]) == 2  # fact(5) is inside [1, 9]
    assert writer.write_batch([fact(5), fact(6)]) == 1  # at the range's bound
    writer.close()
    assert [row[0] for row in rows_in(pyodbc, table)] == ["o1", "o5", "o6", "o9"]


def test_each_row_key_is_written_once_and_rows_differing_only_in_their_key_all_land(pyodbc, table):
    # Two seats sold twice at the same price in the same second: equal in all 20 columns, yet
    # two rows. Keying on the business columns (as the writer once did) kept only one of them.
    twin_a = fact(1, key=fact_row_key("0:1:0", "1:1"))
    twin_b = fact(1, key=fact_row_key("0:2:0", "1:2"))
    assert twin_a[:20] == twin_b[:20] and twin_a != twin_b
    writer = pg_writer(pyodbc, table)
    first = [twin_a, twin_b, fact(3), fact(3), fact(4, seat=None, payment=None)]
    assert writer.write_batch(first) == 4  # the same key twice in one batch: once
    replay = [twin_b, fact(4, seat=None, payment=None), fact(5), fact(5)]
    assert writer.write_batch(replay) == 1  # across batches: only o5, once
    changed = fact(3, seat="Z9")  # a row key the table holds decides, whatever the values
    assert writer.write_batch([changed]) == 0
    writer.close()
    rerun = pg_writer(pyodbc, table)  # a new connection, as a rerun of the job has
    assert rerun.write_batch([*first, *replay]) == 0
    rerun.close()
    assert rows_in(pyodbc, table) == by_key(
        [twin_a, twin_b, fact(3), fact(4, seat=None, payment=None), fact(5)]
    )


def test_dead_letters_are_written_once_per_row_key(pyodbc):
    spec = DEAD_LETTERS._replace(name=f"dead_{uuid.uuid4().hex[:8]}")
    create_table(pyodbc, spec)
    try:
        event = DeadLetter(
            "bookingtopic", "3", 42, 1_770_546_600_123_456, b"\x00{", "bad", "bookingtopic:3:42"
        )
        again = event._replace(reason="bad, read again")  # same key: the first one stays
        writer = pg_writer(pyodbc, spec)
        assert writer.write_batch([dead_letter_row(event)]) == 1
        assert writer.write_batch([dead_letter_row(again), dead_letter_row(again)]) == 0
        writer.close()
        assert rows_in(pyodbc, spec) == [dead_letter_row(event)]
    finally:
        drop_table(pyodbc, spec)


def backend_of(pyodbc, writer: SynapseWriter) -> int:
    (backend,) = writer._connection.execute("SELECT pg_backend_pid()").fetchone()
    writer._connection.commit()
    return backend


def test_a_dropped_connection_fails_one_attempt_and_the_next_reconnects(pyodbc, table):
    writer = pg_writer(pyodbc, table)
    assert writer.write_batch([fact(1)]) == 1
    backend = backend_of(pyodbc, writer)
    with pyodbc.connect(ODBC, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(?)", backend)
    with pytest.raises(pyodbc.Error) as raised:  # the driver's own error: no retry here
        writer.write_batch([fact(2)])
    assert writer.is_transient(raised.value) and not writer.is_data_error(raised.value)
    assert writer._connection is None  # discarded: the sink's next attempt reconnects
    assert writer.write_batch([fact(2), fact(1)]) == 1  # a new session, a new temp table
    assert backend_of(pyodbc, writer) != backend
    writer.close()
    assert rows_in(pyodbc, table) == [fact(1), fact(2)]


class Throttled:
    """A real connection whose first statements fail as a throttled Synapse would."""

    def __init__(self, pyodbc, failures: list):
        self._connection = pyodbc.connect(ODBC, autocommit=False)
        self._failures = failures

    def cursor(self):
        if self._failures:
            raise self._failures.pop(0)
        return self._connection.cursor()

    def __getattr__(self, name):
        return getattr(self._connection, name)

    def __setattr__(self, name, value):
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._connection, name, value)


def test_throttling_is_raised_unchanged_for_the_sink_to_retry(pyodbc, table):
    busy = pyodbc.Error(
        "42000", "[SQL Server]The service is currently busy. (40501) (SQLExecDirectW)"
    )
    deadlock = pyodbc.Error("40001", "[SQL Server]Transaction was deadlocked (1205) (SQLExec)")
    failures, connections = [busy, deadlock], []

    def connect():
        connections.append(Throttled(pyodbc, failures))
        return connections[-1]

    writer = pg_writer(pyodbc, table, connect)
    for expected in (busy, deadlock):  # one attempt per call: nothing retried, nothing slept
        with pytest.raises(pyodbc.Error) as raised:
            writer.write_batch([fact(1)])
        assert raised.value is expected and writer.is_transient(raised.value)
    assert writer.write_batch([fact(1)]) == 1
    writer.close()
    assert len(connections) == 3  # each failure dropped its connection
    assert rows_in(pyodbc, table) == [fact(1)]


def test_values_the_server_refuses_are_data_errors(pyodbc):
    spec = FACTS._replace(name=f"facts_{uuid.uuid4().hex[:8]}")
    create_table(pyodbc, spec, "CHECK (seat_price < 80)")
    try:
        writer = pg_writer(pyodbc, spec)
        too_long = fact(1, seat="A-VERY-LONG-SEAT")  # NVARCHAR(10); the sink checks this first
        too_dear = fact(2)[:PRICE] + (99.0,) + fact(2)[PRICE + 1 :]
        for row, kind in ((too_long, pyodbc.DataError), (too_dear, pyodbc.IntegrityError)):
            with pytest.raises(kind) as raised:
                writer.write_batch([fact(0), row])
            assert writer.is_data_error(raised.value) and not writer.is_transient(raised.value)
        assert writer.write_batch([fact(0)]) == 1
        writer.close()
        assert rows_in(pyodbc, spec) == [fact(0)]  # a refused batch leaves nothing behind
    finally:
        drop_table(pyodbc, spec)


def test_missing_table_and_column_mismatch_are_one_line(pyodbc, table):
    missing_table = pg_writer(pyodbc, table._replace(name="no_such_table"))
    with pytest.raises(WarehouseWriteError) as raised:
        missing_table.write_batch([fact(1)])
    assert re.fullmatch(r"table bookymyshow.no_such_table does not exist; .*", str(raised.value))
    assert not missing_table.is_transient(raised.value)
    with pyodbc.connect(ODBC, autocommit=True) as connection:
        connection.execute(f'ALTER TABLE {table.qualified_name} DROP COLUMN "row_key"')
    with pytest.raises(WarehouseWriteError, match=r"\(missing row_key\); recreate it") as raised:
        pg_writer(pyodbc, table).write_batch([fact(1)])  # a table made by the earlier DDL
    assert "\n" not in str(raised.value)


def test_sql_authentication_from_environment_variables(pyodbc, monkeypatch):
    monkeypatch.setenv(synapse.USER_ENV, "bms")
    monkeypatch.setenv(synapse.PASSWORD_ENV, "bms")
    without_secret = ";".join(
        p for p in ODBC.split(";") if not p.lower().startswith(("uid", "pwd"))
    )
    connection = synapse.connect(parse_target(without_secret))
    assert connection.execute("SELECT current_user").fetchone()[0] == "bms"
    connection.close()


@pytest.mark.parametrize("batch_seconds", [None, 30.0], ids=["per-bundle", "across-bundles"])
def test_the_warehouse_sink_writes_facts_and_dead_letters_through_odbc(
    pyodbc, monkeypatch, batch_seconds
):
    """WriteToWarehouse picks this writer for an ODBC target; Beam runs it for real: each row key
    once (also on a rerun), rows no target can store and rows the server refuses become dead
    letters, and the dead letters are written once per key too; with batches per bundle, and
    kept across bundles in Beam state."""
    facts = FACTS._replace(name=f"facts_{uuid.uuid4().hex[:8]}")
    letters = DEAD_LETTERS._replace(name=f"dead_{uuid.uuid4().hex[:8]}")
    create_table(pyodbc, facts, "CHECK (seat_price < 80)")  # only the server knows this rule
    create_table(pyodbc, letters)
    monkeypatch.setitem(synapse.TARGETS, "facts", facts)
    monkeypatch.setitem(synapse.TARGETS, "dead_letters", letters)
    good = [fact(n) for n in range(30)]
    twin = fact(0, key=fact_row_key("0:100:0", "1:100"))  # equal to fact(0) but for its key
    too_long = fact(40, seat="A-VERY-LONG-SEAT")  # the sink's check: NVARCHAR(10)
    too_dear = fact(41)[:PRICE] + (99.0,) + fact(41)[PRICE + 1 :]  # the server's CHECK
    rows = [*good, twin, too_long, too_dear, good[3], good[17]]
    event = DeadLetter(
        "bookingtopic", "3", 42, 1_770_546_600_123_456, b"\x00{", "not JSON", "bookingtopic:3:42"
    )

    def run():
        with TestPipeline(runner="DirectRunner") as pipeline:
            refused = (
                pipeline
                | "Facts" >> beam.Create(rows)
                | one_row_batches()
                | "WriteFacts" >> WriteToWarehouse(ODBC, batch_size=7, batch_seconds=batch_seconds)
            )
            events = pipeline | "Events" >> beam.Create([event, event])
            _ = (
                (events, refused)
                | beam.Flatten()
                | one_row_batches("LetterBatches")
                | "WriteLetters"
                >> WriteToWarehouse(ODBC, "dead_letters", batch_size=2, batch_seconds=batch_seconds)
            )

    try:
        run()
        stored = rows_in(pyodbc, facts)
        assert stored == by_key([*good, twin])
        stored_letters = {row[-1]: row for row in rows_in(pyodbc, letters)}
        assert stored_letters.keys() == {event.row_key, too_long[-1], too_dear[-1]}
        assert stored_letters[event.row_key] == dead_letter_row(event)
        hub, partition, sequence, _, body, reason, _ = stored_letters[too_long[-1]]
        assert (hub, partition, sequence) == ("bookingtopic", "0", 40)  # where the seat came from
        assert decode_fact_row(body) == too_long
        assert "column seat_number" in reason and "NVARCHAR(10)" in reason
        assert re.search(r"refused: IntegrityError: .*check", stored_letters[too_dear[-1]][5])
        run()  # a rerun adds nothing
        assert rows_in(pyodbc, facts) == stored
        assert len(rows_in(pyodbc, letters)) == 3
    finally:
        drop_table(pyodbc, facts)
        drop_table(pyodbc, letters)


# ---- live: a real Synapse pool ----

LIVE_STAGING_ENV = "BMS_TEST_STAGING"


def live_paths():
    yield pytest.param(None, id="insert")
    yield pytest.param(
        os.environ.get(LIVE_STAGING_ENV),
        id="staging",
        marks=pytest.mark.skipif(
            not os.environ.get(LIVE_STAGING_ENV),
            reason=f"live staging test: also set {LIVE_STAGING_ENV}=https://ACCOUNT.blob.core."
            "windows.net/CONTAINER or blob:CONTAINER (see docs/synapse.md)",
        ),
    )


@pytest.mark.live
@pytest.mark.skipif(
    not os.environ.get("SYNAPSE_URL"),
    reason="live Synapse test: set SYNAPSE_URL=mssql+pyodbc://WORKSPACE.sql.azuresynapse.net/POOL "
    "(and SYNAPSE_USER/SYNAPSE_PASSWORD, or an Azure identity)",
)
@pytest.mark.parametrize("staging", list(live_paths()))
def test_live_synapse_table_and_idempotent_write(staging):
    """Each write path against the real pool: one marker row (order_id ``bms-live-test``, one
    row key per path), at most once however often this runs."""
    writer = synapse.writer_for(os.environ["SYNAPSE_URL"], staging=staging)
    key = "bms-live-test" if staging is None else "bms-live-test-staging"
    marker = ("bms-live-test", *fact(0)[1:20], key)
    try:
        writer.write_batch([marker, marker])
        writer.write_batch([marker])
        (count,) = writer._run(
            lambda cursor: cursor.execute(
                f"SELECT COUNT(*) FROM {writer.table.qualified_name} "
                "WHERE order_id = ? AND row_key = ?",
                ["bms-live-test", key],
            ).fetchone()
        )
        assert count == 1
        assert writer.dialect in (SYNAPSE, MSSQL)
    finally:
        writer.close()
