-- Azure Synapse dedicated SQL pool: the fact table bms writes, its dead letters, and the
-- writer's permissions. Idempotent: it creates what is missing and changes nothing that exists,
-- so it can be run again at any time. Run it connected to the pool's database as an Entra ID
-- admin; GO ends a batch (sqlcmd and SSMS split the file there; the server never sees it):
--   sqlcmd -S WORKSPACE.sql.azuresynapse.net -d POOL \
--     --authentication-method ActiveDirectoryDefault -i sql/synapse_create_table.sql
-- For Azure SQL Database or SQL Server use sql/mssql_create_table.sql instead: the options
-- below (DISTRIBUTION, HEAP) exist only in dedicated pools.

-- CREATE SCHEMA must be the only statement of its batch, hence EXEC.
IF SCHEMA_ID(N'bookymyshow') IS NULL
    EXEC(N'CREATE SCHEMA bookymyshow');
GO

-- One row per (seat, payment) pair; the column types are the original project's.
-- DISTRIBUTION = HASH(order_id): order_id is the join and grouping key and has high cardinality,
-- so rows spread evenly over the pool's 60 distributions, and all rows of one order sit on one
-- distribution (per-order queries and joins with other order-keyed tables move no data; the
-- writer matches staged rows on order_id too, so its duplicate check joins locally).
-- ROUND_ROBIN would shuffle on every such query; REPLICATE suits only small dimension tables.
-- CLUSTERED INDEX (booking_event_time), not a clustered columnstore, while the table is small.
-- A columnstore compresses a rowgroup once it holds about 1,048,576 rows *per distribution*,
-- i.e. ~60 million rows over 60 distributions; a load goes straight to compressed rowgroups only
-- from 102,400 rows per distribution (~6 million rows in one statement). The writer's batches,
-- 1,000 inserted rows or one 50,000-row COPY file, are far below both: with a columnstore every
-- row would wait in delta rowgroups (row-mode B-trees) for tens of millions of rows. Microsoft's
-- guidance is a heap or a clustered index below ~60 million rows. A clustered index on the
-- booking time makes the writer's duplicate check (restricted to each batch's booking time
-- range) a range seek, so a batch costs the same however large the table grows; rows arrive
-- mostly in time order, so they append; and the reports' queries are time ranges too. A heap
-- would load a little faster but make that check a scan of the whole table.
-- Past ~60 million rows, rebuild it as an ordered clustered columnstore (segments then hold
-- disjoint time ranges, which the same check eliminates): sql/synapse_dedupe.sql, step 2.
IF OBJECT_ID(N'bookymyshow.bookings_fact', N'U') IS NULL
CREATE TABLE bookymyshow.bookings_fact (
    order_id NVARCHAR(50) NOT NULL,
    booking_time DATETIME2,
    customer_id NVARCHAR(50),
    customer_name NVARCHAR(100),
    customer_email NVARCHAR(100),
    event_id NVARCHAR(50),
    event_name NVARCHAR(100),
    event_location NVARCHAR(200),
    seat_number NVARCHAR(10),
    seat_price FLOAT,
    event_category NVARCHAR(50),
    booking_day_of_week NVARCHAR(20),
    booking_hour INT,
    payment_id NVARCHAR(50),
    payment_time DATETIME2,
    amount FLOAT,
    payment_method NVARCHAR(50),
    payment_type NVARCHAR(50),
    booking_event_time DATETIME2,
    payment_event_time DATETIME2,
    -- The row identity: where the row's inputs came from in the hubs, booking
    -- partition:sequence:seat / payment partition:sequence (e.g. 0:1234:2/1:567). A dedicated
    -- pool enforces no UNIQUE or PRIMARY KEY, so the writer inserts a key only when the table
    -- does not hold it yet: a replay or retry never doubles a row (jobs sharing this table but
    -- not their checkpoints: sql/synapse_dedupe.sql).
    row_key NVARCHAR(100) NOT NULL
)
WITH (DISTRIBUTION = HASH(order_id), CLUSTERED INDEX (booking_event_time));
GO

-- Events the pipeline could not read, and fact rows no table could hold, kept with where they
-- came from and why. Few, and written like the facts: hashed and indexed on row_key, so the
-- writer's duplicate check is a local seek whatever their number.
IF OBJECT_ID(N'bookymyshow.dead_letters', N'U') IS NULL
CREATE TABLE bookymyshow.dead_letters (
    hub NVARCHAR(50) NOT NULL,
    partition NVARCHAR(10) NOT NULL,
    sequence_number BIGINT NOT NULL,
    enqueued_time DATETIME2 NOT NULL,
    body VARBINARY(MAX) NOT NULL,
    reason NVARCHAR(4000) NOT NULL,
    -- The row identity: for an event's dead letter hub:partition:sequence (e.g.
    -- bookingtopic:3:42); for a fact row the warehouse could not store, that row's key. Not
    -- enforced unique by the pool either: the writer inserts a key only when absent.
    row_key NVARCHAR(100) NOT NULL
)
WITH (DISTRIBUTION = HASH(row_key), CLUSTERED INDEX (row_key));
GO

-- The identity the pipeline writes as: a managed identity or service principal of Microsoft
-- Entra ID (rename [bms-pipeline] to its name). Least privilege instead of the original
-- project's db_owner: INSERT to append rows, SELECT because the writer checks the table's
-- columns and skips rows the table already holds (its retry-safe insert); both limited to this
-- schema. No DDL, no DELETE, no UPDATE, nothing outside bookymyshow: a leaked token can add rows,
-- not drop tables. (The writer's staging table is a #temp table of its own session, which needs
-- no permission.) An ASA job writing the same table needs the same two permissions (Microsoft's
-- guidance for Stream Analytics SQL outputs: SELECT to test the connection, INSERT to write);
-- grant them to the job's managed identity the same way if ASA and bms run side by side.
IF DATABASE_PRINCIPAL_ID(N'bms-pipeline') IS NULL
    CREATE USER [bms-pipeline] FROM EXTERNAL PROVIDER;
GO
GRANT SELECT, INSERT ON SCHEMA::bookymyshow TO [bms-pipeline];
GO

-- Only for --staging (the Parquet files loaded with COPY INTO): COPY needs INSERT on its target
-- and this database permission, which lets the user bulk load into tables it may already insert
-- into and reads no data by itself. Leave it out if bms inserts rows.
GRANT ADMINISTER DATABASE BULK OPERATIONS TO [bms-pipeline];
GO
