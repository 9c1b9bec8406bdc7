"""The warehouse sink: fact rows and dead letters into any SQLAlchemy database, in batches.

The URL chooses the database: ``sqlite:///.bms/warehouse.db`` (the embedded default),
``postgresql+psycopg://...``, or SQL Server / Synapse (``mssql+pyodbc://...`` or an ODBC
connection string), which ``pipeline.io.synapse`` writes through pyodbc. Tables are created
when missing; where the database has schemas the fact table lives in ``bookymyshow`` like the
Synapse original. Rows are buffered per bundle and written with one parameterised executemany
per batch, through one engine per DoFn instance.

Idempotent mode (``idempotent=True``; ``bms run --checkpoints`` turns it on, as a resumed job
rewrites the rows of its last join window): each batch first asks which of its natural keys
(``schema.FACT_KEY``, ``schema.DEAD_LETTER_KEY``) the table already holds, by the key's first
column, and inserts only the others; rows equal in the whole key collapse into one, as in the
Synapse writer. It assumes one job writes a table at a time.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from pathlib import Path

import apache_beam as beam
import sqlalchemy as sa
from apache_beam.metrics import Metrics

from pipeline.io import synapse
from pipeline.schema import (
    DEAD_LETTER_KEY,
    DEAD_LETTER_TABLE,
    FACT_COLUMN_NAMES,
    FACT_COLUMNS,
    FACT_KEY,
    FACT_SCHEMA,
    FACT_TABLE,
    DeadLetter,
    datetime_to_micros,
    micros_to_datetime,
)

DEFAULT_WAREHOUSE_URL = "sqlite:///.bms/warehouse.db"
DEFAULT_BATCH_SIZE = 1000

_SQL_TYPE = re.compile(r"(\w+)(?:\((\d+)\))?")


def _column_type(sql_type: str) -> sa.types.TypeEngine:
    name, length = _SQL_TYPE.fullmatch(sql_type).groups()
    if name == "NVARCHAR":
        return sa.Unicode(int(length))
    return {"FLOAT": sa.Float(), "INT": sa.Integer(), "DATETIME2": sa.DateTime()}[name]


def create_engine(url: str) -> sa.Engine:
    """An engine for a warehouse URL; a SQLite file gets its folder and a busy timeout."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        return sa.create_engine(parsed, connect_args={"timeout": 30})
    return sa.create_engine(parsed)


def warehouse_tables(engine: sa.Engine, fact_table: str = FACT_TABLE) -> tuple[sa.Table, sa.Table]:
    """The fact and dead-letter tables as they are laid out in this engine's database."""
    schema = None if engine.dialect.name == "sqlite" else FACT_SCHEMA
    metadata = sa.MetaData(schema=schema)
    facts = sa.Table(
        fact_table,
        metadata,
        *(
            sa.Column(c.name, _column_type(c.sql_type), nullable=c.name != "order_id")
            for c in FACT_COLUMNS
        ),
    )
    dead_letters = sa.Table(
        DEAD_LETTER_TABLE,
        metadata,
        sa.Column("hub", sa.Unicode(50), nullable=False),
        sa.Column("partition", sa.Unicode(10), nullable=False),
        sa.Column("sequence_number", sa.BigInteger, nullable=False),
        sa.Column("enqueued_time", sa.DateTime, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("reason", sa.UnicodeText, nullable=False),
    )
    return facts, dead_letters


def create_tables(engine: sa.Engine, fact_table: str = FACT_TABLE) -> tuple[sa.Table, sa.Table]:
    facts, dead_letters = warehouse_tables(engine, fact_table)
    with engine.begin() as connection:
        if facts.schema is not None:
            connection.execute(sa.schema.CreateSchema(facts.schema, if_not_exists=True))
        facts.metadata.create_all(connection)
    return facts, dead_letters


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
        raise ValueError(f"no table {table} in {engine.url.render_as_string()}") from None
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
                )
                for row in connection.execute(sa.select(dead_letters))
            ]
    finally:
        engine.dispose()


def _dead_letter_record(letter: DeadLetter) -> dict:
    return letter._replace(enqueued_time=micros_to_datetime(letter.enqueued_time))._asdict()


