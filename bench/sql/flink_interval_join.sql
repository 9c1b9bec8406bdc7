-- The ASA job (sql/stream_analytics_job_query.sql) in Flink SQL: the benchmark's peer.
-- bench/flink_job.py fills in {bookings}, {payments} and {output} and runs the statements in
-- order (they are separated by semicolons at the end of a line).
--
-- Inputs are bms hub export files with each body as a JSON object (what a Kafka or Event Hubs
-- JSON source hands Flink) and the enqueued time as integer microseconds (as the hub gives it);
-- bench/events.py writes them. A body the declared types cannot read (malformed JSON, not an
-- object, seats not an array) is skipped, as the pipeline dead-letters it.
-- Event time is the enqueued time (no TIMESTAMP BY). Flink's event time has millisecond
-- precision, so the interval join bounds the pairs to the millisecond (a superset: floors of
-- two times 0..120 s apart lie 0..120,000 ms apart) and a condition on the microseconds keeps
-- exactly the pairs ASA joins: 0 <= payment - booking <= 120 s, inclusive, to the microsecond.
-- TRY_CAST(... AS datetime) reads the producers' ISO 8601 form (2026-02-08T10:00:00.123Z); it
-- is the only form in the benchmark's events.

CREATE TABLE bookings (
    enqueued_micros BIGINT,
    body ROW<
        order_id STRING,
        booking_time STRING,
        customer ROW<customer_id STRING, name STRING, email STRING>,
        event_details ROW<
            event_id STRING,
            event_name STRING,
            event_location STRING,
            seats ARRAY<ROW<seat_number STRING, price DOUBLE>>
        >
    >,
    event_time AS TO_TIMESTAMP_LTZ(enqueued_micros / 1000, 3),
    WATERMARK FOR event_time AS event_time - INTERVAL '1' SECOND
) WITH (
    'connector' = 'filesystem',
    'path' = '{bookings}',
    'format' = 'json',
    'json.ignore-parse-errors' = 'true',
    'json.fail-on-missing-field' = 'false'
);

CREATE TABLE payments (
    enqueued_micros BIGINT,
    body ROW<
        payment_id STRING,
        order_id STRING,
        payment_time STRING,
        amount DOUBLE,
        payment_method STRING,
        payment_status STRING
    >,
    event_time AS TO_TIMESTAMP_LTZ(enqueued_micros / 1000, 3),
    WATERMARK FOR event_time AS event_time - INTERVAL '1' SECOND
) WITH (
    'connector' = 'filesystem',
    'path' = '{payments}',
    'format' = 'json',
    'json.ignore-parse-errors' = 'true',
    'json.fail-on-missing-field' = 'false'
);

CREATE TABLE bookings_fact (
    order_id STRING,
    booking_time TIMESTAMP(6),
    customer_id STRING,
    customer_name STRING,
    customer_email STRING,
    event_id STRING,
    event_name STRING,
    event_location STRING,
    seat_number STRING,
    seat_price DOUBLE,
    event_category STRING,
    booking_day_of_week STRING,
    booking_hour INT,
    payment_id STRING,
    payment_time TIMESTAMP(6),
    amount DOUBLE,
    payment_method STRING,
    payment_type STRING,
    booking_event_time TIMESTAMP_LTZ(6),
    payment_event_time TIMESTAMP_LTZ(6)
) WITH (
    'connector' = 'filesystem',
    'path' = '{output}',
    'format' = 'csv'
);

CREATE TEMPORARY VIEW TransformedBookingStream AS
SELECT
    b.order_id,
    b.booking_time,
    b.customer_id,
    b.customer_name,
    b.customer_email,
    b.event_id,
    b.event_name,
    b.event_location,
    seat.seat_number,
    seat.price AS seat_price,
    CASE
        WHEN b.event_name LIKE '%Concert%' THEN 'Music'
        WHEN b.event_name LIKE '%Play%' THEN 'Theater'
        WHEN b.event_name LIKE '%Movie%' THEN 'Cinema'
        ELSE 'Other'
    END AS event_category,
    DATE_FORMAT(b.booking_time, 'EEEE') AS booking_day_of_week,
    CAST(HOUR(b.booking_time) AS INT) AS booking_hour,
    b.enqueued_micros,
    b.event_time
FROM (
    SELECT
        body.order_id AS order_id,
        TRY_CAST(REPLACE(REPLACE(body.booking_time, 'T', ' '), 'Z', '') AS TIMESTAMP(6))
            AS booking_time,
        body.customer.customer_id AS customer_id,
        body.customer.name AS customer_name,
        body.customer.email AS customer_email,
        body.event_details.event_id AS event_id,
        body.event_details.event_name AS event_name,
        body.event_details.event_location AS event_location,
        body.event_details.seats AS seats,
        enqueued_micros,
        event_time
    FROM bookings
) AS b
CROSS JOIN UNNEST(b.seats) AS seat (seat_number, price);

CREATE TEMPORARY VIEW TransformedPaymentStream AS
SELECT
    body.payment_id AS payment_id,
    body.order_id AS order_id,
    TRY_CAST(REPLACE(REPLACE(body.payment_time, 'T', ' '), 'Z', '') AS TIMESTAMP(6))
        AS payment_time,
    body.amount AS amount,
    body.payment_method AS payment_method,
    CASE
        WHEN body.payment_method IN ('Credit Card', 'Debit Card') THEN 'Card'
        WHEN body.payment_method = 'PayPal' THEN 'Online'
        ELSE 'Cash'
    END AS payment_type,
    enqueued_micros,
    event_time
FROM payments;

INSERT INTO bookings_fact
SELECT
    b.order_id,
    b.booking_time,
    b.customer_id,
    b.customer_name,
    b.customer_email,
    b.event_id,
    b.event_name,
    b.event_location,
    b.seat_number,
    b.seat_price,
    b.event_category,
    b.booking_day_of_week,
    b.booking_hour,
    p.payment_id,
    p.payment_time,
    p.amount,
    p.payment_method,
    p.payment_type,
    TO_TIMESTAMP_LTZ(b.enqueued_micros, 6) AS booking_event_time,
    TO_TIMESTAMP_LTZ(p.enqueued_micros, 6) AS payment_event_time
FROM TransformedBookingStream AS b
JOIN TransformedPaymentStream AS p
    ON b.order_id = p.order_id
    AND p.event_time BETWEEN b.event_time AND b.event_time + INTERVAL '2' MINUTE
    AND p.enqueued_micros - b.enqueued_micros BETWEEN 0 AND 120000000;
