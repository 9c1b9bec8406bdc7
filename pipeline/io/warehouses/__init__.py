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
import re
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
    "DRIVER_HINTS",
    "FACTS",
    "SECRET_KEY",
    "WriteToWarehouse",
    "create_engine",
    "driver_hint",
    "masked_url",
    "odbc_settings",
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
    """Writes batches (lists) of fact rows (the 20 columns and the row key) or of
    ``DeadLetter``s to a warehouse.

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

    Returns the ``DeadLetter``s of the fact rows the warehouse cannot store, one per element
    (empty for ``dead_letters``); its watermark passes a time only once the rows up to it are
    written (``pipeline.io.hubs.progress.CommitPositions`` waits on it).
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


#: Query parameters and ODBC settings never to print.
SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|sig|credential|odbc_connect", re.IGNORECASE)
_ODBC_SHOWN = ("driver", "server", "database")
#: What to install (and write) when a warehouse's database driver is missing.
DRIVER_HINTS = {
    "postgresql": "pip install -e '.[postgres]' and write postgresql+psycopg://USER@HOST/DB",
    "mssql": "pip install -e '.[synapse]' (and Microsoft's ODBC Driver 18, see the README)",
}


def driver_hint(url: str) -> str:
    """What to install for a warehouse URL whose driver is missing."""
    is_odbc = synapse.is_odbc_target(url)
    backend = "mssql" if is_odbc else sa.make_url(url).get_backend_name()
    return DRIVER_HINTS.get(backend, "install its SQLAlchemy driver")


def odbc_settings(text: str) -> dict[str, str]:
    """``Key=Value;...`` with ODBC's braces (``Pwd={a;b}``, ``}}`` for ``}``), keys lower-cased."""
    settings = {}
    for match in re.finditer(r"\s*([^=;]+?)\s*=\s*(\{(?:[^}]|\}\})*\}|[^;]*)\s*(?:;|$)", text):
        settings[match.group(1).lower()] = match.group(2)
    return settings


def _masked_odbc(text: str) -> str:
    """An ODBC connection string reduced to its driver, server and database."""
    settings = odbc_settings(text)
    kept = [f"{key.capitalize()}={settings[key]}" for key in _ODBC_SHOWN if key in settings]
    return "ODBC " + (";".join(kept) or "connection string")


def masked_url(url: str) -> str:
    """A warehouse URL fit to print: no password, no secret query parameter, an ODBC string
    reduced to its driver, server and database."""
    if synapse.is_odbc_target(url) and not url.startswith("mssql"):
        return _masked_odbc(url)
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return "(not a database URL)"
    query = {}
    for key, value in parsed.query.items():
        if key.lower() == "odbc_connect":
            value = _masked_odbc(value if isinstance(value, str) else ";".join(value))
        elif SECRET_KEY.search(key):
            value = "***"
        query[key] = value
    return parsed.set(query=query).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
