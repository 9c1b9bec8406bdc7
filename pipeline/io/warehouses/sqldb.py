"""SQLite and PostgreSQL warehouses through SQLAlchemy: the tables, the writer, and readers.

The URL chooses the database: ``sqlite:///.bms/warehouse.db`` (the embedded default) or
``postgresql+psycopg://USER@HOST/DB`` (password from the URL or ``PGPASSWORD``). Tables are
created when missing: the fact table (in schema ``bookymyshow`` where the database has schemas,
like the Synapse original) and ``dead_letters``, each with the ``row_key`` column and a unique
index on it. Each batch is one ``INSERT ... ON CONFLICT (row_key) DO NOTHING`` run through the
driver's ``executemany`` (its row count says how many rows were new): the database itself
decides which rows are new, so there is no check-then-insert race between writers and a batch
costs the same however large the table grows.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import sqlalchemy as sa

from pipeline.io.warehouses.base import FACTS, WarehouseWriteError
from pipeline.schema import (
    DEAD_LETTER_COLUMNS,
    DEAD_LETTER_TABLE,
    FACT_COLUMN_NAMES,
    FACT_SCHEMA,
    FACT_TABLE,
    FACT_TABLE_COLUMNS,
    NULLABLE_FACT_COLUMNS,
    ROW_KEY,
    Column,
    DeadLetter,
    datetime_to_micros,
)

__all__ = [
    "DEFAULT_WAREHOUSE_URL",
    "SqlAlchemyWriter",
    "create_engine",
    "create_tables",
    "read_dead_letters",
    "read_facts",
    "warehouse_tables",
    "write_rows",
]

DEFAULT_WAREHOUSE_URL = "sqlite:///.bms/warehouse.db"

_SQL_TYPE = re.compile(r"(\w+)(?:\((\w+)\))?")
_DIALECTS = ("sqlite", "postgresql")


def _column_type(sql_type: str) -> sa.types.TypeEngine:
    name, length = _SQL_TYPE.fullmatch(sql_type).groups()
    if name == "NVARCHAR":
        return sa.UnicodeText() if length == "MAX" else sa.Unicode(int(length))
    return {
        "FLOAT": sa.Float(),
        "INT": sa.Integer(),
        "BIGINT": sa.BigInteger(),
        "DATETIME2": sa.DateTime(),
        "VARBINARY": sa.LargeBinary(),
    }[name]


def create_engine(url: str) -> sa.Engine:
    """An engine for a warehouse URL that never logs statement parameters (row values) and
    checks pooled connections before use (they die with a database restart); SQLite waits up to
    30 s for another writer's lock."""
    parsed = sa.make_url(url)
    options: dict = {"hide_parameters": True, "pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        options["connect_args"] = {"timeout": 30}
    return sa.create_engine(parsed, **options)


def _table(name: str, metadata: sa.MetaData, columns: Sequence[Column], nullable) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        *(
            sa.Column(c.name, _column_type(c.sql_type), nullable=c.name in nullable)
            for c in columns
        ),
        sa.Index(f"{name}_row_key", ROW_KEY.name, unique=True),
    )


def warehouse_tables(engine: sa.Engine, fact_table: str = FACT_TABLE) -> tuple[sa.Table, sa.Table]:
    """The fact and dead-letter tables as they are laid out in this engine's database."""
    schema = None if engine.dialect.name == "sqlite" else FACT_SCHEMA
    metadata = sa.MetaData(schema=schema)
    facts = _table(fact_table, metadata, FACT_TABLE_COLUMNS, NULLABLE_FACT_COLUMNS)
    dead_letters = _table(DEAD_LETTER_TABLE, metadata, DEAD_LETTER_COLUMNS, frozenset())
    return facts, dead_letters


def _missing_row_key(connection: sa.Connection, table: sa.Table) -> str | None:
    """What an existing table lacks to enforce row identity, or None."""
    inspector = sa.inspect(connection)
    columns = {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}
    if ROW_KEY.name not in columns:
        return f"no {ROW_KEY.name} column"
    unique = [
        *(i["column_names"] for i in inspector.get_indexes(table.name, schema=table.schema)
          if i["unique"]),
        *(c["column_names"]
          for c in inspector.get_unique_constraints(table.name, schema=table.schema)),
    ]  # fmt: skip
    if [ROW_KEY.name] not in unique:
        return f"no unique index on {ROW_KEY.name}"
    return None


