"""The load path for volume (``--staging``): Parquet files in a blob container (Azurite, with the
real azure-storage-blob client), ``COPY INTO`` parsed as T-SQL and checked against the options
Microsoft documents, and the whole path (upload, COPY, move, delete) against the dedicated-pool
fake of tests/test_synapse_contract.py, whose COPY reads the file back from Azurite through the
shared access signature the statement carries."""

from __future__ import annotations

import datetime as dt
import functools
import io
import time
import urllib.error
import urllib.request
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlglot
from apache_beam.options.pipeline_options import PipelineOptions
from sqlglot import exp

from pipeline.errors import UsageError
from pipeline.io.warehouses import WriteToWarehouse, staging
from pipeline.io.warehouses.sink import WriteRows
from pipeline.io.warehouses.staging import (
    StagingLocation,
    blob_name,
    copy_statement,
    open_staging,
    parquet_file,
    parquet_schema,
    parse_staging,
)
from pipeline.io.warehouses.synapse import DEAD_LETTERS, FACTS, SynapseWriter
from pipeline.schema import FACT_TABLE_COLUMNS, NULLABLE_FACT_COLUMNS, fact_row_key
from tests.conftest import one_row_batches
from tests.test_checkpoints import azurite  # noqa: F401  (a fixture: Azurite on a free port)
from tests.test_synapse_contract import (
    DedicatedPool,
    assert_the_pool_accepted_every_statement,
    fact,
    service_error,
)

pyodbc = pytest.importorskip("pyodbc")

#: COPY INTO's options as documented (COPY (Transact-SQL), Azure Synapse Analytics), and which of
#: them apply to Parquet files.
DOCUMENTED_OPTIONS = {
    "FILE_TYPE", "FILE_FORMAT", "CREDENTIAL", "ERRORFILE", "ERRORFILE_CREDENTIAL", "MAXERRORS",
    "COMPRESSION", "FIELDQUOTE", "FIELDTERMINATOR", "ROWTERMINATOR", "FIRSTROW", "DATEFORMAT",
    "ENCODING", "IDENTITY_INSERT", "AUTO_CREATE_TABLE",
}  # fmt: skip
CSV_ONLY = {"ERRORFILE", "ERRORFILE_CREDENTIAL", "FIELDQUOTE", "FIELDTERMINATOR", "ROWTERMINATOR"}
CSV_ONLY |= {"FIRSTROW", "DATEFORMAT", "ENCODING"}
PARQUET_COMPRESSION = {"SNAPPY", "GZIP"}
CREDENTIAL_IDENTITIES = {"MANAGED IDENTITY", "SHARED ACCESS SIGNATURE", "STORAGE ACCOUNT KEY"}


# ---- where files go ----


def test_staging_locations():
    assert parse_staging("https://acct.blob.core.windows.net/staging") == StagingLocation(
        "https://acct.blob.core.windows.net", "staging", ""
    )
    assert parse_staging("https://acct.dfs.core.windows.net/staging/bms/") == StagingLocation(
        "https://acct.blob.core.windows.net", "staging", "bms/"
    )
    assert parse_staging("blob:staging/a/b") == StagingLocation(None, "staging", "a/b/")
    for bad in ("s3://bucket", "https://example.com/x", "blob:", "https://acct.blob.core."
                "windows.net/c?sv=2020&sig=secret"):  # fmt: skip
        with pytest.raises(UsageError) as raised:
            parse_staging(bad)
        assert "\n" not in str(raised.value) and "secret" not in str(raised.value)


def test_blob_staging_needs_its_connection_string_when_the_job_is_built(monkeypatch):
    monkeypatch.delenv(staging.STORAGE_CONNECTION_STRING_ENV, raising=False)
    with pytest.raises(UsageError, match="AZURE_STORAGE_CONNECTION_STRING"):
        staging.check_staging("blob:staging")
    with pytest.raises(UsageError, match="--staging loads a Synapse dedicated SQL pool"):
        WriteToWarehouse("sqlite:///w.db", staging="blob:staging")
    staging.check_staging("https://acct.blob.core.windows.net/staging")  # signs in on a worker


