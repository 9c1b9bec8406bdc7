-- Azure SQL Database or SQL Server (2016 and later): the same two tables as
-- sql/synapse_create_table.sql, for a server that is not a dedicated pool. Idempotent; GO ends
-- a batch. Run it connected to the database as an admin:
--   sqlcmd -S SERVER.database.windows.net -d DB --authentication-method ActiveDirectoryDefault \
--     -i sql/mssql_create_table.sql
-- The differences from a dedicated pool: no DISTRIBUTION or HEAP options (there are no
-- distributions), and a real unique index on row_key, which the writer checks for when it
-- starts. It is made with IGNORE_DUP_KEY = ON: a key that two writers insert at the same moment
-- is then skipped with a warning rather than failing the second writer's batch.

IF SCHEMA_ID(N'bookymyshow') IS NULL
    EXEC(N'CREATE SCHEMA bookymyshow');
GO

-- Clustered on the booking time: the writer's duplicate check is restricted to each batch's
-- booking time range, rows arrive mostly in time order, and the reports read time ranges.
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
    -- The row identity (see sql/synapse_create_table.sql), unique here.
    row_key NVARCHAR(100) NOT NULL,
    CONSTRAINT pk_bookings_fact PRIMARY KEY NONCLUSTERED (row_key) WITH (IGNORE_DUP_KEY = ON)
);
GO

IF NOT EXISTS (
    SELECT 1 FROM sys.indexes
    WHERE object_id = OBJECT_ID(N'bookymyshow.bookings_fact') AND type = 1
)
    CREATE CLUSTERED INDEX cx_bookings_fact_booking_event_time
        ON bookymyshow.bookings_fact (booking_event_time);
GO

IF OBJECT_ID(N'bookymyshow.dead_letters', N'U') IS NULL
CREATE TABLE bookymyshow.dead_letters (
    hub NVARCHAR(50) NOT NULL,
    partition NVARCHAR(10) NOT NULL,
    sequence_number BIGINT NOT NULL,
    enqueued_time DATETIME2 NOT NULL,
    body VARBINARY(MAX) NOT NULL,
    reason NVARCHAR(4000) NOT NULL,
    row_key NVARCHAR(100) NOT NULL,
    CONSTRAINT pk_dead_letters PRIMARY KEY CLUSTERED (row_key) WITH (IGNORE_DUP_KEY = ON)
);
GO

-- The identity the pipeline writes as (rename [bms-pipeline]): on Azure SQL Database a managed
-- identity or service principal of Microsoft Entra ID, as below; on SQL Server a login's user
-- (CREATE USER [bms-pipeline] FOR LOGIN [bms-pipeline]). SELECT and INSERT on this schema only.
IF DATABASE_PRINCIPAL_ID(N'bms-pipeline') IS NULL
    CREATE USER [bms-pipeline] FROM EXTERNAL PROVIDER;
GO
GRANT SELECT, INSERT ON SCHEMA::bookymyshow TO [bms-pipeline];
GO
