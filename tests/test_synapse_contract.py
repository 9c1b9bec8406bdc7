"""The dedicated-pool contract: every write path of the Synapse writer runs against
``DedicatedPool``, a recording fake of a pyodbc connection that refuses what a dedicated SQL pool
refuses (and, as Azure SQL Database, what that refuses), and executes the rest for real in DuckDB
so that the rows that land can be checked too.

What it refuses, as the service documents it:
  - DDL (CREATE, DROP, ALTER, TRUNCATE) inside a user transaction, i.e. while autocommit is off
    (the ODBC driver then runs ``SET IMPLICIT_TRANSACTIONS ON``): "Transactions in dedicated SQL
    pool", Limitations;
  - more than 2,100 parameters in one request (error 8003), on every engine;
  - multi-row ``VALUES`` (a table value constructor, which dedicated pools lack);
  - MERGE forms a dedicated pool rejects: ``WHEN NOT MATCHED ... INSERT`` into a table not
    hash-distributed, an ``OUTPUT`` clause; and MERGE without its terminating semicolon (10713);
  - ``WITH (DISTRIBUTION ...`` (or HEAP, CLUSTERED COLUMNSTORE INDEX) and ``COPY INTO`` sent to a
    server that is not a dedicated pool;
  - a ``#temp`` table this session did not create (208), and NVARCHAR values longer than their
    column (2628, SQLSTATE 22001).
Anything sqlglot cannot parse as T-SQL is a syntax error (102).
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import apache_beam as beam
import duckdb
import pyarrow as pa
import pytest
import sqlglot
from apache_beam.options.pipeline_options import PipelineOptions
from sqlglot import exp

from pipeline.io.warehouses import synapse
from pipeline.io.warehouses.base import WarehouseWriteError, dead_letter_row
from pipeline.io.warehouses.sink import WriteRows
from pipeline.io.warehouses.synapse import (
    DEAD_LETTERS,
    FACTS,
    MSSQL,
    SYNAPSE,
    SynapseWriter,
    TableSpec,
)
from pipeline.schema import NULLABLE_FACT_COLUMNS, DeadLetter, fact_row_key
from tests.conftest import one_row_batches

pyodbc = pytest.importorskip("pyodbc")

DEDICATED_POOL = 6
SQL_DATABASE = 5
SERVERLESS_POOL = 11
_DDL = (exp.Create, exp.Drop, exp.Alter, exp.TruncateTable)
_PREFIX = "[Microsoft][ODBC Driver 18 for SQL Server][SQL Server]"


def service_error(kind: type, sqlstate: str, message: str, number: int | None) -> Exception:
    """An error as pyodbc raises the driver's: SQLSTATE, then the message ending in the native
    error number (what ``synapse.is_transient`` reads; None where we do not know the service's
    number, so none is made up)."""
    suffix = f" ({number})" if number is not None else ""
    return kind(sqlstate, f"{_PREFIX}{message}{suffix} (SQLExecDirectW)")


def syntax_error(near: str) -> Exception:
    return service_error(pyodbc.ProgrammingError, "42000", f"Incorrect syntax near '{near}'.", 102)


class Sent(NamedTuple):
    """One statement as the server received it."""

    session: int
    statement: str
    parameters: tuple
    autocommit: bool


def _duckdb_type(sql_type: str) -> str:
    name = sql_type.partition("(")[0].upper()
    return {
        "NVARCHAR": "VARCHAR",
        "DATETIME2": "TIMESTAMP",
        "FLOAT": "DOUBLE",  # T-SQL's FLOAT is 8 bytes
        "INT": "INTEGER",
        "BIGINT": "BIGINT",
        "VARBINARY": "BLOB",
    }.get(name, sql_type)


class DedicatedPool:
    """The server: DuckDB holding the tables, what each session sent, and the rules above.

    Args:
      edition: what ``SERVERPROPERTY('EngineEdition')`` answers (6 a dedicated pool, 5 Azure SQL
        Database, 11 a serverless pool).
      unique_row_key: on Azure SQL Database, whether the tables have their unique index.
      read_file: reads a COPY INTO source, ``(url, credential properties) -> pyarrow.Table``.
    """

    def __init__(
        self,
        edition: int = DEDICATED_POOL,
        *,
        unique_row_key: bool = True,
        read_file: Callable[[str, dict[str, str]], pa.Table] | None = None,
    ):
        self.edition = edition
        self.unique_row_key = unique_row_key
        self.read_file = read_file
        self.db = duckdb.connect()
        self.sent: list[Sent] = []
        self.distributions: dict[str, str] = {}
        self.types: dict[str, dict[str, str]] = {}
        self._failures: list[tuple[str, Exception]] = []
        #: Values the pool refuses as too long wherever they are staged (a rule only the server
        #: knows, as a CHECK constraint would be).
        self.refused_values: set = set()
        self._sessions = itertools.count(1)

    # -- setting it up --

    def create(self, *tables: TableSpec) -> None:
        """The tables as sql/synapse_create_table.sql makes them."""
        for table in tables:
            self.db.execute(f'CREATE SCHEMA IF NOT EXISTS "{table.schema}"')
            nullable = NULLABLE_FACT_COLUMNS if table.columns == FACTS.columns else frozenset()
            columns = ", ".join(
                f'"{c.name}" {_duckdb_type(c.sql_type)}'
                + ("" if c.name in nullable else " NOT NULL")
                for c in table.columns
            )
            self.db.execute(f"CREATE TABLE {table.qualified_name} ({columns})")
            name = f"{table.schema}.{table.name}".lower()
            self.distributions[name] = "HASH" if table.distribution else "ROUND_ROBIN"
            self.types[name] = {c.name.lower(): c.sql_type for c in table.columns}

    def fail(self, pattern: str, error: Exception) -> None:
        """The next statement matching ``pattern`` (a regular expression) fails with ``error``."""
        self._failures.append((pattern, error))

    def connect(self, autocommit: bool = False) -> Session:
        """A new session, as ``pyodbc.connect(..., autocommit=...)`` (pyodbc's default: off)."""
        return Session(self, next(self._sessions), autocommit)

    # -- looking at it --

    def rows(self, table: TableSpec) -> list[tuple]:
        return sorted(self.db.execute(f"SELECT * FROM {table.qualified_name}").fetchall())

    def statements(self, pattern: str = "") -> list[Sent]:
        return [sent for sent in self.sent if re.search(pattern, sent.statement)]

    def _injected(self, statement: str) -> Exception | None:
        for index, (pattern, error) in enumerate(self._failures):
            if re.search(pattern, statement):
                del self._failures[index]
                return error
        return None


class Session:
    """The fake pyodbc connection (one session of ``DedicatedPool``)."""

    def __init__(self, pool: DedicatedPool, number: int, autocommit: bool):
        self.pool = pool
        self.number = number
        self.autocommit = autocommit
        self.closed = False
        self.db = pool.db.cursor()  # a DuckDB connection of its own: temp tables are per session
        self.temp_tables: dict[str, dict[str, str]] = {}

    def cursor(self) -> Cursor:
        if self.closed:
            raise service_error(pyodbc.OperationalError, "08003", "Connection is closed", None)
        return Cursor(self)

    def execute(self, statement: str, *parameters) -> Cursor:
        return self.cursor().execute(statement, *parameters)

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self.db.close()


class Cursor:
    def __init__(self, session: Session):
        self.session = session
        self.pool = session.pool
        self.rowcount = -1
        self._rows: list[tuple] = []

    def close(self) -> None:
        pass

    def fetchone(self):
        return self._rows.pop(0) if self._rows else None

    def fetchall(self):
        rows, self._rows = self._rows, []
        return rows

    def execute(self, statement: str, *parameters) -> Cursor:
        if len(parameters) == 1 and isinstance(parameters[0], list | tuple):
            parameters = tuple(parameters[0])  # pyodbc takes a sequence as the parameters too
        pool, session = self.pool, self.session
        pool.sent.append(Sent(session.number, statement, parameters, session.autocommit))
        injected = pool._injected(statement)
        if injected is not None:
            raise injected
        if len(parameters) > synapse.MAX_PARAMETERS:
            raise service_error(
                pyodbc.ProgrammingError,
                "42000",
                "The incoming request has too many parameters. The server supports a maximum of "
                "2100 parameters. Reduce the number of parameters and resend the request.",
                8003,
            )
        try:
            parsed = sqlglot.parse(statement, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
        except sqlglot.errors.ParseError:
            raise syntax_error(statement.split()[0]) from None
        (tree,) = [tree for tree in parsed if tree is not None]
        if isinstance(tree, exp.Command):
            raise syntax_error(tree.name)
        if statement.count("?") != len(parameters):
            raise service_error(pyodbc.Error, "07002", "COUNT field incorrect", None)
        self._check(statement, tree, parameters)
        return self._run(tree, parameters)

    # -- the rules --

    def _check(self, statement: str, tree: exp.Expression, parameters: tuple) -> None:
        pool, session = self.pool, self.session
        dedicated = pool.edition == DEDICATED_POOL
        if dedicated and not session.autocommit and isinstance(tree, _DDL):
            raise service_error(
                pyodbc.ProgrammingError,
                "42000",
                f"{type(tree).__name__.upper()} is not supported inside a user transaction "
                "(dedicated SQL pools: no DDL such as CREATE TABLE in a user-defined transaction)",
                None,
            )
        if dedicated:
            for values in tree.find_all(exp.Values):
                if len(values.expressions) > 1:
                    raise syntax_error(",")
        if not dedicated and re.search(
            r"WITH\s*\(\s*(DISTRIBUTION|HEAP|CLUSTERED COLUMNSTORE)", statement, re.IGNORECASE
        ):
            raise syntax_error("DISTRIBUTION")
        if isinstance(tree, exp.Copy) and not dedicated:
            raise syntax_error("INTO")
        if isinstance(tree, exp.Merge):
            self._check_merge(statement, tree)
        for table in tree.find_all(exp.Table):
            temporary = table.this.args.get("temporary") and not isinstance(tree, exp.Create)
            if temporary and table.name.lower() not in session.temp_tables:
                raise service_error(
                    pyodbc.ProgrammingError,
                    "42S02",
                    f"Invalid object name '#{table.name}'.",
                    208,
                )
        if isinstance(tree, exp.Insert):
            self._check_lengths(tree, parameters)

    def _check_merge(self, statement: str, tree: exp.Merge) -> None:
        if not statement.rstrip().endswith(";"):
            raise service_error(
                pyodbc.ProgrammingError,
                "42000",
                "A MERGE statement must be terminated by a semi-colon (;).",
                10713,
            )
        if self.pool.edition != DEDICATED_POOL:
            return
        if tree.args.get("returning"):
            raise syntax_error("OUTPUT")
        target = tree.this
        name = f"{target.db}.{target.name}".lower()
        inserts = [when for when in tree.find_all(exp.When) if not when.args.get("matched")]
        inserts = [when for when in inserts if isinstance(when.args.get("then"), exp.Insert)]
        if inserts and self.pool.distributions.get(name) != "HASH":
            raise service_error(
                pyodbc.ProgrammingError,
                "42000",
                "MERGE ... WHEN NOT MATCHED BY TARGET is supported only for HASH distributed "
                "target tables.",
                None,
            )

    def _column_types(self, table: exp.Table) -> dict[str, str]:
        if table.this.args.get("temporary"):
            return self.session.temp_tables.get(table.name.lower(), {})
        return self.pool.types.get(f"{table.db}.{table.name}".lower(), {})

    def _check_lengths(self, tree: exp.Insert, parameters: tuple) -> None:
        """NVARCHAR(n) holds n UTF-16 code units: a staged value longer than its column is
        refused (a staging INSERT's parameters are its rows' values, row after row, in the
        column list's order)."""
        target = tree.this
        if not isinstance(target, exp.Schema) or not target.this.this.args.get("temporary"):
            return
        types = self._column_types(target.this)
        columns = [column.name.lower() for column in target.expressions]
        for index, value in enumerate(parameters):
            column = columns[index % len(columns)]
            sql_type = types.get(column, "")
            too_long = (
                isinstance(value, str)
                and sql_type.startswith("NVARCHAR(")
                and "MAX" not in sql_type
                and len(value.encode("utf-16-le")) // 2 > int(sql_type[9:-1])
            )
            if too_long or value in self.pool.refused_values:
                raise service_error(
                    pyodbc.DataError,
                    "22001",
                    f"String or binary data would be truncated in table, column '{column}'.",
                    2628,
                )

    # -- running it --

    def _run(self, tree: exp.Expression, parameters: tuple) -> Cursor:
        session = self.session
        if isinstance(tree, exp.Select) and "SERVERPROPERTY" in tree.sql("tsql").upper():
            self._rows = [(self.pool.edition,)]
            return self
        if isinstance(tree, exp.Select) and "sys.indexes" in tree.sql("tsql"):
            self._rows = [(1 if self.pool.unique_row_key else 0,)]
            return self
        if isinstance(tree, exp.Copy):
            return self._copy(tree)
        if isinstance(tree, exp.Create):
            table = tree.this.this
            if table.this.args.get("temporary"):
                session.temp_tables[table.name.lower()] = {
                    column.name.lower(): column.args["kind"].sql("tsql")
                    for column in tree.this.expressions
                }
            tree = tree.copy()
            properties = tree.args.get("properties")
            if properties is not None:  # the distribution options, checked above, go
                kept = [p for p in properties.expressions if isinstance(p, exp.TemporaryProperty)]
                tree.set("properties", exp.Properties(expressions=kept) if kept else None)
            for column in tree.this.expressions:  # T-SQL's types as DuckDB has them
                kind = column.args["kind"]
                kind.replace(exp.DataType.build(_duckdb_type(kind.sql("tsql")), dialect="duckdb"))
        result = session.db.execute(tree.sql("duckdb"), list(parameters))
        if isinstance(tree, exp.Select):
            self._rows = [tuple(row) for row in result.fetchall()]
            self.rowcount = -1
        else:
            counted = result.fetchall()
            self.rowcount = counted[0][0] if counted and counted[0] else -1
        return self

    def _copy(self, tree: exp.Copy) -> Cursor:
        options = {param.this.name.upper(): param for param in tree.args["params"]}
        assert options["FILE_TYPE"].expression.name.upper() == "PARQUET"
        credential = {
            prop.this.name.upper(): prop.args["value"].name
            for prop in options["CREDENTIAL"].expressions
            if isinstance(prop, exp.Property)
        }
        (source,) = tree.args["files"]
        table = self.pool.read_file(source.name, credential)
        target = tree.this
        names = [column.name for column in target.expressions]
        types = self._column_types(target.this)
        if table.num_columns != len(names):
            raise service_error(
                pyodbc.ProgrammingError,
                "42000",
                f"The number of columns in the file ({table.num_columns}) does not match the "
                f"column list ({len(names)}).",
                None,
            )
        for field, name in zip(table.schema, names, strict=True):
            declared = types[name.lower()].split("(")[0]
            accepted = {
                "NVARCHAR": pa.types.is_string,
                "DATETIME2": pa.types.is_timestamp,
                "FLOAT": pa.types.is_float64,
                "INT": pa.types.is_int32,
                "INTEGER": pa.types.is_int32,  # INT as sqlglot writes it
                "BIGINT": pa.types.is_int64,
            }[declared]
            if not accepted(field.type):
                raise service_error(
                    pyodbc.ProgrammingError,
                    "42000",
                    f"Column '{name}' of type {declared} is not compatible with external data "
                    f"type '{field.type}'.",
                    None,
                )
        self.session.db.register("copied", table.rename_columns(names))
        try:
            quoted = ", ".join(f'"{name}"' for name in names)
            self.session.db.execute(
                f"INSERT INTO {target.this.name} ({quoted}) SELECT {quoted} FROM copied"
            )
        finally:
            self.session.db.unregister("copied")
        self.rowcount = table.num_rows
        return self


# ---- the writer against it ----

#: Pools by name, so that a Beam pipeline's pickled writer factory can find its pool.
POOLS: dict[str, DedicatedPool] = {}


def pool_writer(name: str, table: TableSpec, **kwargs: Any) -> SynapseWriter:
    return SynapseWriter(lambda: POOLS[name].connect(), table, location="pool", **kwargs)


def fact(order: int, seat: str | None = "A1", key: str | None = None) -> tuple:
    booked = dt.datetime(2026, 2, 8, 10, 30, 0, 123456) + dt.timedelta(seconds=order)
    return (
        f"o{order}", booked, "c1", "Zoë", "ana@example.com", "e1", "Rock Concert", "1 Main St",
        seat, 75.5, "Concert", "Sunday", 10, f"p{order}", booked + dt.timedelta(seconds=30),
        75.5, "Credit Card", "Card", booked, booked + dt.timedelta(seconds=30),
        key or fact_row_key(f"0:{order}:0", f"1:{order}"),
    )  # fmt: skip


@pytest.fixture
def pool():
    pool = DedicatedPool()
    pool.create(FACTS, DEAD_LETTERS)
    POOLS["pool"] = pool
    yield pool
    POOLS.pop("pool", None)


def assert_the_pool_accepted_every_statement(pool: DedicatedPool) -> None:
    """What every write path must hold to (module doc): autocommit throughout; the staging
    table created once per session, emptied with DELETE; each move one statement, keyed and
    time-bounded for facts; no request over the parameter limit."""
    assert pool.sent
    assert all(sent.autocommit for sent in pool.sent), "a statement ran in a user transaction"
    assert not pool.statements(r"^\s*(TRUNCATE|DROP|ALTER|MERGE|BEGIN|COMMIT)")
    creates = pool.statements(r"^CREATE TABLE #bms_staging")
    sessions = [sent.session for sent in creates]
    assert len(sessions) == len(set(sessions)), "the staging table was made twice in a session"
    assert all(
        sent.statement.endswith("WITH (DISTRIBUTION = ROUND_ROBIN, HEAP)") for sent in creates
    )
    assert all(len(sent.parameters) <= synapse.STATEMENT_PARAMETERS for sent in pool.sent)
    for move in pool.statements(r'^INSERT INTO "bookymyshow"'):
        tree = sqlglot.parse_one(move.statement, read="tsql")
        (exists,) = list(tree.find_all(exp.Exists))
        compared = {c.name for c in exists.find_all(exp.Column)}
        if '"bookings_fact"' in move.statement.split("(")[0]:
            assert compared == {"booking_event_time", "order_id", "row_key"}
            assert len(move.parameters) == 2
        else:
            assert compared == {"row_key"}


def test_the_insert_path_writes_each_key_once_and_the_pool_accepts_every_statement(pool):
    writer = pool_writer("pool", FACTS)
    rows = [fact(n) for n in range(250)]  # three staging INSERTs: 99 + 99 + 52 rows
    assert writer.write_batch([*rows, rows[0], rows[7]]) == 250
    twin = fact(0, key=fact_row_key("0:900:0", "1:900"))  # equal to fact(0) but for its key
    assert writer.write_batch([*rows[:50], twin, fact(300)]) == 2
    assert writer.write_batch([]) == 0
    writer.close()
    rerun = pool_writer("pool", FACTS)  # a new session: its own staging table
    assert rerun.write_batch(rows) == 0
    rerun.close()
    stored = pool.rows(FACTS)
    assert len(stored) == 252 and {row[-1] for row in stored} == {
        row[-1] for row in [*rows, twin, fact(300)]
    }
    assert_the_pool_accepted_every_statement(pool)
    stages = pool.statements(r"^INSERT INTO #bms_staging")
    assert [len(sent.parameters) // 21 for sent in stages[:3]] == [99, 99, 52]
    assert "UNION ALL SELECT" in stages[0].statement and "VALUES" not in stages[0].statement
    assert len(pool.statements("^CREATE TABLE #bms_staging")) == 2  # two sessions
    assert len(pool.statements("^DELETE FROM #bms_staging")) == 1  # the first session's 2nd batch
    assert pool.sent[0].statement == synapse.engine_query()


def test_dead_letters_are_written_through_the_insert_path(pool):
    writer = pool_writer("pool", DEAD_LETTERS)
    letters = [
        DeadLetter("bookingtopic", "3", n, 1_770_546_600_123_456 + n, b"\x00{", "bad", f"b:3:{n}")
        for n in range(400)  # two staging INSERTs of 299 and 101 rows (7 columns)
    ]
    assert writer.write_batch([dead_letter_row(letter) for letter in letters]) == 400
    assert writer.write_batch([dead_letter_row(letters[0])]) == 0
    writer.close()
    assert len(pool.rows(DEAD_LETTERS)) == 400
    assert_the_pool_accepted_every_statement(pool)
    assert max(len(sent.parameters) for sent in pool.sent) == 299 * 7


def test_the_writer_turns_autocommit_on_before_its_first_statement(pool):
    # pyodbc.connect's default is autocommit off: the writer must not depend on connect() to
    # turn it on (the earlier writer did not, and its CREATE TABLE failed on a real pool).
    writer = SynapseWriter(lambda: pool.connect(autocommit=False), FACTS)
    assert writer.write_batch([fact(1)]) == 1
    writer.close()
    assert_the_pool_accepted_every_statement(pool)


def test_transient_failures_drop_the_session_and_the_retry_starts_afresh(pool):
    writer = pool_writer("pool", FACTS)
    assert writer.write_batch([fact(1)]) == 1
    lost = service_error(
        pyodbc.ProgrammingError,
        "42000",
        "An attempt to complete a transaction has failed. No corresponding transaction found.",
        111214,
    )
    pool.fail(r'^INSERT INTO "bookymyshow"', lost)
    with pytest.raises(pyodbc.ProgrammingError) as raised:
        writer.write_batch([fact(2), fact(1)])
    assert raised.value is lost and writer.is_transient(lost)
    assert writer._connection is None
    busy = service_error(pyodbc.Error, "42000", "The service is currently busy.", 40501)
    pool.fail("^DELETE|^CREATE", busy)
    with pytest.raises(pyodbc.Error):
        writer.write_batch([fact(2)])
    assert writer.write_batch([fact(2), fact(1)]) == 1  # a third session, a new staging table
    writer.close()
    assert [row[0] for row in pool.rows(FACTS)] == ["o1", "o2"]
    assert len({sent.session for sent in pool.statements("^CREATE TABLE #bms")}) == 3
    assert_the_pool_accepted_every_statement(pool)


def test_values_the_pool_refuses_are_data_errors_and_leave_nothing(pool):
    writer = pool_writer("pool", FACTS)
    too_long = fact(1, seat="A-VERY-LONG-SEAT")  # NVARCHAR(10): the sink checks this first
    with pytest.raises(pyodbc.DataError) as raised:
        writer.write_batch([fact(0), too_long])
    assert writer.is_data_error(raised.value) and not writer.is_transient(raised.value)
    assert writer.write_batch([fact(0)]) == 1
    writer.close()
    assert len(pool.rows(FACTS)) == 1


def open_pool_writer(name: str, target: str) -> SynapseWriter:
    return pool_writer(name, FACTS if target == "facts" else DEAD_LETTERS)


#: Dead letters the sink emitted, by test (a module-level function appends: Beam pickles a
#: bound method with a copy of its list).
LETTERS: list[DeadLetter] = []


def collect_letter(letter: DeadLetter) -> None:
    LETTERS.append(letter)


@pytest.mark.parametrize("batch_seconds", [0.0, 30.0], ids=["per-bundle", "across-bundles"])
def test_the_sink_writes_through_the_pool_with_retries_and_bisection(pool, batch_seconds):
    """The generic sink (validation, retries, bisection, batching across bundles) over the
    writer over the pool: a throttled pool is waited out, a value the pool refuses becomes a
    dead letter alone, and every statement is one a dedicated pool accepts."""
    pool.fail(r'^INSERT INTO "bookymyshow"', service_error(pyodbc.Error, "42000", "busy", 40501))
    rows = [fact(n) for n in range(30)]
    refused = rows[3][:6] + ("Only the pool refuses this",) + rows[3][7:]
    pool.refused_values.add(refused[6])
    rows[3] = refused
    LETTERS.clear()
    pipeline = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions())
    _ = (
        pipeline
        | beam.Create(rows)
        | one_row_batches()
        | WriteRows(
            functools.partial(open_pool_writer, "pool", "facts"),
            "facts",
            batch_size=8,
            retry_deadline=30,
            max_backoff=0.1,
            batch_seconds=batch_seconds,
            writers=2,
        )
        | beam.Map(collect_letter)
    )
    pipeline.run().wait_until_finish()
    assert {row[-1] for row in pool.rows(FACTS)} == {row[-1] for row in rows} - {refused[-1]}
    assert [letter.row_key for letter in LETTERS] == [refused[-1]]
    assert "refused: DataError" in LETTERS[0].reason
    assert_the_pool_accepted_every_statement(pool)


# ---- Azure SQL Database / SQL Server, and what is refused ----


def test_an_sql_database_gets_no_distribution_and_needs_its_unique_index():
    pool = DedicatedPool(SQL_DATABASE)
    pool.create(FACTS)
    writer = SynapseWriter(lambda: pool.connect(autocommit=True), FACTS)
    assert writer.write_batch([fact(1), fact(2)]) == 2
    assert writer.dialect == MSSQL
    writer.close()
    (create,) = pool.statements("^CREATE TABLE")
    assert "DISTRIBUTION" not in create.statement and "HEAP" not in create.statement
    assert pool.statements(r"sys\.indexes")

    no_index = DedicatedPool(SQL_DATABASE, unique_row_key=False)
    no_index.create(FACTS)
    writer = SynapseWriter(lambda: no_index.connect(autocommit=True), FACTS)
    with pytest.raises(WarehouseWriteError, match="no unique index on row_key.*mssql_create"):
        writer.write_batch([fact(1)])
    assert not no_index.statements("INSERT")


def test_a_duplicate_key_from_a_racing_writer_runs_the_move_again():
    pool = DedicatedPool(SQL_DATABASE)
    pool.create(FACTS)
    writer = SynapseWriter(lambda: pool.connect(autocommit=True), FACTS, dialect=MSSQL)
    pool.fail(
        r'^INSERT INTO "bookymyshow"',
        service_error(
            pyodbc.IntegrityError, "23000", "Violation of PRIMARY KEY constraint 'pk'.", 2627
        ),
    )
    assert writer.write_batch([fact(1)]) == 1
    assert len(pool.statements(r'^INSERT INTO "bookymyshow"')) == 2


def test_staging_and_serverless_pools_are_refused_in_one_line():
    database = DedicatedPool(SQL_DATABASE)
    database.create(FACTS)
    staged = SynapseWriter(lambda: database.connect(True), FACTS, staging=object())
    with pytest.raises(WarehouseWriteError, match="only a dedicated SQL pool has") as raised:
        staged.prepare()
    assert "\n" not in str(raised.value)
    serverless = DedicatedPool(SERVERLESS_POOL)
    writer = SynapseWriter(lambda: serverless.connect(True), FACTS)
    with pytest.raises(WarehouseWriteError, match="serverless SQL pool"):
        writer.prepare()


# ---- the fake refuses what the service refuses ----

STAGING = synapse.create_staging_statement(FACTS, SYNAPSE)
MERGE_HEAD = "MERGE INTO bookymyshow.{} AS t USING #bms_staging AS s ON t.row_key = s.row_key "
#: case: (engine, autocommit, statement, parameters, what the error says)
REFUSED = {
    "create-table-in-a-transaction": (DEDICATED_POOL, False, STAGING, (), "user transaction"),
    "truncate-in-a-transaction": (
        DEDICATED_POOL,
        False,
        "TRUNCATE TABLE #bms_staging",
        (),
        "user transaction",
    ),
    "too-many-parameters": (
        DEDICATED_POOL,
        True,
        "SELECT " + ", ".join("?" * 2101),
        (1,) * 2101,
        "(8003)",
    ),
    "multi-row-values": (
        DEDICATED_POOL,
        True,
        'INSERT INTO #bms_staging ("order_id") VALUES (?), (?)',
        ("o1", "o2"),
        "near ','",
    ),
    "merge-insert-into-round-robin": (
        DEDICATED_POOL,
        True,
        MERGE_HEAD.format("round_robin")
        + "WHEN NOT MATCHED BY TARGET THEN INSERT (row_key) VALUES (s.row_key);",
        (),
        "only for HASH distributed",
    ),
    "merge-output": (
        DEDICATED_POOL,
        True,
        MERGE_HEAD.format("bookings_fact")
        + "WHEN NOT MATCHED THEN INSERT (row_key) VALUES (s.row_key) OUTPUT inserted.row_key;",
        (),
        "near 'OUTPUT'",
    ),
    "merge-without-semicolon": (
        SQL_DATABASE,
        True,
        MERGE_HEAD.format("bookings_fact")
        + "WHEN NOT MATCHED THEN INSERT (row_key) VALUES (s.row_key)",
        (),
        "(10713)",
    ),
    "distribution-to-sql-database": (SQL_DATABASE, True, STAGING, (), "near 'DISTRIBUTION'"),
    "copy-to-sql-database": (
        SQL_DATABASE,
        True,
        "COPY INTO #bms_staging FROM 'https://a.blob.core.windows.net/c/f.parquet' "
        "WITH (FILE_TYPE = 'PARQUET')",
        (),
        "near 'INTO'",
    ),
    "temp-table-of-another-session": (
        DEDICATED_POOL,
        True,
        "DELETE FROM #bms_staging",
        (),
        "(208)",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_fake_refuses_what_the_service_refuses(case):
    edition, autocommit, statement, parameters, says = REFUSED[case]
    pool = DedicatedPool(edition)
    pool.create(FACTS, DEAD_LETTERS, FACTS._replace(name="round_robin", distribution=None))
    session = pool.connect(autocommit=autocommit)
    if "MERGE" in statement:
        engine = SYNAPSE if edition == DEDICATED_POOL else MSSQL
        session.execute(synapse.create_staging_statement(FACTS, engine))
    with pytest.raises(pyodbc.Error) as raised:
        session.execute(statement, list(parameters))
    assert says in raised.value.args[1]
    assert not synapse.is_transient(raised.value)


def test_the_fake_accepts_the_same_statements_done_right():
    pool = DedicatedPool()
    pool.create(FACTS, DEAD_LETTERS)
    session = pool.connect(autocommit=True)
    session.execute(STAGING)
    session.execute("TRUNCATE TABLE #bms_staging")
    session.execute("SELECT " + ", ".join("?" * 2100), [1] * 2100)
    session.execute(
        'INSERT INTO #bms_staging ("order_id", "row_key") SELECT ?, ? UNION ALL SELECT ?, ?',
        ["o1", "k1", "o2", "k2"],
    )
    session.execute(
        MERGE_HEAD.format("bookings_fact")
        + "WHEN NOT MATCHED THEN INSERT (row_key, order_id) VALUES (s.row_key, s.order_id);"
    )
    assert pool.statements("^MERGE")[0].autocommit
    assert [row[-1] for row in pool.rows(FACTS)] == ["k1", "k2"]
