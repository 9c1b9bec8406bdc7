"""Writing fact rows and dead letters to Azure Synapse (dedicated SQL pool) or SQL Server, pyodbc.

Setup (see the README's Azure section): Microsoft ODBC Driver 18 for SQL Server and unixODBC on
the workers, the tables from ``sql/synapse_create_table.sql``, and an identity allowed to SELECT
and INSERT.

The target is either
  - ``mssql+pyodbc://SERVER/DATABASE`` (e.g. ``WORKSPACE.sql.azuresynapse.net/POOL``), optionally
    ``?driver=...`` and ``&idempotent=false``; or
  - an ODBC connection string, ``Driver={ODBC Driver 18 for SQL Server};Server=...;Database=...``.

Authentication: SQL authentication when the connection string carries ``UID``/``PWD`` or the
environment variables ``SYNAPSE_USER``/``SYNAPSE_PASSWORD`` are set (never a flag or a URL
password); otherwise an Entra ID access token from azure-identity's ``DefaultAzureCredential``
(managed identity, service principal, ``az login``), handed to the driver before connecting as
the ``SQL_COPT_SS_ACCESS_TOKEN`` attribute in the layout the driver expects: a 4-byte
little-endian length followed by the token in UTF-16-LE.

Writes. Dedicated pools reject multi-row ``INSERT ... VALUES``, so rows go in as one
parameterised single-row INSERT run by ``executemany`` (``fast_executemany`` with Microsoft's
driver: one round trip per batch), one transaction per batch. Transient failures (dropped
connection, deadlock victim 1205, throttling 40501/40613/49918...) reconnect and retry the batch
with exponential backoff; anything else fails at once with the server's message.

Idempotent mode (the default): a replay after a failure must not duplicate rows. MERGE would do,
but dedicated pools restrict it (hash-distributed targets only, no OUTPUT, a history of
limitations), so each batch goes to a session temp table and then ``INSERT ... SELECT ... WHERE
NOT EXISTS`` on the row's natural key moves only the rows the table lacks (duplicates within
the batch collapse by ``ROW_NUMBER``). The same statements run on every dedicated pool, on
SQL Server and, with a different temp-table declaration only, on PostgreSQL, which is how the
tests run this code for real through an ODBC driver.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.errors import UsageError
from pipeline.io.azure import connection_string_settings, default_credential
from pipeline.schema import (
    DEAD_LETTER_KEY,
    DEAD_LETTER_TABLE,
    FACT_COLUMNS,
    FACT_KEY,
    FACT_SCHEMA,
    FACT_TABLE,
    Column,
    DeadLetter,
    micros_to_datetime,
)

USER_ENV = "SYNAPSE_USER"
PASSWORD_ENV = "SYNAPSE_PASSWORD"
DEFAULT_DRIVER = "ODBC Driver 18 for SQL Server"
SQL_COPT_SS_ACCESS_TOKEN = 1256  # msodbcsql.h: pre-connect attribute carrying an access token
TOKEN_SCOPE = "https://database.windows.net/.default"
TSQL = "tsql"
POSTGRES = "postgres"

INSTALL_HINT = (
    "install unixODBC (apt-get install unixodbc) and Microsoft ODBC Driver 18 for SQL Server "
    "(msodbcsql18, see https://learn.microsoft.com/sql/connect/odbc/linux-mac/"
    "installing-the-microsoft-odbc-driver-for-sql-server), "
    "then pip install -e '.[synapse]' in the bms checkout"
)


class TableSpec(NamedTuple):
    """A target table: its columns in DDL order and the natural key that identifies a row."""

    schema: str
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def qualified_name(self) -> str:
        return f'"{self.schema}"."{self.name}"'


FACTS = TableSpec(
    FACT_SCHEMA,
    FACT_TABLE,
    FACT_COLUMNS,
    FACT_KEY,
)
DEAD_LETTERS = TableSpec(
    FACT_SCHEMA,
    DEAD_LETTER_TABLE,
    (
        Column("hub", "NVARCHAR(50)"),
        Column("partition", "NVARCHAR(10)"),
        Column("sequence_number", "BIGINT"),
        Column("enqueued_time", "DATETIME2"),
        Column("body", "VARBINARY(MAX)"),
        Column("reason", "NVARCHAR(4000)"),
    ),
    DEAD_LETTER_KEY,
)
TARGETS = {"facts": FACTS, "dead_letters": DEAD_LETTERS}


# ---- statements (pure: the T-SQL ones are parsed by sqlglot in the tests) ----

_STAGING = {TSQL: "#bms_staging", POSTGRES: "bms_staging"}
_POSTGRES_TYPES = {
    "NVARCHAR": "VARCHAR",
    "DATETIME2": "TIMESTAMP",
    "FLOAT": "DOUBLE PRECISION",
    "VARBINARY": "BYTEA",
}


def _names(table: TableSpec, prefix: str = "") -> str:
    return ", ".join(f'{prefix}"{column.name}"' for column in table.columns)


def _placeholders(table: TableSpec) -> str:
    return ", ".join("?" for _ in table.columns)


def insert_statement(table: TableSpec) -> str:
    """The single-row parameterised INSERT that executemany repeats."""
    return f"INSERT INTO {table.qualified_name} ({_names(table)}) VALUES ({_placeholders(table)})"


def columns_query() -> str:
    """The target's columns, in order (parameters: schema, table)."""
    return (
        "SELECT COLUMN_NAME FROM INFORMATION_SCHEMA.COLUMNS "
        "WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION"
    )


