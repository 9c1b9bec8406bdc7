-- Azure Synapse (dedicated SQL pool): the fact table the job writes, its dead letters, and the
-- writer's permissions. Run once, connected to the pool's database, as an Entra ID admin.

CREATE SCHEMA bookymyshow;

-- One row per (seat, payment) pair. Hash-distributed on order_id: the natural join and grouping
-- key, with high cardinality, so rows spread evenly over the 60 distributions and per-order
-- queries stay on one. The index is the pool's default, a clustered columnstore: right for a
-- large, append-mostly fact table.
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
    payment_event_time DATETIME2
)
WITH (DISTRIBUTION = HASH(order_id));

-- Events the pipeline could not read, kept with where they came from and why.
-- Small and rarely queried: round robin and a heap.
CREATE TABLE bookymyshow.dead_letters (
    hub NVARCHAR(50) NOT NULL,
    partition NVARCHAR(10) NOT NULL,
    sequence_number BIGINT NOT NULL,
    enqueued_time DATETIME2 NOT NULL,
    body VARBINARY(MAX) NOT NULL,
    reason NVARCHAR(4000) NOT NULL
)
WITH (DISTRIBUTION = ROUND_ROBIN, HEAP);

-- The identity the pipeline writes as (a managed identity or service principal). It needs to
-- read and insert, not db_owner as the original project granted.
CREATE USER [bms-pipeline] FROM EXTERNAL PROVIDER;
GRANT SELECT, INSERT ON SCHEMA::bookymyshow TO [bms-pipeline];
