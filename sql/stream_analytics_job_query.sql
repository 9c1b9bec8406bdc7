-- The Azure Stream Analytics job query, as pasted into the job's query editor.
-- Inputs:  [bookings]  (Event Hub bookingtopic, JSON)
--          [payments]  (Event Hub paymentstopic, JSON)
-- Output:  [bookings-synapse]  (Azure Synapse table bookymyshow.bookings_fact)
-- No TIMESTAMP BY: System.Timestamp is each event's EventEnqueuedUtcTime.
-- pipeline/parity evaluates this very file offline; the Beam pipeline must produce the same rows.

WITH TransformedBookingStream AS (
    SELECT
        b.order_id,
        TRY_CAST(b.booking_time AS datetime) AS booking_time,
        b.customer.customer_id AS customer_id,
        b.customer.name AS customer_name,
        b.customer.email AS customer_email,
        b.event_details.event_id AS event_id,
        b.event_details.event_name AS event_name,
        b.event_details.event_location AS event_location,
        seat.ArrayValue.seat_number AS seat_number,
        seat.ArrayValue.price AS seat_price,
        CASE
            WHEN b.event_details.event_name LIKE '%Concert%' THEN 'Music'
            WHEN b.event_details.event_name LIKE '%Play%' THEN 'Theater'
            WHEN b.event_details.event_name LIKE '%Movie%' THEN 'Cinema'
            ELSE 'Other'
        END AS event_category,
        DATENAME(weekday, TRY_CAST(b.booking_time AS datetime)) AS booking_day_of_week,
        DATEPART(hour, TRY_CAST(b.booking_time AS datetime)) AS booking_hour,
        System.Timestamp AS event_time
    FROM [bookings] b
    CROSS APPLY GetArrayElements(b.event_details.seats) AS seat
),
TransformedPaymentStream AS (
    SELECT
        p.payment_id,
        p.order_id,
        TRY_CAST(p.payment_time AS datetime) AS payment_time,
        p.amount,
        p.payment_method,
        CASE
            WHEN p.payment_method IN ('Credit Card', 'Debit Card') THEN 'Card'
            WHEN p.payment_method = 'PayPal' THEN 'Online'
            ELSE 'Cash'
        END AS payment_type,
        System.Timestamp AS event_time
    FROM [payments] p
)
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
    b.event_time AS booking_event_time,
    p.event_time AS payment_event_time
INTO [bookings-synapse]
FROM TransformedBookingStream b
JOIN TransformedPaymentStream p
    ON b.order_id = p.order_id
    AND DATEDIFF(minute, b, p) BETWEEN 0 AND 2
