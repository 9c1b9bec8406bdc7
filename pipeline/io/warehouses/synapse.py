"""Azure Synapse (dedicated SQL pool), Azure SQL Database or SQL Server through pyodbc:
``SynapseWriter``, a ``base.WarehouseWriter``.

Setup (see the README's Azure section and docs/synapse.md): Microsoft ODBC Driver 18 for SQL
Server and unixODBC on the workers, the tables from ``sql/synapse_create_table.sql`` (a dedicated
pool) or ``sql/mssql_create_table.sql`` (Azure SQL Database, SQL Server), and an identity allowed
to SELECT and INSERT (and, for ``--staging``, to bulk load).

The target is either
  - ``mssql+pyodbc://SERVER/DATABASE`` (e.g. ``WORKSPACE.sql.azuresynapse.net/POOL``), optionally
    ``?driver=...``; or
  - an ODBC connection string, ``Driver={ODBC Driver 18 for SQL Server};Server=...;Database=...``.
Either one still carrying ``idempotent=...`` is refused: every write is idempotent now. Which
engine it is the writer asks the server once connected (``SERVERPROPERTY('EngineEdition')``: 6
is a dedicated pool, 11 a serverless pool, which holds no tables and is refused), and it sends
each engine only statements that engine accepts: distribution options only to a dedicated pool.

Authentication: SQL authentication when the connection string carries ``UID``/``PWD`` or the
environment variables ``SYNAPSE_USER``/``SYNAPSE_PASSWORD`` are set (never a flag or a URL
password); otherwise an Entra ID access token from azure-identity's ``DefaultAzureCredential``
(managed identity, service principal, ``az login``), handed to the driver before connecting as
the ``SQL_COPT_SS_ACCESS_TOKEN`` attribute in the layout the driver expects: a 4-byte
little-endian length followed by the token in UTF-16-LE.

Connection discipline. Connections run in autocommit mode, always: a dedicated pool supports no
DDL (``CREATE TABLE``, ``TRUNCATE``...) inside a user transaction, and with autocommit off the
ODBC driver opens one implicitly (``SET IMPLICIT_TRANSACTIONS ON``) before the first statement.
Nothing here needs a multi-statement transaction: each batch is

  1. the session's staging table ``#bms_staging``, created once per connection (a session temp
     table, dropped with the connection) and emptied with ``DELETE`` before each later batch;
  2. the batch staged into it: parameterised ``INSERT ... SELECT ?, ... UNION ALL SELECT ?, ...``
     statements of at most 2,099 parameters (the server's limit is 2,100 per request, and
     dedicated pools have no multi-row ``VALUES``), or, with ``--staging``, one Parquet file and
     ``COPY INTO`` (``staging.py``);
  3. one set-based statement moving the staged rows whose row key the table lacks into it,
     ``INSERT ... SELECT ... WHERE NOT EXISTS``: atomic as every single statement is, keyed on
     ``order_id`` (the distribution column, which a row key determines) and ``row_key``, and
     looking only at the table's rows in the batch's ``booking_event_time`` range, so a
     columnstore skips every other segment and a clustered index seeks, and a batch costs the
     same however large the table grows. A key twice in one batch is staged once.

MERGE is not used: dedicated pools accept ``WHEN NOT MATCHED ... INSERT`` only into
hash-distributed tables, no ``OUTPUT``, and MERGE had a history of wrong-distribution bugs there.
A dedicated pool enforces no unique index and reads uncommitted data, so the move is not a lock:
two writers moving the same new key at the very same moment could both insert it. Within a job
a key is only ever moved by one writer at a time (the sink's keyed batching, or a retry after
the attempt it repeats), and the checkpoint lease (``pipeline.io.hubs.lease``) keeps two jobs off
one set of checkpoints, so only jobs sharing a table but not their checkpoints could race: for them
``sql/synapse_dedupe.sql`` has a view and a compaction. On Azure SQL Database and SQL Server the
table has a real unique index on ``row_key`` (checked when the writer starts), created with
``IGNORE_DUP_KEY = ON`` so that a race is a skipped row, not an error; made without it, the
writer runs the move once more on a duplicate-key error.

Failures. The writer makes one attempt per batch: on any error it drops its connection (the
next attempt connects afresh, and makes a new staging table) and re-raises the error unchanged.
The sink (``sink.py``) decides what happens next, as for every target: it retries what
``is_transient`` recognises (a dropped connection, a deadlock victim, throttling and the pool's
transient states, a storage service that is busy) with exponential backoff and jitter (tenacity)
until its retry deadline, halves batches the server refuses for their data (``is_data_error``:
SQLSTATE classes 22 and 23) down to the refused rows, and stops the job on anything else with
the server's first line.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from pipeline.errors import UsageError
from pipeline.io.azure import connection_string_settings, default_credential
from pipeline.io.warehouses import base
from pipeline.io.warehouses.base import WarehouseError, WarehouseWriteError
from pipeline.schema import (
    DEAD_LETTER_COLUMNS,
    DEAD_LETTER_TABLE,
    FACT_SCHEMA,
    FACT_TABLE,
    FACT_TABLE_COLUMNS,
    ROW_KEY,
    Column,
)

USER_ENV = "SYNAPSE_USER"
PASSWORD_ENV = "SYNAPSE_PASSWORD"
DEFAULT_DRIVER = "ODBC Driver 18 for SQL Server"
SQL_COPT_SS_ACCESS_TOKEN = 1256  # msodbcsql.h: pre-connect attribute carrying an access token
TOKEN_SCOPE = "https://database.windows.net/.default"

#: What the writer talks to. ``TSQL`` is a Microsoft server whose engine is asked once connected:
#: a dedicated pool (``SYNAPSE``) or Azure SQL Database / SQL Server (``MSSQL``). ``POSTGRES`` is
#: the tests' real server, reached through the same pyodbc code.
TSQL = "tsql"
SYNAPSE = "synapse"
MSSQL = "mssql"
POSTGRES = "postgres"
DIALECTS = (TSQL, SYNAPSE, MSSQL, POSTGRES)

#: SERVERPROPERTY('EngineEdition') of a dedicated SQL pool and of a serverless one.
DEDICATED_POOL_EDITION = 6
SERVERLESS_POOL_EDITION = 11
#: Parameters per request that SQL Server and Synapse accept, and the most a statement here has
#: (the driver's sp_executesql call takes one more for the statement text).
MAX_PARAMETERS = 2100
STATEMENT_PARAMETERS = MAX_PARAMETERS - 1

INSTALL_HINT = (
    "install unixODBC (apt-get install unixodbc) and Microsoft ODBC Driver 18 for SQL Server "
    "(msodbcsql18, see https://learn.microsoft.com/sql/connect/odbc/linux-mac/"
    "installing-the-microsoft-odbc-driver-for-sql-server), "
    "then pip install -e '.[synapse]' in the bms checkout; on Dataflow, run the workers on the "
    "image of deploy/dataflow/worker.Dockerfile (--sdk_container_image)"
)
IDEMPOTENT_REMOVED = (
    "every write is idempotent now (each row key is inserted at most once): remove "
    "idempotent=... from the warehouse URL or ODBC connection string"
)


class TableSpec(NamedTuple):
    """A target table: its columns in DDL order, the key that identifies a row, its distribution
    column in a dedicated pool (None: round robin) and the time column a batch's move is
    restricted to (None: the whole table)."""

    schema: str
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    distribution: str | None = None
    time_column: str | None = None

    @property
    def qualified_name(self) -> str:
        return f'"{self.schema}"."{self.name}"'

    @property
    def join_key(self) -> tuple[str, ...]:
        """The columns a staged row and a stored one are matched on: the distribution column
        (a row key determines it, so matching it changes nothing but lets a dedicated pool join
        each distribution locally) and the key."""
        if self.distribution in (None, *self.key):
            return self.key
        return (self.distribution, *self.key)


FACTS = TableSpec(
    FACT_SCHEMA,
    FACT_TABLE,
    FACT_TABLE_COLUMNS,
    (ROW_KEY.name,),
    distribution="order_id",
    time_column="booking_event_time",
)
DEAD_LETTERS = TableSpec(
    FACT_SCHEMA,
    DEAD_LETTER_TABLE,
    DEAD_LETTER_COLUMNS,
    (ROW_KEY.name,),
    distribution=ROW_KEY.name,
)
TARGETS = {base.FACTS: FACTS, base.DEAD_LETTERS: DEAD_LETTERS}


# ---- statements (pure: the T-SQL ones are parsed by sqlglot in the tests) ----

STAGING_TABLE = {SYNAPSE: "#bms_staging", MSSQL: "#bms_staging", POSTGRES: "bms_staging"}
_POSTGRES_TYPES = {
    "NVARCHAR": "VARCHAR",
    "DATETIME2": "TIMESTAMP",
    "FLOAT": "DOUBLE PRECISION",
    "VARBINARY": "BYTEA",
}


def _names(table: TableSpec, prefix: str = "") -> str:
    return ", ".join(f'{prefix}"{column.name}"' for column in table.columns)


def columns_query() -> str:
    """The target's columns, in order (parameters: schema, table)."""
    return (
        "SELECT COLUMN_NAME FROM INFORMATION_SCHEMA.COLUMNS "
        "WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION"
    )


