-- Azure Synapse (dedicated SQL pool): the fact table the job writes, its dead letters, and the
-- writer's permissions. Run once, connected to the pool's database, as an Entra ID admin.

CREATE SCHEMA bookymyshow;

-- One row per (seat, payment) pair; the column types are the original project's.
-- DISTRIBUTION = HASH(order_id): order_id is the join and grouping key and has high cardinality,
-- so rows spread evenly over the pool's 60 distributions, all rows of one order sit on one
-- distribution (per-order queries and joins with other order-keyed tables move no data).
-- ROUND_ROBIN would shuffle on every such query; REPLICATE suits only small dimension tables.
-- CLUSTERED COLUMNSTORE INDEX: a large, append-only fact table scanned by a few columns at a
-- time (counts per category, revenue per hour) is what columnstore compresses and scans best.
-- Rows arrive in batches (ASA bulk-inserts up to 10,000 at a time; the pipeline batches too), so
-- rowgroups fill reasonably; a HEAP would only pay off for a staging table that is reloaded.
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
    -- partition:sequence:seat / payment partition:sequence (e.g. 0:1234:2/1:567). Synapse does
    -- not enforce uniqueness (no enforced UNIQUE or PRIMARY KEY), so the writer inserts a key
    -- only when the table does not hold it yet: a replay or retry never doubles a row.
    row_key NVARCHAR(100) NOT NULL
)
WITH (DISTRIBUTION = HASH(order_id), CLUSTERED COLUMNSTORE INDEX);

-- Events the pipeline could not read, kept with where they came from and why.
-- Small and rarely queried: round robin and a heap.
CREATE TABLE bookymyshow.dead_letters (
    hub NVARCHAR(50) NOT NULL,
    partition NVARCHAR(10) NOT NULL,
    sequence_number BIGINT NOT NULL,
    enqueued_time DATETIME2 NOT NULL,
    body VARBINARY(MAX) NOT NULL,
    reason NVARCHAR(4000) NOT NULL,
    -- The row identity: for an event's dead letter hub:partition:sequence (e.g.
    -- bookingtopic:3:42); for a fact row the warehouse could not store, that row's key. Not
    -- enforced unique by Synapse either: the writer inserts a key only when absent.
    row_key NVARCHAR(100) NOT NULL
)
WITH (DISTRIBUTION = ROUND_ROBIN, HEAP);

-- The identity the pipeline writes as: a managed identity or service principal of Microsoft Entra
-- ID (rename [bms-pipeline] to its name). Least privilege instead of the original project's
-- db_owner: INSERT to append rows, SELECT because the writer checks the table's columns and skips
-- rows the table already holds (its retry-safe insert); both limited to this schema. No DDL, no
-- DELETE, no UPDATE, nothing outside bookymyshow: a leaked token can add rows, not drop tables.
-- An ASA job writing the same table needs the same two permissions (Microsoft's guidance for
-- Stream Analytics SQL outputs: SELECT to test the connection, INSERT to write); grant them to
-- the job's managed identity the same way if ASA and the pipeline run side by side for parity.
CREATE USER [bms-pipeline] FROM EXTERNAL PROVIDER;
GRANT SELECT, INSERT ON SCHEMA::bookymyshow TO [bms-pipeline];