def create_tables(engine: sa.Engine, fact_table: str = FACT_TABLE) -> tuple[sa.Table, sa.Table]:
    """Creates the tables (and schema) where missing; fails in one line if an existing table
    cannot enforce row identity (one made by an earlier bms, or by hand)."""
    facts, dead_letters = warehouse_tables(engine, fact_table)
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            # Write-ahead logging (kept in the file): one sync per commit instead of three, and
            # readers (bms report, parity) neither wait for nor block the job's writes.
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    with engine.begin() as connection:
        if facts.schema is not None:
            connection.execute(sa.schema.CreateSchema(facts.schema, if_not_exists=True))
        facts.metadata.create_all(connection)
        for table in (facts, dead_letters):
            problem = _missing_row_key(connection, table)
            if problem:
                raise WarehouseWriteError(
                    f"table {table.fullname} in {_masked(engine)} has {problem}, so rows could "
                    f"be written twice: it was made by an earlier bms or by hand; rename or drop "
                    f"it (bms creates it anew), or add {ROW_KEY.name} VARCHAR(100) with a unique "
                    "index as sql/synapse_create_table.sql describes"
                )
    return facts, dead_letters


def _missing_sqlite_folder(url: str) -> Path | None:
    """The folder a SQLite warehouse file would be in, if it does not exist. The default
    warehouse's folder (``.bms``) is the only one made without asking."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.query.get("uri") == "true":  # file:PATH?mode=...: SQLite reads the URI itself
        return None
    folder = Path(parsed.database).parent
    if url == DEFAULT_WAREHOUSE_URL:
        folder.mkdir(parents=True, exist_ok=True)
    return None if folder.is_dir() else folder


def _insert_new_rows(dialect: sa.Dialect, table: sa.Table) -> str:
    """``INSERT ... ON CONFLICT (row_key) DO NOTHING`` for the DB-API's ``executemany``, with
    its own parameter markers (SQLite and PostgreSQL both have the clause)."""
    quote = dialect.identifier_preparer.quote
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    columns = ", ".join(quote(column.name) for column in table.columns)
    markers = ", ".join([marker] * len(table.columns))
    return (
        f"INSERT INTO {dialect.identifier_preparer.format_table(table)} ({columns}) "
        f"VALUES ({markers}) ON CONFLICT ({quote(ROW_KEY.name)}) DO NOTHING"
    )


def _sqlite_values(row: tuple, datetimes: list[int]) -> tuple:
    """A row as SQLite stores it: datetimes as the text SQLAlchemy writes and reads
    (``YYYY-MM-DD HH:MM:SS.ffffff``), so that every row compares alike."""
    values = list(row)
    for index in datetimes:
        value = values[index]
        if value is not None:
            values[index] = value.isoformat(" ", "microseconds")
    return tuple(values)


def _as_is(row: tuple, datetimes: list[int]) -> tuple:
    return row


def _masked(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


class SqlAlchemyWriter:
    """A ``base.WarehouseWriter`` for SQLite and PostgreSQL (see the module doc).

    The engine and the tables are made at the first write, so a database that is down when the
    job starts is waited out like any outage.
    """

    def __init__(self, url: str, target: str = FACTS, fact_table: str = FACT_TABLE):
        self._url = url
        self._target = target
        self._fact_table = fact_table
        parsed = sa.make_url(url)
        self._dialect = parsed.get_backend_name()
        if self._dialect not in _DIALECTS:
            raise ValueError(
                f"warehouse {parsed.render_as_string(hide_password=True)}: bms writes to "
                "sqlite://, postgresql:// or Synapse / SQL Server (mssql+pyodbc:// or an ODBC "
                "connection string)"
            )
        table = fact_table if target == FACTS else DEAD_LETTER_TABLE
        self.description = f"{parsed.render_as_string(hide_password=True)} table {table}"
        self.nul_allowed = self._dialect != "postgresql"
        self._engine: sa.Engine | None = None
        self._statement = None

    def prepare(self) -> None:
        if self._engine is None:
            folder = _missing_sqlite_folder(self._url)
            if folder is not None:
                raise WarehouseWriteError(
                    f"no folder {folder} for the SQLite warehouse {self._url}: create it, or "
                    "give --warehouse a path in an existing folder"
                )
            self._engine = create_engine(self._url)
        facts, dead_letters = create_tables(self._engine, self._fact_table)
        table = facts if self._target == FACTS else dead_letters
        self._statement = _insert_new_rows(self._engine.dialect, table)
        self._stored = _sqlite_values if self._dialect == "sqlite" else _as_is
        self._datetimes = [
            index
            for index, column in enumerate(table.columns)
            if isinstance(column.type, sa.DateTime)
        ]

    def write_batch(self, rows: Sequence[tuple]) -> int:
        if self._statement is None:
            self.prepare()
        values = [self._stored(row, self._datetimes) for row in rows]
        with self._engine.begin() as connection:
            # The driver's executemany, not SQLAlchemy's per-value processing: its rowcount is
            # the number of rows inserted, those whose row key the table lacked.
            return connection.exec_driver_sql(self._statement, values).rowcount

    def is_transient(self, error: BaseException) -> bool:
        if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
            return True
        if not isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError):
            return False
        sqlstate = getattr(error.orig, "sqlstate", None)
        if self._dialect == "sqlite":
            message = str(error.orig).lower()
            return "locked" in message or "busy" in message
        if sqlstate is None:  # failed before the server answered: refused, reset, timed out
            return True
        # connection exceptions, insufficient resources, shutdown, serialization, deadlock
        return sqlstate[:2] in ("08", "53", "57") or sqlstate in ("40001", "40P01")

    def is_data_error(self, error: BaseException) -> bool:
        if isinstance(error, sa.exc.DataError | sa.exc.IntegrityError):
            return True
        # A value the driver cannot even send (an integer too large for SQLite, ...).
        return (
            isinstance(error, sa.exc.StatementError)
            and not isinstance(error, sa.exc.DBAPIError)
            and isinstance(error.orig, ValueError | TypeError | OverflowError)
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def read_facts(
    url: str,
    table: str = FACT_TABLE,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> list[tuple]:
    """The 20 fact columns of any table that has them (``schema.table`` or ``table``) as tuples,
    optionally only rows whose booking_event_time is in [start, end)."""
    engine = create_engine(url)
    try:
        schema, _, name = table.rpartition(".")
        if not schema and engine.dialect.name != "sqlite":
            schema = FACT_SCHEMA
        reflected = sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=engine)
        missing = [column for column in FACT_COLUMN_NAMES if column not in reflected.columns]
        if missing:
            raise ValueError(f"table {table} has no column(s) {', '.join(missing)}")
        query = sa.select(*(reflected.columns[column] for column in FACT_COLUMN_NAMES))
        if start is not None:
            query = query.where(reflected.columns["booking_event_time"] >= start)
        if end is not None:
            query = query.where(reflected.columns["booking_event_time"] < end)
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]
    except sa.exc.NoSuchTableError:
        raise ValueError(f"no table {table} in {_masked(engine)}") from None
    finally:
        engine.dispose()


def read_dead_letters(url: str) -> list[DeadLetter]:
    """Every dead letter of a warehouse, enqueued times back in epoch microseconds."""
    engine = create_engine(url)
    try:
        _, dead_letters = warehouse_tables(engine)
        with engine.connect() as connection:
            return [
                DeadLetter(
                    row.hub,
                    row.partition,
                    row.sequence_number,
                    datetime_to_micros(row.enqueued_time),
                    row.body,
                    row.reason,
                    row.row_key,
                )
                for row in connection.execute(sa.select(dead_letters))
            ]
    finally:
        engine.dispose()


def write_rows(url: str, rows: Iterable[tuple], fact_table: str = FACT_TABLE) -> None:
    """Inserts rows of the 20 fact columns directly, each as a new row (tests and tools, not
    the pipeline: the row keys are random, as for rows some other system wrote)."""
    engine = create_engine(url)
    try:
        facts, _ = create_tables(engine, fact_table)
        names = [column.name for column in facts.columns]
        records = [dict(zip(names, (*row, uuid.uuid4().hex), strict=True)) for row in rows]
        if records:
            with engine.begin() as connection:
                connection.execute(facts.insert(), records)
    finally:
        engine.dispose()