def _staging_type(sql_type: str, dialect: str) -> str:
    if dialect == TSQL:
        return sql_type
    name, _, size = sql_type.partition("(")
    if name == "VARBINARY":
        return "BYTEA"
    return _POSTGRES_TYPES.get(name, name) + (f"({size}" if size else "")


def create_staging_statement(table: TableSpec, dialect: str) -> str:
    """A session-scoped temp table shaped like the target (dropped with the connection)."""
    columns = ", ".join(
        f'"{column.name}" {_staging_type(column.sql_type, dialect)}' for column in table.columns
    )
    if dialect == TSQL:
        # Dedicated pools need a distribution; round robin and a heap load fastest.
        return f"CREATE TABLE {_STAGING[TSQL]} ({columns}) WITH (DISTRIBUTION = ROUND_ROBIN, HEAP)"
    return f"CREATE TEMPORARY TABLE {_STAGING[POSTGRES]} ({columns})"


def stage_statement(table: TableSpec, dialect: str) -> str:
    return f"INSERT INTO {_STAGING[dialect]} ({_names(table)}) VALUES ({_placeholders(table)})"


def clear_staging_statement(dialect: str) -> str:
    return f"TRUNCATE TABLE {_STAGING[dialect]}"


def merge_staging_statement(table: TableSpec, dialect: str) -> str:
    """Moves the staged rows the target lacks, by natural key (NULL equals NULL), into it."""
    same_key = " AND ".join(
        f'(t."{name}" = s."{name}" OR (t."{name}" IS NULL AND s."{name}" IS NULL))'
        for name in table.key
    )
    key = ", ".join(f'"{name}"' for name in table.key)
    return (
        f"INSERT INTO {table.qualified_name} ({_names(table)}) "
        f"SELECT {_names(table, 's.')} FROM ("
        f"SELECT {_names(table)}, ROW_NUMBER() OVER (PARTITION BY {key} ORDER BY (SELECT NULL)) "
        f"AS row_in_key FROM {_STAGING[dialect]}) AS s "
        f"WHERE s.row_in_key = 1 AND NOT EXISTS ("
        f"SELECT 1 FROM {table.qualified_name} AS t WHERE {same_key})"
    )


def column_mismatch(table: TableSpec, actual: Sequence[str]) -> str | None:
    """What differs between the table's columns and the ones we write (None when they match).
    Names are compared case-insensitively, as SQL Server's default collation does."""
    if not actual:
        return (
            f"table {table.schema}.{table.name} does not exist; create it with "
            "sql/synapse_create_table.sql"
        )
    expected = [column.name.lower() for column in table.columns]
    present = [name.lower() for name in actual]
    missing = [name for name in expected if name not in present]
    extra = [name for name in present if name not in expected]
    if not missing and not extra:
        return None
    details = []
    if missing:
        details.append(f"missing {', '.join(missing)}")
    if extra:
        details.append(f"unexpected {', '.join(extra)}")
    return (
        f"table {table.schema}.{table.name} does not have the expected columns "
        f"({'; '.join(details)}); recreate it with sql/synapse_create_table.sql"
    )


# ---- connecting ----