def new_records(
    connection: sa.Connection, table: sa.Table, key: tuple[str, ...], records: list[dict]
) -> list[dict]:
    """The records whose natural key neither the table nor an earlier record holds."""
    unique: dict[tuple, dict] = {}
    for record in records:
        unique.setdefault(tuple(record[name] for name in key), record)
    columns = [table.columns[name] for name in key]
    first_values = list({values[0] for values in unique})
    query = sa.select(*columns).where(columns[0].in_(first_values))
    present = {tuple(row) for row in connection.execute(query)}
    return [record for values, record in unique.items() if values not in present]


class _WriteBatchesFn(beam.DoFn):
    """Buffers rows within a bundle and inserts them batch by batch."""

    def __init__(self, url: str, fact_table: str, target: str, batch_size: int, idempotent: bool):
        self._url = url
        self._fact_table = fact_table
        self._target = target
        self._batch_size = batch_size
        self._key = (FACT_KEY if target == "facts" else DEAD_LETTER_KEY) if idempotent else None

    def setup(self):
        self._engine = create_engine(self._url)
        facts, dead_letters = create_tables(self._engine, self._fact_table)
        if self._target == "facts":
            self._table = facts
            self._names = [column.name for column in facts.columns]
            self._to_record = lambda row: dict(zip(self._names, row, strict=True))
        else:
            self._table = dead_letters
            self._to_record = _dead_letter_record
        self._written = Metrics.counter("bms", f"{self._target}_written")

    def start_bundle(self):
        self._buffer = []

    def process(self, row):
        self._buffer.append(row)
        if len(self._buffer) >= self._batch_size:
            self._flush()

    def finish_bundle(self):
        self._flush()

    def _flush(self):
        if not self._buffer:
            return
        records = [self._to_record(r) for r in self._buffer]
        with self._engine.begin() as connection:
            if self._key is not None:
                records = new_records(connection, self._table, self._key, records)
            if records:
                connection.execute(self._table.insert(), records)
        self._written.inc(len(records))
        self._buffer = []

    def teardown(self):
        self._engine.dispose()


class WriteToWarehouse(beam.PTransform):
    """Writes fact rows (20-tuples) or ``DeadLetter``s to a warehouse, in batches.

    Args:
      url: the warehouse's SQLAlchemy URL.
      target: ``"facts"`` or ``"dead_letters"``.
      fact_table: the fact table's name (in schema ``bookymyshow`` where schemas exist).
      batch_size: rows per insert batch.
      idempotent: skip rows whose natural key the table already holds (see the module doc);
        for SQL Server / Synapse the URL's ``idempotent`` setting decides instead.

    Returns a PCollection with no elements, whose watermark passes a time only once the rows up
    to it are written (``pipeline.io.progress.CommitPositions`` waits on it).
    """

    def __init__(
        self,
        url: str,
        target: str = "facts",
        *,
        fact_table: str = FACT_TABLE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        idempotent: bool = False,
    ):
        super().__init__()
        if target not in ("facts", "dead_letters"):
            raise ValueError(f"target must be 'facts' or 'dead_letters', got {target!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if synapse.is_odbc_target(url):  # SQL Server / Synapse: pyodbc, tables made beforehand
            self._synapse = synapse.WriteToSynapse(url, target, batch_size=batch_size)
            return
        self._synapse = None
        sa.make_url(url)  # fail at construction on a malformed URL
        self._fn = _WriteBatchesFn(url, fact_table, target, batch_size, idempotent)

    def expand(self, rows):
        if self._synapse is not None:
            return rows | self._synapse
        return rows | beam.ParDo(self._fn)


def write_rows(url: str, rows: Iterable[tuple], fact_table: str = FACT_TABLE) -> None:
    """Inserts fact rows directly (tests and tools, not the pipeline)."""
    engine = create_engine(url)
    try:
        facts, _ = create_tables(engine, fact_table)
        names = [column.name for column in facts.columns]
        records = [dict(zip(names, row, strict=True)) for row in rows]
        if records:
            with engine.begin() as connection:
                connection.execute(facts.insert(), records)
    finally:
        engine.dispose()
