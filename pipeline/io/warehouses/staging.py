"""The load path for volume (``--staging``): each batch as one Parquet file in a blob container,
loaded into the writer's staging table with ``COPY INTO``, then moved like any batch.

This is how Microsoft says to load a dedicated SQL pool: write files, then load them with COPY
("the recommended loading utility"), never singleton INSERTs. ``SynapseWriter`` does, per batch
(the sink gathers rows across bundles, by default up to 50,000 rows or 30 s):

  1. ``upload``: the rows as a Parquet file (Snappy), named after the batch's day and row keys,
     so a retried batch overwrites its own file rather than leaving another;
  2. ``copy_statement``: ``COPY INTO #bms_staging (columns) FROM 'file' WITH (FILE_TYPE =
     'PARQUET', COMPRESSION = 'Snappy', CREDENTIAL = (...))``; then the move (``synapse.py``);
  3. ``discard``: the file is deleted once its rows are in the table. After a failure it stays
     for the retry; a job that dies leaves it behind, which a lifecycle rule on the container
     cleans up (docs/synapse.md).

The container, and how the pool reads it:

  - ``https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX]``: the pipeline uploads with
    ``DefaultAzureCredential`` (role Storage Blob Data Contributor); the pool reads with its
    workspace's managed identity, ``CREDENTIAL = (IDENTITY = 'Managed Identity')``, which for
    Parquet needs an ADLS Gen2 account (hierarchical namespace) addressed through its ``.dfs``
    endpoint (COPY INTO's documented credential matrix), so COPY is given the ``.dfs`` URL;
  - ``blob:CONTAINER[/PREFIX]``: the account of ``AZURE_STORAGE_CONNECTION_STRING``; the pool reads
    with a shared access signature (read and list on this container, valid for an hour) signed
    with the connection string's account key, or the connection string's own signature:
    ``CREDENTIAL = (IDENTITY = 'Shared Access Signature', SECRET = '...')``, which works with the
    ``.blob`` endpoint of any account.

The Parquet columns are the table's, in order and by name, typed as the DDL declares them:
NVARCHAR as UTF-8 strings (lengths are the sink's check; each field keeps its DDL type in its
metadata), FLOAT as DOUBLE, INT as INT32, BIGINT as INT64, DECIMAL(p,s) as DECIMAL(p,s), and
DATETIME2 as INT96 timestamps: nanoseconds, so DATETIME2's 100 ns are never cut, and the encoding
Synapse's loaders have always read (Spark and Data Factory write it for them; INT64 millisecond
timestamps before 1970 are reported out of range by COPY).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.io.azure import (
    STORAGE_CONNECTION_STRING_ENV,
    connection_string_settings,
    default_credential,
    import_extra,
)
from pipeline.io.warehouses.synapse import STAGING_TABLE, SYNAPSE, TableSpec, time_range
from pipeline.schema import FACT_TABLE_COLUMNS, NULLABLE_FACT_COLUMNS

__all__ = [
    "STORAGE_CONNECTION_STRING_ENV",
    "BlobStaging",
    "StagingLocation",
    "blob_name",
    "check_staging",
    "copy_statement",
    "open_staging",
    "parquet_file",
    "parquet_schema",
    "parse_staging",
]

_LOG = logging.getLogger(__name__)

MANAGED_IDENTITY = "IDENTITY = 'Managed Identity'"
#: How long the signature a COPY statement carries stays valid; each statement gets a new one.
SAS_LIFETIME = dt.timedelta(hours=1)
FILE_SUFFIX = ".parquet"
STAGING_HELP = (
    "--staging takes https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX] (signed in with "
    f"DefaultAzureCredential) or blob:CONTAINER[/PREFIX] (with {STORAGE_CONNECTION_STRING_ENV})"
)


class StagingLocation(NamedTuple):
    """Where staged files go: the account's endpoint (None: from the connection string), the
    container, and the path prefix inside it (empty or ending in ``/``)."""

    account_url: str | None
    container: str
    prefix: str


def parse_staging(location: str) -> StagingLocation:
    """A ``StagingLocation`` from ``--staging`` (see the module doc); one line if malformed."""
    if location.startswith("blob:"):
        container, _, prefix = location.removeprefix("blob:").strip("/").partition("/")
        account_url = None
    elif location.startswith("https://"):
        host, _, path = location.removeprefix("https://").partition("/")
        container, _, prefix = path.strip("/").partition("/")
        if ".blob." not in host and ".dfs." not in host:
            raise UsageError(f"--staging {location!r}: not a blob endpoint; {STAGING_HELP}")
        account_url = "https://" + host.replace(".dfs.", ".blob.", 1)
    else:
        raise UsageError(f"--staging {location!r}: {STAGING_HELP}")
    if not container or "?" in location:
        raise UsageError(
            f"--staging {location.split('?')[0]!r}: name a container, and no query string "
            f"(a signature goes in {STORAGE_CONNECTION_STRING_ENV}); {STAGING_HELP}"
        )
    return StagingLocation(account_url, container, prefix + "/" if prefix else "")


def check_staging(location: str) -> StagingLocation:
    """``parse_staging``, and the connection string it needs present: when the job is built,
    not on a worker."""
    parsed = parse_staging(location)
    _blob_module()  # the azure extra: missing, one line now rather than on a worker
    if parsed.account_url is None and not os.environ.get(STORAGE_CONNECTION_STRING_ENV):
        raise UsageError(
            f"--staging {location!r} needs {STORAGE_CONNECTION_STRING_ENV} set to the storage "
            "account's connection string, or give the container's https:// URL to sign in "
            "with DefaultAzureCredential"
        )
    return parsed


# ---- the file ----


def _arrow_type(sql_type: str) -> pa.DataType:
    name, _, size = sql_type.partition("(")
    if name == "NVARCHAR":
        return pa.string()
    if name == "DECIMAL":
        precision, _, scale = size.rstrip(")").partition(",")
        return pa.decimal128(int(precision), int(scale or 0))
    return {
        "FLOAT": pa.float64(),
        "INT": pa.int32(),
        "BIGINT": pa.int64(),
        "DATETIME2": pa.timestamp("us"),  # written as INT96, see the module doc
        "VARBINARY": pa.binary(),
    }[name]


def _nullable(table: TableSpec, name: str) -> bool:
    return table.columns == FACT_TABLE_COLUMNS and name in NULLABLE_FACT_COLUMNS


def parquet_schema(table: TableSpec) -> pa.Schema:
    """The table's columns as Parquet fields, in order, each with its DDL type as metadata."""
    return pa.schema(
        [
            pa.field(
                column.name,
                _arrow_type(column.sql_type),
                nullable=_nullable(table, column.name),
                metadata={"sql_type": column.sql_type},
            )
            for column in table.columns
        ]
    )