class Target(NamedTuple):
    """How to reach the database: an ODBC connection string (without secrets from the
    environment, which are added at connect time), the dialect, and the write mode."""

    connection_string: str
    dialect: str = TSQL
    idempotent: bool = True

    def __repr__(self) -> str:  # never show a password
        return f"Target({_redact(self.connection_string)!r}, {self.dialect!r}, {self.idempotent})"


def is_odbc_target(url: str) -> bool:
    """Whether a warehouse URL is for this writer (SQL Server/Synapse URL or ODBC string)."""
    return url.startswith(("mssql+pyodbc://", "mssql://")) or bool(
        re.match(r"\s*driver\s*=", url, re.IGNORECASE)
    )


def _redact(connection_string: str) -> str:
    return re.sub(r"(?i)(pwd|password)\s*=\s*[^;]*", r"\1=***", connection_string)


def parse_target(url: str) -> Target:
    """A ``Target`` from ``mssql+pyodbc://SERVER/DATABASE[?driver=..&idempotent=..]`` or an
    ODBC connection string (see the module docstring)."""
    if not is_odbc_target(url):
        raise UsageError(f"not a SQL Server/Synapse target: {url!r}")
    if not url.startswith("mssql"):
        driver = connection_string_settings(url).get("driver", "").strip("{}")
        dialect = POSTGRES if "postgres" in driver.lower() else TSQL
        return Target(url, dialect)
    parts = urlsplit(url)
    if parts.password:
        raise UsageError(
            f"put the password in {PASSWORD_ENV} (and the user in {USER_ENV}), not in the URL"
        )
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    unknown = set(query) - {"driver", "idempotent"}
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(sorted(unknown))} in the warehouse URL")
    if not parts.hostname or not parts.path.strip("/"):
        raise UsageError(
            "the warehouse URL needs a server and a database: mssql+pyodbc://SERVER/DB"
        )
    server = parts.hostname + (f",{parts.port}" if parts.port else "")
    driver = query.get("driver", DEFAULT_DRIVER)
    connection_string = (
        f"Driver={{{driver}}};Server=tcp:{server};Database={unquote(parts.path.strip('/'))};"
        "Encrypt=yes;TrustServerCertificate=no;Connection Timeout=30"
    )
    if parts.username:
        connection_string += f";UID={unquote(parts.username)}"
    idempotent = query.get("idempotent", "true").lower() not in ("false", "0", "no")
    return Target(connection_string, TSQL, idempotent)


def access_token_attribute(token: str) -> bytes:
    """An access token as SQL_COPT_SS_ACCESS_TOKEN wants it: length-prefixed UTF-16-LE bytes."""
    encoded = token.encode("utf-16-le")
    return struct.pack(f"<I{len(encoded)}s", len(encoded), encoded)


def require_pyodbc() -> Any:
    try:
        import pyodbc
    except ImportError as error:
        if "libodbc" in str(error):
            raise UsageError(f"pyodbc cannot load unixODBC ({error}); {INSTALL_HINT}") from None
        raise UsageError(f"pyodbc is not installed; {INSTALL_HINT}") from None
    return pyodbc


def connect(target: Target, credential: Any = None) -> Any:
    """A pyodbc connection (autocommit off) with SQL authentication or an access token."""
    pyodbc = require_pyodbc()
    settings = connection_string_settings(target.connection_string)
    driver = settings.get("driver", "").strip("{}")
    if driver and driver not in pyodbc.drivers():
        raise UsageError(
            f"the ODBC driver {driver!r} is not installed (installed: "
            f"{', '.join(pyodbc.drivers()) or 'none'}); {INSTALL_HINT}"
        )
    connection_string = target.connection_string
    attributes = {}
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if {"pwd", "password", "authentication", "trusted_connection"} & settings.keys():
        pass  # the connection string says how to sign in
    elif password:
        if not (user or settings.get("uid")):
            raise UsageError(f"{PASSWORD_ENV} is set but {USER_ENV} is not")
        if "uid" not in settings:
            connection_string += f";UID={user}"
        connection_string += f";PWD={{{password.replace('}', '}}')}}}"
    else:
        credential = credential or default_credential()
        try:
            token = credential.get_token(TOKEN_SCOPE).token
        except Exception as error:
            raise UsageError(
                f"no Azure token for Synapse ({type(error).__name__}); sign in (az login, a "
                "managed identity, or AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET) or set "
                f"{USER_ENV}/{PASSWORD_ENV} for SQL authentication"
            ) from None
        attributes[SQL_COPT_SS_ACCESS_TOKEN] = access_token_attribute(token)
    return pyodbc.connect(connection_string, attrs_before=attributes or None, autocommit=False)