def engine_query() -> str:
    """Which Microsoft engine this is: 6 a dedicated SQL pool, 11 a serverless one, 5 Azure SQL
    Database, 8 a managed instance, 1 to 4 SQL Server."""
    return "SELECT CAST(SERVERPROPERTY('EngineEdition') AS INT)"


def unique_key_query() -> str:
    """How many unique indexes of a table have exactly one key column, the named one
    (parameters: the table as ``[schema].[table]``, the column). Azure SQL Database and SQL
    Server only."""
    return (
        "SELECT COUNT(*) FROM sys.indexes AS i "
        "WHERE i.object_id = OBJECT_ID(?) AND i.is_unique = 1 "
        "AND (SELECT COUNT(*) FROM sys.index_columns AS k "
        "WHERE k.object_id = i.object_id AND k.index_id = i.index_id AND k.key_ordinal > 0) = 1 "
        "AND EXISTS (SELECT 1 FROM sys.index_columns AS k JOIN sys.columns AS c "
        "ON c.object_id = k.object_id AND c.column_id = k.column_id "
        "WHERE k.object_id = i.object_id AND k.index_id = i.index_id AND k.key_ordinal > 0 "
        "AND c.name = ?)"
    )


def _staging_type(sql_type: str, dialect: str) -> str:
    if dialect != POSTGRES:
        return sql_type
    name, _, size = sql_type.partition("(")
    if name == "VARBINARY":
        return "BYTEA"
    return _POSTGRES_TYPES.get(name, name) + (f"({size}" if size else "")


