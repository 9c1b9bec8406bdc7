"""Azure Synapse (dedicated SQL pool) or SQL Server through pyodbc: ``SynapseWriter``, a
``base.WarehouseWriter``.

Setup (see the README's Azure section): Microsoft ODBC Driver 18 for SQL Server and unixODBC on
the workers, the tables from ``sql/synapse_create_table.sql``, and an identity allowed to SELECT
and INSERT.

The target is either
  - ``mssql+pyodbc://SERVER/DATABASE`` (e.g. ``WORKSPACE.sql.azuresynapse.net/POOL``), optionally
    ``?driver=...``; or
  - an ODBC connection string, ``Driver={ODBC Driver 18 for SQL Server};Server=...;Database=...``.
Either one still carrying ``idempotent=...`` is refused: every write is idempotent now.

Authentication: SQL authentication when the connection string carries ``UID``/``PWD`` or the
environment variables ``SYNAPSE_USER``/``SYNAPSE_PASSWORD`` are set (never a flag or a URL
password); otherwise an Entra ID access token from azure-identity's ``DefaultAzureCredential``
(managed identity, service principal, ``az login``), handed to the driver before connecting as
the ``SQL_COPT_SS_ACCESS_TOKEN`` attribute in the layout the driver expects: a 4-byte
little-endian length followed by the token in UTF-16-LE.

Writes. Every row carries its row key (``pipeline.schema.ROW_KEY``, the last column), and the
table must hold each key at most once, however often a batch is replayed or retried. Synapse
enforces no unique index or constraint, and dedicated pools restrict MERGE (hash-distributed
targets only, no OUTPUT, a history of limitations), so each batch goes to a session temp table
and then one ``INSERT ... SELECT ... WHERE NOT EXISTS`` moves the staged rows whose row key the
table lacks (a key staged twice goes in once, by ``ROW_NUMBER``). Staging and moving are the
batch's one transaction; the temp table is created, or emptied, just before it, outside any
transaction, because dedicated pools refuse DDL inside one. Dedicated pools also reject
multi-row ``INSERT ... VALUES``, so rows are staged by one parameterised single-row INSERT run
by ``executemany`` (``fast_executemany`` with Microsoft's driver: one round trip per batch).
The same statements run on every dedicated pool, on SQL Server and, with a different temp-table
declaration only, on PostgreSQL, which is how the tests run this code for real through an ODBC
driver. The check and the insert are one statement, not a lock: two writers moving the same new
key at the very same moment could both insert it. Within a job a retry follows the attempt it
repeats, and the checkpoint lease (``pipeline.io.lease``) keeps two jobs off one set of
checkpoints, so only jobs sharing a table but not their checkpoints could race.

Failures. The writer makes one attempt per batch: on any error it drops its connection (the
next attempt connects afresh) and re-raises the driver's error unchanged. The sink
(``sink.py``) decides what happens next, as for every target: it retries what ``is_transient``
recognises (dropped connection, deadlock victim 1205, throttling 40501/40613/49918...) with
exponential backoff and jitter (tenacity) until its retry deadline, halves batches the server
refuses for their data (``is_data_error``: SQLSTATE classes 22 and 23) down to the refused rows,
and stops the job on anything else with the server's first line.
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
TSQL = "tsql"
POSTGRES = "postgres"

INSTALL_HINT = (
    "install unixODBC (apt-get install unixodbc) and Microsoft ODBC Driver 18 for SQL Server "
    "(msodbcsql18, see https://learn.microsoft.com/sql/connect/odbc/linux-mac/"
    "installing-the-microsoft-odbc-driver-for-sql-server), "
    "then pip install -e '.[synapse]' in the bms checkout"
)
IDEMPOTENT_REMOVED = (
    "every write is idempotent now (each row key is inserted at most once): remove "
    "idempotent=... from the warehouse URL or ODBC connection string"
)


class TableSpec(NamedTuple):
    """A target table: its columns in DDL order and the key that identifies a row."""

    schema: str
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def qualified_name(self) -> str:
        return f'"{self.schema}"."{self.name}"'


FACTS = TableSpec(FACT_SCHEMA, FACT_TABLE, FACT_TABLE_COLUMNS, (ROW_KEY.name,))
DEAD_LETTERS = TableSpec(FACT_SCHEMA, DEAD_LETTER_TABLE, DEAD_LETTER_COLUMNS, (ROW_KEY.name,))
TARGETS = {base.FACTS: FACTS, base.DEAD_LETTERS: DEAD_LETTERS}


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
    """The single-row parameterised INSERT into the temp table that executemany repeats."""
    return f"INSERT INTO {_STAGING[dialect]} ({_names(table)}) VALUES ({_placeholders(table)})"


def clear_staging_statement(dialect: str) -> str:
    return f"TRUNCATE TABLE {_STAGING[dialect]}"


def merge_staging_statement(table: TableSpec, dialect: str) -> str:
    """Moves the staged rows whose key (the row key) the target lacks into it, each key once."""
    same_key = " AND ".join(f't."{name}" = s."{name}"' for name in table.key)
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
    environment, which are added at connect time) and the dialect."""

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
}
_NATIVE_ERROR = re.compile(r"\((\d+)\)\s*\(SQL\w+\)")


def _sqlstate(error: BaseException) -> str:
    # pyodbc errors carry the SQLSTATE first and the driver's message second.
    args = getattr(error, "args", ())
    return args[0] if len(args) > 1 and isinstance(args[0], str) else ""