def parquet_file(table: TableSpec, rows: Sequence[tuple]) -> bytes:
    """The rows as one Parquet file (Snappy, INT96 timestamps)."""
    schema = parquet_schema(table)
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(schema)
    arrays = [
        pa.array(values, type=field.type) for values, field in zip(columns, schema, strict=True)
    ]
    buffer = io.BytesIO()
    pq.write_table(
        pa.Table.from_arrays(arrays, schema=schema),
        buffer,
        compression="snappy",
        use_deprecated_int96_timestamps=True,
    )
    return buffer.getvalue()


def blob_name(table: TableSpec, rows: Sequence[tuple], prefix: str = "") -> str:
    """``PREFIX/SCHEMA.TABLE/DAY/DIGEST.parquet``: the day of the batch's earliest time and a
    digest of its row keys, so the same batch always gets the same name (a retry overwrites it)
    and COPY never skips it (no leading ``_`` or ``.``)."""
    bounds = time_range(table, rows)
    day = bounds[0].strftime("%Y-%m-%d") if bounds else "undated"
    digest = hashlib.sha256("\n".join(sorted(row[-1] for row in rows)).encode()).hexdigest()
    return f"{prefix}{table.schema}.{table.name}/{day}/{digest[:32]}{FILE_SUFFIX}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def copy_statement(table: TableSpec, url: str, credential: str) -> str:
    """``COPY INTO`` the writer's staging table from one Parquet file, its columns mapped in
    order (the file has the table's columns, in order). MAXERRORS stays at its default, 0: a row
    the pool cannot load fails the statement, never goes missing."""
    columns = ", ".join(f'"{column.name}"' for column in table.columns)
    return (
        f"COPY INTO {STAGING_TABLE[SYNAPSE]} ({columns}) FROM {_literal(url)} "
        f"WITH (FILE_TYPE = 'PARQUET', COMPRESSION = 'Snappy', CREDENTIAL = ({credential}))"
    )