# ---- retries ----

_TRANSIENT_SQLSTATES = {
    "08S01",  # communication link failure (connection dropped)
    "08001",  # unable to connect
    "40001",  # serialization failure: deadlock victim
    "HYT00",  # timeout expired
    "HYT01",  # connection timeout expired
    # PostgreSQL's equivalents, for the tests' real server: admin/crash shutdown, deadlock
    "57P01",
    "57P02",
    "57P03",
    "40P01",
}
_TRANSIENT_ERRORS = {
    1205,  # deadlock victim
    40197,  # service error processing the request
    40501,  # service busy (throttled)
    40613,  # database not currently available
    49918,  # not enough resources to process the request
    49919,  # too many create/update operations
    49920,  # too many operations in progress
    10928,  # resource limit reached
    10929,  # minimum guarantee not available
    4221,  # login to read-secondary failed (long wait on HADR)
    233,  # connection forcibly closed during login
    10053,  # transport-level error
    10054,  # connection reset by peer
    10060,  # connection timed out
}
_NATIVE_ERROR = re.compile(r"\((\d+)\)\s*\(SQL\w+\)")


def is_transient(error: BaseException) -> bool:
    """Whether a database error is worth retrying: a dropped connection, deadlock or throttling.

    pyodbc errors carry the SQLSTATE first and the driver's message (ending in the native error
    number, e.g. ``... (1205) (SQLExecDirectW)``) second."""
    args = getattr(error, "args", ())
    sqlstate = args[0] if args and isinstance(args[0], str) else ""
    if sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08"):
        return True
    message = " ".join(str(arg) for arg in args[1:])
    return any(int(code) in _TRANSIENT_ERRORS for code in _NATIVE_ERROR.findall(message))


class WarehouseWriteError(RuntimeError):
    """Rows could not be written (after retrying what is worth retrying)."""