def test_a_managed_identity_reads_parquet_through_the_dfs_endpoint(monkeypatch):
    # COPY INTO's credential matrix: Parquet with a managed identity needs an ADLS Gen2 account
    # addressed through .dfs; the pipeline itself uploads through .blob.
    class Credential:  # DefaultAzureCredential's interface; never asked: nothing is uploaded
        def get_token(self, *scopes, **kwargs):
            raise AssertionError("no token is needed to build a statement")

    monkeypatch.setattr(staging, "default_credential", Credential)
    stager = open_staging("https://acct.blob.core.windows.net/staging/bms")
    name = stager.prefix + "x.parquet"
    statement = stager.copy_statement(FACTS, name)
    assert "FROM 'https://acct.dfs.core.windows.net/staging/bms/x.parquet'" in statement
    assert statement.endswith("CREDENTIAL = (IDENTITY = 'Managed Identity'))")
    check_copy(statement)


# ---- the file ----


def test_the_parquet_schema_is_the_ddl():
    schema = parquet_schema(FACTS)
    assert schema.names == [column.name for column in FACT_TABLE_COLUMNS]
    expected = {
        "NVARCHAR": pa.string(),
        "DATETIME2": pa.timestamp("us"),
        "FLOAT": pa.float64(),
        "INT": pa.int32(),
    }
    for field, column in zip(schema, FACT_TABLE_COLUMNS, strict=True):
        assert field.type == expected[column.sql_type.split("(")[0]]
        assert field.metadata == {b"sql_type": column.sql_type.encode()}  # NVARCHAR lengths too
        assert field.nullable == (column.name in NULLABLE_FACT_COLUMNS)
    assert [field.metadata[b"sql_type"] for field in parquet_schema(DEAD_LETTERS)][:5] == [
        b"NVARCHAR(50)", b"NVARCHAR(10)", b"BIGINT", b"DATETIME2", b"VARBINARY(MAX)"
    ]  # fmt: skip
    assert parquet_schema(FACTS._replace(columns=(FACT_TABLE_COLUMNS[0]._replace(
        sql_type="DECIMAL(10,2)"),)))[0].type == pa.decimal128(10, 2)  # fmt: skip


def test_the_file_holds_the_rows_with_datetime2_precision_in_int96():
    rows = [fact(n) for n in range(3)] + [fact(9, seat=None)]
    data = parquet_file(FACTS, rows)
    parquet = pq.ParquetFile(io.BytesIO(data))
    physical = {
        column.name: column.physical_type
        for column in parquet.schema  # the file's own types
    }
    assert physical["booking_time"] == physical["booking_event_time"] == "INT96"  # nanoseconds
    assert physical["seat_price"] == "DOUBLE" and physical["booking_hour"] == "INT32"
    assert physical["customer_name"] == "BYTE_ARRAY"
    assert parquet.metadata.row_group(0).column(0).compression == "SNAPPY"
    back = parquet.read().to_pylist()
    assert [tuple(row.values()) for row in back] == [
        tuple(
            value.replace(tzinfo=None) if isinstance(value, dt.datetime) else value for value in row
        )
        for row in rows
    ]
    assert back[0]["booking_time"].microsecond == 123456  # no precision lost


def test_a_batch_always_gets_the_same_name():
    rows = [fact(n) for n in range(5)]
    name = blob_name(FACTS, rows, "bms/")
    assert name == blob_name(FACTS, list(reversed(rows)), "bms/")  # a retry: the same file
    assert name != blob_name(FACTS, rows[:4], "bms/")  # half a batch: another file
    assert name.startswith("bms/bookymyshow.bookings_fact/2026-02-08/")
    assert name.endswith(".parquet")
    assert not any(part.startswith(("_", ".")) for part in name.split("/"))  # COPY skips those


# ---- the statement ----


def credential_of(tree: exp.Copy) -> dict[str, str]:
    """The ``CREDENTIAL = (...)`` properties of a COPY INTO, by upper-case name."""
    (option,) = [p for p in tree.args["params"] if p.this.name.upper() == "CREDENTIAL"]
    return {
        prop.this.name.upper(): prop.args["value"].name
        for prop in option.expressions
        if isinstance(prop, exp.Property)
    }