def create_staging_statement(table: TableSpec, dialect: str) -> str:
    """The session's staging table, shaped like the target (a temp table: it goes with the
    connection, and creating it needs no permission)."""
    columns = ", ".join(
        f'"{column.name}" {_staging_type(column.sql_type, dialect)}' for column in table.columns
    )
    if dialect == SYNAPSE:
        # ROUND_ROBIN + HEAP, not HASH(order_id): rows land in a round-robin heap fastest (no
        # hashing, no index upkeep), Microsoft's advice for staging tables, and for Parquet that
        # COPY INTO loads on its way to a hash-distributed table in particular. The price is one
        # shuffle of the batch's own rows (at most a batch) by order_id when the move joins them
        # to the table; matching on order_id too lets the pool move the small side, never the
        # table. A batch is too small for a columnstore's compression to pay off, hence HEAP.
        return (
            f"CREATE TABLE {STAGING_TABLE[SYNAPSE]} ({columns}) "
            "WITH (DISTRIBUTION = ROUND_ROBIN, HEAP)"
        )
    if dialect == MSSQL:
        return f"CREATE TABLE {STAGING_TABLE[MSSQL]} ({columns})"
    return f"CREATE TEMPORARY TABLE {STAGING_TABLE[POSTGRES]} ({columns})"


