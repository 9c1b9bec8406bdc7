-- Duplicates across jobs, in a dedicated SQL pool. One bms job never writes a row key twice (see
-- sql/synapse_create_table.sql). Jobs that share bookymyshow.bookings_fact but not their
-- checkpoints (two deployments, a backfill beside a stream) can: a dedicated pool enforces no
-- unique key and reads uncommitted data, so two writers checking the same new key at the same
-- moment may both insert it. Both copies are the same row. Run this file as an admin (GO ends a
-- batch); step 1 is idempotent, step 2 is for a maintenance window.

-- 1. A view with each row key once: point reports at it instead of the table.
-- (Drop and create: CREATE VIEW must begin a batch, and this keeps the file re-runnable.)
IF OBJECT_ID(N'bookymyshow.bookings_fact_unique', N'V') IS NOT NULL
    DROP VIEW bookymyshow.bookings_fact_unique;
GO
CREATE VIEW bookymyshow.bookings_fact_unique AS
SELECT
    order_id, booking_time, customer_id, customer_name, customer_email, event_id, event_name,
    event_location, seat_number, seat_price, event_category, booking_day_of_week, booking_hour,
    payment_id, payment_time, amount, payment_method, payment_type, booking_event_time,
    payment_event_time, row_key
FROM (
    SELECT
        *,
        -- order_id first: a row key determines its order, and partitioning by the distribution
        -- column keeps the numbering inside each distribution (no data movement).
        ROW_NUMBER() OVER (PARTITION BY order_id, row_key ORDER BY booking_event_time) AS copy_number
    FROM bookymyshow.bookings_fact
) AS numbered
WHERE copy_number = 1;
GO

-- 2. Compaction: rewrite the table with each row key once, and swap it in. Stop every writer
-- first (a drain: bms run stops with Ctrl-C, Dataflow's drain), run these batches, start the
-- writers again; nothing is lost, since writers resume from their checkpoints and skip the keys
-- the table holds. CTAS and RENAME OBJECT are a dedicated pool's way to rewrite a table (a DELETE
-- cannot tell two identical rows apart).
-- Past ~60 million rows, build the new table as an ordered clustered columnstore instead of the
-- clustered index (see sql/synapse_create_table.sql): replace the WITH clause below by
--   WITH (DISTRIBUTION = HASH(order_id), CLUSTERED COLUMNSTORE INDEX ORDER (booking_event_time))
IF OBJECT_ID(N'bookymyshow.bookings_fact_compacted', N'U') IS NOT NULL
    DROP TABLE bookymyshow.bookings_fact_compacted;
GO
CREATE TABLE bookymyshow.bookings_fact_compacted
WITH (DISTRIBUTION = HASH(order_id), CLUSTERED INDEX (booking_event_time))
AS SELECT * FROM bookymyshow.bookings_fact_unique;
GO
RENAME OBJECT bookymyshow.bookings_fact TO bookings_fact_before_compaction;
GO
RENAME OBJECT bookymyshow.bookings_fact_compacted TO bookings_fact;
GO
-- Check the new table (SELECT COUNT(*), COUNT(DISTINCT row_key) FROM bookymyshow.bookings_fact),
-- then drop the old one:
--   DROP TABLE bookymyshow.bookings_fact_before_compaction;
