"""Where rows go: the warehouse chosen by URL, and the transform that writes to it.

  - ``sqlite:///PATH`` (the embedded default) and ``postgresql+psycopg://...``: ``sqldb``;
  - ``mssql+pyodbc://SERVER/DATABASE`` or an ODBC connection string: a Synapse dedicated SQL
    pool, Azure SQL Database or SQL Server (the server says which), ``synapse``; with
    ``staging``, a dedicated pool loaded through Parquet files and ``COPY INTO``, ``staging``.

Every target gets the same sink (``sink.WriteRows``: validation, batching, one insert per row
key, retries, isolation of refused rows); the modules here differ only in how a batch is
inserted. This package is the only place that imports the adapters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import apache_beam as beam
import sqlalchemy as sa

from pipeline.errors import UsageError
from pipeline.io.warehouses import synapse
from pipeline.io.warehouses.base import DEAD_LETTERS, FACTS, WarehouseWriter
from pipeline.io.warehouses.sink import DEFAULT_RETRY_DEADLINE_SECONDS, WriteRows
from pipeline.io.warehouses.sqldb import (
    DEFAULT_WAREHOUSE_URL,
    SqlAlchemyWriter,
    create_engine,
    read_dead_letters,
    read_facts,
    write_rows,
)
from pipeline.schema import FACT_TABLE

__all__ = [
    "DEAD_LETTERS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_RETRY_DEADLINE_SECONDS",
    "DEFAULT_STAGING_BATCH_SECONDS",
    "DEFAULT_STAGING_BATCH_SIZE",
    "DEFAULT_WAREHOUSE_URL",
    "FACTS",
    "WriteToWarehouse",
    "create_engine",
    "masked_url",
    "open_writer",
    "read_dead_letters",
    "read_facts",
    "write_rows",
]

DEFAULT_BATCH_SIZE = 1000
#: Rows per Parquet file and COPY INTO with ``staging``, and how long a batch may wait for them.
DEFAULT_STAGING_BATCH_SIZE = 50_000
DEFAULT_STAGING_BATCH_SECONDS = 30.0


def open_writer(
    url: str, target: str = FACTS, fact_table: str = FACT_TABLE, staging: str | None = None
) -> WarehouseWriter:
    """The writer for a warehouse URL (see the module doc); it connects at its first write."""
    if synapse.is_odbc_target(url):
        return synapse.writer_for(url, target, staging)
    return SqlAlchemyWriter(url, target, fact_table)


def _writer_factory(
    url: str, target: str, fact_table: str, staging: str | None
) -> Callable[[], WarehouseWriter]:
    if synapse.is_odbc_target(url):  # fail at construction, not on a worker
        synapse.parse_target(url)
        synapse.require_pyodbc()
        if staging is not None:
            from pipeline.io.warehouses.staging import check_staging

            check_staging(staging)
    elif staging is not None:
        raise UsageError(
            "--staging loads a Synapse dedicated SQL pool with COPY INTO: give --warehouse "
            "mssql+pyodbc://WORKSPACE.sql.azuresynapse.net/POOL, or leave --staging out"
        )
    else:
        SqlAlchemyWriter(url, target, fact_table)
    return functools.partial(open_writer, url, target, fact_table, staging)


class WriteToWarehouse(beam.PTransform):
    """Writes fact rows (the 20 columns and the row key) or ``DeadLetter``s to a warehouse.

    Each row key is inserted at most once, whatever is replayed or retried; see ``sink``.

    Args:
      url: the warehouse (see the module doc).
      target: ``"facts"`` or ``"dead_letters"``.
      fact_table: the fact table's name (in schema ``bookymyshow`` where schemas exist; the
        SQLite and PostgreSQL targets only).
      batch_size: rows per insert.
      retry_deadline: seconds a warehouse may stay unavailable before the job fails.
      batch_seconds: 0 ends batches with each bundle; more keeps rows across bundles until a
        batch is full or this many seconds passed (``sink``). None: 0, or 30 with ``staging``.
      staging: a blob container (``https://ACCOUNT.blob.core.windows.net/CONTAINER`` or
        ``blob:CONTAINER``): load fact rows into a dedicated pool as Parquet files with COPY
        INTO (``staging``), ``staging_batch_size`` rows at a time. Dead letters, few, are
        inserted.
      writers: with batches across bundles, how many buckets of row keys write in parallel.

    Returns the ``DeadLetter``s of the fact rows the warehouse cannot store (empty for
    ``dead_letters``); its watermark passes a time only once the rows up to it are written
    (``pipeline.io.hubs.progress.CommitPositions`` waits on it).
    """

    def __init__(
        self,
        url: str,
        target: str = FACTS,
        *,
        fact_table: str = FACT_TABLE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE_SECONDS,
        batch_seconds: float | None = None,
        staging: str | None = None,
        staging_batch_size: int = DEFAULT_STAGING_BATCH_SIZE,
        writers: int = 1,
    ):
        super().__init__()
        if target not in (FACTS, DEAD_LETTERS):
            raise ValueError(f"target must be {FACTS!r} or {DEAD_LETTERS!r}, got {target!r}")
        factory = _writer_factory(url, target, fact_table, staging)
        if staging is not None and target == FACTS:
            batch_size = staging_batch_size
            if batch_seconds is None:
                batch_seconds = DEFAULT_STAGING_BATCH_SECONDS
        elif staging is not None:  # dead letters: checked above, inserted
            factory = _writer_factory(url, target, fact_table, None)
        self._write = WriteRows(
            factory,
            target,
            batch_size=batch_size,
            retry_deadline=retry_deadline,
            batch_seconds=batch_seconds or 0.0,
            writers=writers,
        )

    def expand(self, rows):
        return rows | self._write


def masked_url(url: str) -> str:
    """A warehouse URL fit to print: no password, and an ODBC string reduced to its server."""
    if synapse.is_odbc_target(url) and not url.startswith("mssql"):
        return "the ODBC data source given with --warehouse"
    return sa.make_url(url).render_as_string(hide_password=True)