# ---- the container ----


def _blob_module() -> Any:
    """azure-storage-blob when installed, else the copy vendored inside
    azure-eventhub-checkpointstoreblob (the ``azure`` extra), which has the same API."""
    try:
        import azure.storage.blob as blob
    except ImportError:
        return import_extra(
            "azure.eventhub.extensions.checkpointstoreblob._vendor.storage.blob", "azure"
        )
    return blob


class BlobStaging:
    """Parquet files in a blob container, and the ``COPY INTO`` that loads one (module doc).

    Args:
      container: an azure-storage-blob ``ContainerClient``.
      copy_url: the container's URL as the pool reads it (``.dfs`` for a managed identity).
      credential: makes the ``CREDENTIAL = (...)`` contents for each COPY statement.
      prefix: the path inside the container, empty or ending in ``/``.
    """

    def __init__(self, container: Any, copy_url: str, credential: Any, prefix: str = ""):
        self._container = container
        self._copy_url = copy_url.rstrip("/")
        self._credential = credential
        self.prefix = prefix

    @property
    def description(self) -> str:
        return f"{self._container.url.split('?')[0]}/{self.prefix}"

    def upload(self, table: TableSpec, rows: Sequence[tuple]) -> str:
        """Writes the rows' file (replacing one of the same name) and returns its name."""
        name = blob_name(table, rows, self.prefix)
        self._container.upload_blob(
            name, parquet_file(table, rows), overwrite=True, metadata={"rows": str(len(rows))}
        )
        return name

    def copy_statement(self, table: TableSpec, name: str) -> str:
        return copy_statement(table, f"{self._copy_url}/{name}", self._credential())

    def discard(self, name: str) -> None:
        """Deletes a loaded file. Its rows are in the table by now, so a failure here fails
        nothing: it is logged, and the container's lifecycle rule removes the file later."""
        try:
            self._container.delete_blob(name)
        except Exception as error:
            if getattr(error, "status_code", None) != 404:
                _LOG.warning(
                    "could not delete the loaded file %s (%s: %s); a lifecycle rule on the "
                    "staging container should remove it",
                    name,
                    type(error).__name__,
                    str(error).splitlines()[0][:200] if str(error) else "",
                )

    def close(self) -> None:
        self._container.close()


def _sas_credential(blob: Any, container: str, settings: dict[str, str]) -> Any:
    """Makes a fresh read-and-list signature on the container for each COPY statement, from the
    connection string's account key (or its own signature, used as it is)."""
    if settings.get("sharedaccesssignature"):
        token = settings["sharedaccesssignature"].lstrip("?")
        return lambda: f"IDENTITY = 'Shared Access Signature', SECRET = {_literal(token)}"
    account, key = settings.get("accountname"), settings.get("accountkey")
    if not (account and key):
        raise UsageError(
            f"{STORAGE_CONNECTION_STRING_ENV} has neither AccountName/AccountKey nor "
            "SharedAccessSignature: COPY INTO needs one to read the staged files"
        )

    def credential() -> str:
        now = dt.datetime.now(dt.UTC)
        token = blob.generate_container_sas(
            account,
            container,
            account_key=key,
            permission=blob.ContainerSasPermissions(read=True, list=True),
            start=now - dt.timedelta(minutes=5),  # clocks differ a little
            expiry=now + SAS_LIFETIME,
        )
        return f"IDENTITY = 'Shared Access Signature', SECRET = {_literal(token)}"

    return credential


def open_staging(location: str) -> BlobStaging:
    """The ``BlobStaging`` of a ``--staging`` location (see the module doc)."""
    parsed = check_staging(location)
    blob = _blob_module()
    if parsed.account_url is not None:
        container = blob.ContainerClient(
            parsed.account_url, parsed.container, credential=default_credential()
        )
        copy_url = container.url.split("?")[0].replace(".blob.", ".dfs.", 1)
        return BlobStaging(container, copy_url, lambda: MANAGED_IDENTITY, parsed.prefix)
    connection_string = os.environ[STORAGE_CONNECTION_STRING_ENV]
    container = blob.ContainerClient.from_connection_string(connection_string, parsed.container)
    credential = _sas_credential(
        blob, parsed.container, connection_string_settings(connection_string)
    )
    return BlobStaging(container, container.url.split("?")[0], credential, parsed.prefix)