def clear_staging_statement(dialect: str) -> str:
    """Empties the staging table: DML, so no transaction rule of a dedicated pool applies."""
    return f"DELETE FROM {STAGING_TABLE[dialect]}"


def rows_per_statement(table: TableSpec) -> int:
    """How many rows one staging INSERT carries: as many as fit in the parameter limit."""
    return STATEMENT_PARAMETERS // len(table.columns)


def stage_statement(table: TableSpec, dialect: str, rows: int) -> str:
    """Stages ``rows`` rows (their values as parameters, row after row): ``INSERT ... SELECT
    ?, ... UNION ALL SELECT ?, ...``, the multi-row insert a dedicated pool accepts (it has no
    table value constructor, so no ``VALUES (...), (...)``). On PostgreSQL each parameter is cast
    to its column's type without a length: a UNION's untyped parameters would be text, and a
    value too long must still be refused by the staging column, not cut by the cast."""
    if not 1 <= rows <= rows_per_statement(table):
        raise ValueError(f"a staging INSERT carries 1 to {rows_per_statement(table)} rows")
    if dialect == POSTGRES:
        values = ", ".join(
            f"CAST(? AS {_staging_type(column.sql_type, dialect).partition('(')[0]})"
            for column in table.columns
        )
    else:
        values = ", ".join("?" for _ in table.columns)
    selects = " UNION ALL ".join([f"SELECT {values}"] * rows)
    return f"INSERT INTO {STAGING_TABLE[dialect]} ({_names(table)}) {selects}"


def move_statement(table: TableSpec, dialect: str, *, time_range: bool) -> str:
    """Moves the staged rows whose key the target lacks into it, in one statement. With
    ``time_range`` its two parameters are the batch's lowest and highest time (``time_column``):
    only the target's rows in that range are looked at."""
    same = [f't."{name}" = s."{name}"' for name in table.join_key]
    if time_range:
        if table.time_column is None:
            raise ValueError(f"table {table.name} has no time column")
        column = f't."{table.time_column}"'
        same.insert(0, f"{column} >= ? AND {column} <= ?")
    return (
        f"INSERT INTO {table.qualified_name} ({_names(table)}) "
        f"SELECT {_names(table, 's.')} FROM {STAGING_TABLE[dialect]} AS s "
        f"WHERE NOT EXISTS (SELECT 1 FROM {table.qualified_name} AS t WHERE {' AND '.join(same)})"
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


def first_of_each_key(rows: Sequence[tuple]) -> list[tuple]:
    """The rows, each row key (the last value) once: its first row."""
    seen: set = set()
    unique = []
    for row in rows:
        if row[-1] not in seen:
            seen.add(row[-1])
            unique.append(tuple(row))
    return unique


def time_range(table: TableSpec, rows: Sequence[tuple]) -> tuple[Any, Any] | None:
    """The lowest and highest ``time_column`` of the rows, or None when the table has no time
    column or a row has none (a NULL time could match nothing in a range)."""
    if table.time_column is None or not rows:
        return None
    index = [column.name for column in table.columns].index(table.time_column)
    times = [row[index] for row in rows]
    if any(time is None for time in times):
        return None
    return min(times), max(times)


# ---- connecting ----


class Target(NamedTuple):
    """How to reach the database: an ODBC connection string (without secrets from the
    environment, which are added at connect time) and the dialect (``TSQL`` or ``POSTGRES``)."""

    connection_string: str
    dialect: str = TSQL

    def __repr__(self) -> str:  # never show a password
        return f"Target({_redact(self.connection_string)!r}, {self.dialect!r})"

    @property
    def location(self) -> str:
        """``SERVER/DATABASE`` from the connection string, fit to print (no credentials)."""
        settings = connection_string_settings(self.connection_string)
        server = settings.get("server", "").removeprefix("tcp:")
        if settings.get("port"):
            server += f":{settings['port']}"
        return f"{server or '?'}/{settings.get('database', '?')}"


def is_odbc_target(url: str) -> bool:
    """Whether a warehouse URL is for this writer (SQL Server/Synapse URL or ODBC string)."""
    return url.startswith(("mssql+pyodbc://", "mssql://")) or bool(
        re.match(r"\s*driver\s*=", url, re.IGNORECASE)
    )


def _redact(connection_string: str) -> str:
    return re.sub(r"(?i)(pwd|password)\s*=\s*[^;]*", r"\1=***", connection_string)


def parse_target(url: str) -> Target:
    """A ``Target`` from ``mssql+pyodbc://SERVER/DATABASE[?driver=...]`` or an ODBC connection
    string (see the module docstring)."""
    if not is_odbc_target(url):
        raise UsageError(f"not a SQL Server/Synapse target: {url!r}")
    if not url.startswith("mssql"):
        settings = connection_string_settings(url)
        if "idempotent" in settings:
            raise UsageError(IDEMPOTENT_REMOVED)
        driver = settings.get("driver", "").strip("{}")
        dialect = POSTGRES if "postgres" in driver.lower() else TSQL
        return Target(url, dialect)
    parts = urlsplit(url)
    if parts.password:
        raise UsageError(
            f"put the password in {PASSWORD_ENV} (and the user in {USER_ENV}), not in the URL"
        )
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    if "idempotent" in query:
        raise UsageError(IDEMPOTENT_REMOVED)
    unknown = set(query) - {"driver"}
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
    return Target(connection_string, TSQL)


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
    """A pyodbc connection in autocommit mode, with SQL authentication or an access token."""
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
    # autocommit=True from the start: the driver never opens an implicit transaction.
    return pyodbc.connect(connection_string, attrs_before=attributes or None, autocommit=True)


# ---- telling errors apart ----

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
    111214,  # dedicated pool: "no corresponding transaction found" (its session was reset)
}
#: A duplicate key in a unique index (2627: constraint, 2601: index): a race with another
#: writer on Azure SQL Database or SQL Server, which the move answers by running again.
_DUPLICATE_KEY_ERRORS = {2601, 2627}
#: HTTP statuses of a storage service (the ``--staging`` container) worth waiting out.
_TRANSIENT_HTTP_STATUSES = {408, 429, 500, 502, 503, 504}
_NATIVE_ERROR = re.compile(r"\((\d+)\)\s*\(SQL\w+\)")