def is_transient(error: BaseException) -> bool:
    """Whether a database error is worth retrying: a dropped connection, deadlock or throttling.

    pyodbc errors carry the SQLSTATE first and the driver's message (ending in the native error
    number, e.g. ``... (1205) (SQLExecDirectW)``) second."""
    if isinstance(error, WarehouseError | UsageError):
        return False  # ours: a missing table, driver or credential waits for nobody
    sqlstate = _sqlstate(error)
    if sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08"):
        return True
    message = " ".join(str(arg) for arg in getattr(error, "args", ())[1:])
    return any(int(code) in _TRANSIENT_ERRORS for code in _NATIVE_ERROR.findall(message))


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
    """A ``base.WarehouseWriter`` for one table of Synapse or SQL Server (see the module doc).

    The connection is opened at the first write, and the table's columns are checked then, so a
    server that is down when the job starts is waited out like any outage.

    Args:
      connect: opens a new DB-API connection (autocommit off).
      table: the target table.
      dialect: ``tsql`` (Synapse, SQL Server) or ``postgres`` (the tests' real server).
      fast_executemany: pyodbc's array binding (Microsoft's driver).
      location: where the table is, for messages (``SERVER/DATABASE``; never credentials).
    """

    #: NVARCHAR holds the NUL character (only the tests' PostgreSQL cannot, see __init__).
    nul_allowed = True

    def __init__(
        self,
        connect: Callable[[], Any],
        table: TableSpec = FACTS,
        *,
        dialect: str = TSQL,
        fast_executemany: bool = True,
        location: str = "",
    ):
        if dialect not in _STAGING:
            raise ValueError(f"dialect must be {TSQL!r} or {POSTGRES!r}, got {dialect!r}")
        self._connect = connect
        self.table = table
        self._dialect = dialect
        self._fast_executemany = fast_executemany
        where = f"{location} " if location else ""
        self.description = f"{where}table {table.schema}.{table.name}"
        if dialect == POSTGRES:
            # PostgreSQL text cannot hold NUL, and psqlODBC silently cuts a value at one.
            self.nul_allowed = False
        self._connection = None
        self._staging_ready = False
        self._table_checked = False

    def _run(self, work: Callable[[Any], Any], *, in_transaction: bool = True) -> Any:
        """Runs ``work(cursor)`` on the (possibly new) connection, as one transaction or, for the
        temp table's DDL, in autocommit mode. On any error the connection is dropped, so the
        next call connects afresh, and the error is raised unchanged."""
        try:
            if self._connection is None:
                self._connection = self._connect()
                self._staging_ready = False
            connection = self._connection
            if not in_transaction:
                connection.autocommit = True
            cursor = connection.cursor()
            try:
                result = work(cursor)
            finally:
                cursor.close()
            if in_transaction:
                connection.commit()
            else:
                connection.autocommit = False
            return result
        except BaseException:
            self._discard_connection()
            raise

    def prepare(self) -> None:
        """Raises ``WarehouseWriteError`` (one line) if the table is missing or its columns
        differ from the ones written."""
        rows = self._run(
            lambda cursor: cursor.execute(
                columns_query(), self.table.schema, self.table.name
            ).fetchall()
        )
        problem = column_mismatch(self.table, [row[0] for row in rows])
        if problem:
            raise WarehouseWriteError(problem)
        self._table_checked = True

    def write_batch(self, rows: Sequence[tuple]) -> int:
        """Inserts the rows whose row key the table lacks (each key once), in one transaction;
        returns how many it inserted. One attempt: see the module doc."""
        if not self._table_checked:
            self.prepare()
        batch = [tuple(row) for row in rows]
        if not batch:
            return 0
        # Dedicated pools support no DDL such as CREATE TABLE inside a user transaction: the
        # temp table is made, or emptied, in autocommit mode before the batch's transaction.
        self._run(self._prepare_staging, in_transaction=False)
        self._staging_ready = True
        return self._run(lambda cursor: self._move(cursor, batch))

    def _prepare_staging(self, cursor: Any) -> None:
        if self._staging_ready:
            cursor.execute(clear_staging_statement(self._dialect))
        else:
            cursor.execute(create_staging_statement(self.table, self._dialect))

    def _move(self, cursor: Any, batch: list[tuple]) -> int:
        cursor.fast_executemany = self._fast_executemany
        cursor.executemany(stage_statement(self.table, self._dialect), batch)
        cursor.execute(merge_staging_statement(self.table, self._dialect))
        return cursor.rowcount

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

    def is_data_error(self, error: BaseException) -> bool:
        return is_data_error(error)

    def _discard_connection(self) -> None:
        # After a failure the transaction (and maybe the connection) is gone: start afresh.
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


def writer_for(url: str, target: str = base.FACTS) -> SynapseWriter:
    """The writer of ``target`` (``"facts"`` or ``"dead_letters"``) for a warehouse URL or ODBC
    connection string; it connects at its first write."""
    if target not in TARGETS:
        raise ValueError(f"target must be {base.FACTS!r} or {base.DEAD_LETTERS!r}, got {target!r}")
    parsed = parse_target(url)
    driver = connection_string_settings(parsed.connection_string).get("driver", "")
    return SynapseWriter(
        lambda: connect(parsed),
        TARGETS[target],
        dialect=parsed.dialect,
        fast_executemany="odbc driver" in driver.lower(),
        location=parsed.location,
    )