def check_copy(statement: str) -> exp.Copy:
    """COPY INTO as Microsoft documents it, for this table's Parquet files."""
    tree = sqlglot.parse_one(statement, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
    assert isinstance(tree, exp.Copy) and tree.args["kind"]  # INTO
    target = tree.this
    assert target.this.name == "bms_staging" and target.this.this.args["temporary"]
    assert [column.name for column in target.expressions] == [c.name for c in FACTS.columns]
    (source,) = tree.args["files"]
    assert source.is_string and source.name.endswith(".parquet")
    options = {param.this.name.upper(): param for param in tree.args["params"]}
    assert set(options) <= DOCUMENTED_OPTIONS and not set(options) & CSV_ONLY
    assert "MAXERRORS" not in options  # the default, 0: a row the pool cannot load fails it
    assert "AUTO_CREATE_TABLE" not in options  # the staging table exists
    assert options["FILE_TYPE"].expression.name.upper() == "PARQUET"
    assert options["COMPRESSION"].expression.name.upper() in PARQUET_COMPRESSION
    credential = credential_of(tree)
    assert credential["IDENTITY"].upper() in CREDENTIAL_IDENTITIES
    if credential["IDENTITY"] == "Managed Identity":
        assert set(credential) == {"IDENTITY"}
        assert ".dfs.core.windows.net/" in source.name
    else:
        assert set(credential) == {"IDENTITY", "SECRET"} and not credential["SECRET"].startswith(
            "?"
        )
    return tree


def test_the_copy_statement_is_documented_t_sql():
    check_copy(
        copy_statement(
            FACTS,
            "https://acct.blob.core.windows.net/c/x.parquet",
            "IDENTITY = 'Shared Access Signature', SECRET = 'sv=2019-07-07&sig=a%2Bb'",
        )
    )
    quoted = copy_statement(
        FACTS, "https://a.blob.core.windows.net/c/it's.parquet", "IDENTITY = 'x'"
    )
    assert "FROM 'https://a.blob.core.windows.net/c/it''s.parquet'" in quoted


# ---- against Azurite ----


@pytest.fixture
def container(azurite, monkeypatch):  # noqa: F811
    """A fresh container in Azurite, reached through AZURE_STORAGE_CONNECTION_STRING."""
    monkeypatch.setenv(staging.STORAGE_CONNECTION_STRING_ENV, azurite)
    name = f"staging-{uuid.uuid4().hex[:8]}"
    blob = staging._blob_module()
    client = blob.ContainerClient.from_connection_string(azurite, name)
    client.create_container()
    yield client
    client.close()


def read_with_signature(url: str, credential: dict[str, str]) -> pa.Table:
    """What the pool does with a COPY INTO's source: read the file with the statement's SAS."""
    assert credential["IDENTITY"] == "Shared Access Signature"
    with urllib.request.urlopen(f"{url}?{credential['SECRET']}", timeout=10) as response:
        return pq.read_table(io.BytesIO(response.read()))


def files_in(container) -> list[str]:
    return sorted(blob.name for blob in container.list_blobs())


def test_the_signature_in_the_statement_reads_the_file_and_nothing_more(container):
    stager = open_staging(f"blob:{container.container_name}/bms")
    rows = [fact(n) for n in range(10)]
    name = stager.upload(FACTS, rows)
    assert files_in(container) == [name] and name.startswith("bms/bookymyshow.bookings_fact/")
    tree = check_copy(stager.copy_statement(FACTS, name))
    (source,) = tree.args["files"]
    assert source.name == f"{container.url}/{name}"
    credential = credential_of(tree)
    table = read_with_signature(source.name, credential)
    assert table.schema.names == [c.name for c in FACTS.columns] and table.num_rows == 10
    request = urllib.request.Request(  # read and list only: no writing with it
        f"{source.name}?{credential['SECRET']}", data=b"x", method="PUT",
        headers={"x-ms-blob-type": "BlockBlob"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    stager.discard(name)
    assert files_in(container) == []
    stager.discard(name)  # already gone: nothing to say
    stager.close()


def staged_writer(pool: DedicatedPool, location: str) -> SynapseWriter:
    return SynapseWriter(lambda: pool.connect(), FACTS, staging=open_staging(location))


def test_the_staged_path_loads_moves_and_deletes_and_keeps_files_for_a_retry(container):
    pool = DedicatedPool(read_file=read_with_signature)
    pool.create(FACTS)
    writer = staged_writer(pool, f"blob:{container.container_name}")
    rows = [fact(n) for n in range(300)]
    assert writer.write_batch([*rows, rows[0]]) == 300
    assert files_in(container) == []  # loaded, then deleted
    lost = service_error(pyodbc.Error, "42000", "No corresponding transaction found.", 111214)
    pool.fail(r'^INSERT INTO "bookymyshow"', lost)
    batch = [*rows[:20], fact(300), fact(301)]
    with pytest.raises(pyodbc.Error) as raised:
        writer.write_batch(batch)
    assert writer.is_transient(raised.value)
    assert files_in(container) == [blob_name(FACTS, batch)]  # kept for the retry
    assert writer.write_batch(batch) == 2  # the retry: the same file, loaded again
    assert files_in(container) == []
    writer.close()
    assert len(pool.rows(FACTS)) == 302
    assert_the_pool_accepted_every_statement(pool)
    copies = pool.statements("^COPY INTO")
    assert len(copies) == 3 and all(sent.parameters == () for sent in copies)
    for sent in copies:
        check_copy(sent.statement)
    assert not pool.statements(r"^INSERT INTO #bms_staging")  # no row went through INSERTs


def test_a_file_the_pool_cannot_read_fails_the_batch_and_stays(container):
    def unreadable(url, credential):
        raise service_error(
            pyodbc.ProgrammingError, "42000", "Cannot bulk load: access denied.", 4861
        )

    pool = DedicatedPool(read_file=unreadable)
    pool.create(FACTS)
    writer = staged_writer(pool, f"blob:{container.container_name}")
    with pytest.raises(pyodbc.ProgrammingError) as raised:
        writer.write_batch([fact(1)])
    assert not writer.is_transient(raised.value) and not writer.is_data_error(raised.value)
    assert files_in(container) == [blob_name(FACTS, [fact(1)])]
    assert pool.rows(FACTS) == []


def test_a_missing_container_is_one_line_and_not_waited_for(container, monkeypatch):
    pool = DedicatedPool(read_file=read_with_signature)
    pool.create(FACTS)
    writer = staged_writer(pool, "blob:no-such-container")
    with pytest.raises(Exception) as raised:
        writer.write_batch([fact(1)])
    assert type(raised.value).__name__ == "ResourceNotFoundError"
    assert not writer.is_transient(raised.value)


POOLS: dict[str, DedicatedPool] = {}


def open_staged_writer(pool: str, location: str) -> SynapseWriter:
    return staged_writer(POOLS[pool], location)


def test_the_sink_batches_across_bundles_into_few_files(container, report):
    """Rows from many bundles become a few 50,000-row-class files (here 2,000 rows a file), each
    loaded once; measured: rows per second through Parquet, Azurite and the pool fake."""
    pool = DedicatedPool(read_file=read_with_signature)
    pool.create(FACTS)
    POOLS["sink"] = pool
    rows = [
        fact(n, key=fact_row_key(f"{n % 4}:{n}:0", f"{n % 4}:{n}")) for n in range(5_000)
    ]  # fmt: skip
    pipeline = beam.Pipeline(runner="FnApiRunner", options=PipelineOptions())
    _ = (
        pipeline
        | beam.Create(rows, reshuffle=False)
        | one_row_batches()
        | WriteRows(
            functools.partial(open_staged_writer, "sink", f"blob:{container.container_name}"),
            "facts",
            batch_size=2_000,
            batch_seconds=30,
        )
    )
    started = time.perf_counter()
    pipeline.run().wait_until_finish()
    elapsed = time.perf_counter() - started
    POOLS.pop("sink")
    assert len(pool.rows(FACTS)) == 5_000
    assert len(pool.statements("^COPY INTO")) == 3  # 2,000 + 2,000 + 1,000 rows
    assert files_in(container) == []
    assert_the_pool_accepted_every_statement(pool)
    report(
        f"staged path (Parquet + Azurite + COPY into the DuckDB pool fake, FnApiRunner): "
        f"{5_000 / elapsed:,.0f} rows/s"
    )