class SynapseWriter:
    """Writes rows of one table in batches; reconnects and retries transient failures.

    Args:
      connect: opens a new DB-API connection (autocommit off).
      table: the target table.
      dialect: ``tsql`` (Synapse, SQL Server) or ``postgres`` (the tests' real server).
      idempotent: insert only rows whose natural key the table lacks.
      batch_size: rows per transaction.
      attempts, backoff, max_backoff: retry policy for transient failures (seconds, doubling).
      fast_executemany: pyodbc's array binding (Microsoft's driver).
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        table: TableSpec = FACTS,
        *,
        dialect: str = TSQL,
        idempotent: bool = True,
        batch_size: int = 1000,
        attempts: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        fast_executemany: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if dialect not in _STAGING:
            raise ValueError(f"dialect must be {TSQL!r} or {POSTGRES!r}, got {dialect!r}")
        self._connect = connect
        self.table = table
        self._dialect = dialect
        self._idempotent = idempotent
        self.batch_size = batch_size
        self._attempts = attempts
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._fast_executemany = fast_executemany
        self._sleep = sleep
        self._connection = None
        self._staging_ready = False

    def _open(self) -> Any:
        if self._connection is None:
            self._connection = self._connect()
            self._staging_ready = False
        return self._connection

    def check_table(self) -> None:
        """Fails with one clear line if the table is missing or its columns differ."""
        rows = self._with_retry(
            "read the table's columns",
            lambda cursor: cursor.execute(
                columns_query(), self.table.schema, self.table.name
            ).fetchall(),
        )
        problem = column_mismatch(self.table, [row[0] for row in rows])
        if problem:
            raise UsageError(problem)

    def write(self, rows: Iterable[Sequence[Any]]) -> int:
        """Writes rows batch by batch; returns how many rows were inserted (idempotent mode
        skips rows already present)."""
        written, batch = 0, []
        for row in rows:
            batch.append(tuple(row))
            if len(batch) >= self.batch_size:
                written += self._write_batch(batch)
                batch = []
        if batch:
            written += self._write_batch(batch)
        return written

    def _write_batch(self, batch: list[tuple]) -> int:
        if self._idempotent:
            return self._with_retry("write a batch", lambda cursor: self._merge(cursor, batch))
        return self._with_retry("write a batch", lambda cursor: self._insert(cursor, batch))

    def _executemany(self, cursor: Any, statement: str, batch: list[tuple]) -> None:
        cursor.fast_executemany = self._fast_executemany
        cursor.executemany(statement, batch)

    def _insert(self, cursor: Any, batch: list[tuple]) -> int:
        self._executemany(cursor, insert_statement(self.table), batch)
        return len(batch)

    def _merge(self, cursor: Any, batch: list[tuple]) -> int:
        if not self._staging_ready:
            cursor.execute(create_staging_statement(self.table, self._dialect))
            self._staging_ready = True
        else:
            cursor.execute(clear_staging_statement(self._dialect))
        self._executemany(cursor, stage_statement(self.table, self._dialect), batch)
        cursor.execute(merge_staging_statement(self.table, self._dialect))
        return cursor.rowcount

    def _with_retry(self, what: str, work: Callable[[Any], Any]) -> Any:
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            try:
                connection = self._open()
                cursor = connection.cursor()
                try:
                    result = work(cursor)
                finally:
                    cursor.close()
                connection.commit()
                return result
            except UsageError:
                raise
            except Exception as error:
                self._discard_connection()
                if not is_transient(error):
                    raise WarehouseWriteError(
                        f"could not {what} in {self.table.schema}.{self.table.name}: {error}"
                    ) from error
                if attempt == self._attempts:
                    raise WarehouseWriteError(
                        f"could not {what} in {self.table.schema}.{self.table.name} after "
                        f"{attempt} attempts (the service kept failing: throttled, deadlocked "
                        f"or unreachable): {error}"
                    ) from error
                self._sleep(delay)
                delay = min(delay * 2, self._max_backoff)

    def _discard_connection(self) -> None:
        # After a failure the transaction (and maybe the connection) is gone: start afresh.
        if self._connection is not None:
            with contextlib.suppress(Exception):  # it is already broken: only tidying up
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def writer_for(url: str, target: str = "facts", **options: Any) -> SynapseWriter:
    """A writer for a warehouse URL or ODBC string (``target``: facts or dead_letters)."""
    parsed = parse_target(url)
    settings = connection_string_settings(parsed.connection_string)
    options.setdefault("idempotent", parsed.idempotent)
    options.setdefault("fast_executemany", "odbc driver" in settings.get("driver", "").lower())
    return SynapseWriter(
        lambda: connect(parsed), TARGETS[target], dialect=parsed.dialect, **options
    )


def dead_letter_row(letter: DeadLetter) -> tuple:
    return (
        letter.hub,
        letter.partition,
        letter.sequence_number,
        micros_to_datetime(letter.enqueued_time),
        letter.body,
        letter.reason,
    )


class _WriteToSynapseFn(beam.DoFn):
    """Buffers rows within a bundle and writes them through one SynapseWriter per instance."""

    def __init__(self, url: str, target: str, batch_size: int):
        self._url = url
        self._target = target
        self._batch_size = batch_size
        self._to_row = dead_letter_row if target == "dead_letters" else tuple

    def setup(self):
        self._writer = writer_for(self._url, self._target, batch_size=self._batch_size)
        self._writer.check_table()
        self._written = Metrics.counter("bms", f"{self._target}_written")

    def start_bundle(self):
        self._buffer = []

    def process(self, row):
        self._buffer.append(self._to_row(row))
        if len(self._buffer) >= self._batch_size:
            self._flush()

    def finish_bundle(self):
        self._flush()

    def _flush(self):
        if self._buffer:
            self._writer.write(self._buffer)
            self._written.inc(len(self._buffer))
            self._buffer = []

    def teardown(self):
        self._writer.close()


class WriteToSynapse(beam.PTransform):
    """Writes fact rows (20-tuples) or ``DeadLetter``s to Synapse / SQL Server, in batches.

    Args:
      url: ``mssql+pyodbc://SERVER/DATABASE`` or an ODBC connection string.
      target: ``"facts"`` or ``"dead_letters"``.
      batch_size: rows per transaction.
    """

    def __init__(self, url: str, target: str = "facts", *, batch_size: int = 1000):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be 'facts' or 'dead_letters', got {target!r}")
        parse_target(url)  # a malformed target fails at construction, not on a worker
        require_pyodbc()
        self._fn = _WriteToSynapseFn(url, target, batch_size)

    def expand(self, rows):
        return rows | beam.ParDo(self._fn)