def _sqlstate(error: BaseException) -> str:
    # pyodbc errors carry the SQLSTATE first and the driver's message second.
    args = getattr(error, "args", ())
    return args[0] if len(args) > 1 and isinstance(args[0], str) else ""


def _native_errors(error: BaseException) -> set[int]:
    message = " ".join(str(arg) for arg in getattr(error, "args", ())[1:])
    return {int(code) for code in _NATIVE_ERROR.findall(message)}


def _azure_transient(error: BaseException) -> bool:
    """A storage service that could not be reached, or answered busy (azure-core's errors,
    told apart by name so that nothing here imports azure-core)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"ServiceRequestError", "ServiceResponseError"}:
        return True
    if "HttpResponseError" in names:
        return getattr(error, "status_code", None) in _TRANSIENT_HTTP_STATUSES
    return False


def is_transient(error: BaseException) -> bool:
    """Whether an error is worth retrying: a dropped connection, deadlock, throttling, a pool
    that lost its session's transaction, or a busy or unreachable storage service.

    pyodbc errors carry the SQLSTATE first and the driver's message (ending in the native error
    number, e.g. ``... (1205) (SQLExecDirectW)``) second."""
    if isinstance(error, WarehouseError | UsageError):
        return False  # ours: a missing table, driver or credential waits for nobody
    if _azure_transient(error):
        return True
    sqlstate = _sqlstate(error)
    if sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08"):
        return True
    return bool(_native_errors(error) & _TRANSIENT_ERRORS)


def is_duplicate_key(error: BaseException) -> bool:
    return bool(_native_errors(error) & _DUPLICATE_KEY_ERRORS)


def is_data_error(error: BaseException) -> bool:
    """Whether the server refused the rows' values (SQLSTATE class 22, data exception: too long,
    out of range...; class 23, integrity constraint violation), so other rows may well go in."""
    pyodbc = _loaded_pyodbc()
    if pyodbc is not None and isinstance(error, pyodbc.DataError | pyodbc.IntegrityError):
        return True
    return _sqlstate(error)[:2] in ("22", "23")


def _loaded_pyodbc() -> Any:
    with contextlib.suppress(ImportError):
        import pyodbc

        return pyodbc
    return None


# ---- the writer ----


class SynapseWriter:
    """A ``base.WarehouseWriter`` for one table of a dedicated pool, Azure SQL Database or SQL
    Server (see the module doc).

    The connection is opened at the first write, and the engine and the table's columns are
    checked then, so a server that is down when the job starts is waited out like any outage.

    Args:
      connect: opens a new DB-API connection (the writer turns autocommit on if it is off).
      table: the target table.
      dialect: ``tsql`` (ask the server), ``synapse``, ``mssql`` or ``postgres`` (the tests'
        real server).
      location: where the table is, for messages (``SERVER/DATABASE``; never credentials).
      staging: a ``staging.BlobStaging``: load each batch as a Parquet file with ``COPY INTO``
        (dedicated pools only) instead of INSERT statements.
    """

    #: NVARCHAR holds the NUL character (only the tests' PostgreSQL cannot, see __init__).
    nul_allowed = True

    def __init__(
        self,
        connect: Callable[[], Any],
        table: TableSpec = FACTS,
        *,
        dialect: str = TSQL,
        location: str = "",
        staging: Any = None,
    ):
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, got {dialect!r}")
        self._connect = connect
        self.table = table
        self.dialect = dialect
        self._staging = staging
        where = f"{location} " if location else ""
        self.description = f"{where}table {table.schema}.{table.name}"
        if dialect == POSTGRES:
            # PostgreSQL text cannot hold NUL, and psqlODBC silently cuts a value at one.
            self.nul_allowed = False
        self._connection = None
        self._staging_ready = False
        self._table_checked = False

    def _session(self) -> Any:
        if self._connection is None:
            connection = self._connect()
            if not connection.autocommit:
                connection.autocommit = True  # before any statement: see the module doc
            self._connection = connection
            self._staging_ready = False
        return self._connection

    def _run(self, work: Callable[[Any], Any]) -> Any:
        """Runs ``work(cursor)`` on the (possibly new) connection, in autocommit mode. On any
        error the connection is dropped, so the next call connects afresh, and the error is
        raised unchanged."""
        try:
            cursor = self._session().cursor()
            try:
                return work(cursor)
            finally:
                cursor.close()
        except BaseException:
            self._discard_connection()
            raise

    def prepare(self) -> None:
        """Learns the engine, and raises ``WarehouseWriteError`` (one line) if the table is
        missing, its columns differ from the ones written, or it cannot hold each row key once
        (see the module doc)."""
        self._run(self._check)
        self._table_checked = True

    def _check(self, cursor: Any) -> None:
        if self.dialect == TSQL:
            self.dialect = self._engine(cursor)
        if self._staging is not None and self.dialect != SYNAPSE:
            raise WarehouseWriteError(
                f"{self.description}: --staging loads with COPY INTO, which only a dedicated "
                "SQL pool has; leave --staging out for this server"
            )
        table = self.table
        rows = cursor.execute(columns_query(), [table.schema, table.name]).fetchall()
        problem = column_mismatch(table, [row[0] for row in rows])
        if problem:
            raise WarehouseWriteError(problem)
        if self.dialect == MSSQL:
            name = f"[{table.schema}].[{table.name}]"
            (count,) = cursor.execute(unique_key_query(), [name, ROW_KEY.name]).fetchone()
            if not count:
                raise WarehouseWriteError(
                    f"table {table.schema}.{table.name} has no unique index on {ROW_KEY.name}, "
                    "so rows could be written twice; create it as sql/mssql_create_table.sql "
                    "does"
                )

    def _engine(self, cursor: Any) -> str:
        (edition,) = cursor.execute(engine_query()).fetchone()
        if edition == SERVERLESS_POOL_EDITION:
            raise WarehouseWriteError(
                f"{self.description}: this is a serverless SQL pool, which holds no tables to "
                "write to; give a dedicated SQL pool (WORKSPACE.sql.azuresynapse.net/POOL)"
            )
        return SYNAPSE if edition == DEDICATED_POOL_EDITION else MSSQL

    def write_batch(self, rows: Sequence[tuple]) -> int:
        """Inserts the rows whose row key the table lacks (each key once); returns how many it
        inserted. One attempt: see the module doc."""
        if not self._table_checked:
            self.prepare()
        batch = first_of_each_key(rows)
        if not batch:
            return 0
        # The file goes up before the pool is asked anything: a storage failure costs no
        # connection. It stays after a failure, for the retry (which writes it again).
        staged = self._staging.upload(self.table, batch) if self._staging else None
        written = self._run(lambda cursor: self._load(cursor, batch, staged))
        if staged is not None:
            self._staging.discard(staged)
        return written

    def _load(self, cursor: Any, batch: list[tuple], staged: Any) -> int:
        if self._staging_ready:
            cursor.execute(clear_staging_statement(self.dialect))
        else:
            cursor.execute(create_staging_statement(self.table, self.dialect))
            self._staging_ready = True
        if staged is not None:
            cursor.execute(self._staging.copy_statement(self.table, staged))
        else:
            self._insert_staged(cursor, batch)
        return self._move(cursor, batch)

    def _insert_staged(self, cursor: Any, batch: list[tuple]) -> None:
        per = rows_per_statement(self.table)
        full = stage_statement(self.table, self.dialect, per)
        for start in range(0, len(batch), per):
            chunk = batch[start : start + per]
            statement = (
                full if len(chunk) == per else stage_statement(self.table, self.dialect, len(chunk))
            )
            cursor.execute(statement, [value for row in chunk for value in row])

    def _move(self, cursor: Any, batch: list[tuple]) -> int:
        bounds = time_range(self.table, batch)
        statement = move_statement(self.table, self.dialect, time_range=bounds is not None)
        parameters = list(bounds or ())
        try:
            cursor.execute(statement, parameters)
        except Exception as error:
            if not is_duplicate_key(error):
                raise
            # Another writer committed one of these keys between our check and our insert
            # (a unique index without IGNORE_DUP_KEY): now the check sees it.
            cursor.execute(statement, parameters)
        # The driver reports a DML statement's row count (the server's DONE token; dedicated
        # pools have no @@ROWCOUNT, but do send it). Were it ever unknown (-1), the batch is
        # counted as written: the count feeds metrics only, never what is written.
        return cursor.rowcount if cursor.rowcount >= 0 else len(batch)

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    def is_data_error(self, error: BaseException) -> bool:
        return is_data_error(error)

    def _discard_connection(self) -> None:
        # After a failure the connection may be broken: start afresh (a new staging table too).
        if self._connection is not None:
            with contextlib.suppress(Exception):  # it is already broken: only tidying up
                self._connection.close()
            self._connection = None
            self._staging_ready = False

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
            self._staging_ready = False
        if self._staging is not None:
            self._staging.close()


def writer_for(url: str, target: str = base.FACTS, staging: str | None = None) -> SynapseWriter:
    """The writer of ``target`` (``"facts"`` or ``"dead_letters"``) for a warehouse URL or ODBC
    connection string, loading through the ``staging`` container when given (see
    ``staging.open_staging``); it connects at its first write."""
    if target not in TARGETS:
        raise ValueError(f"target must be {base.FACTS!r} or {base.DEAD_LETTERS!r}, got {target!r}")
    parsed = parse_target(url)
    stager = None
    if staging is not None:
        from pipeline.io.warehouses.staging import open_staging

        stager = open_staging(staging)
    return SynapseWriter(
        lambda: connect(parsed),
        TARGETS[target],
        dialect=parsed.dialect,
        location=parsed.location,
        staging=stager,
    )
