"""Shared test helpers: building events the way hubs hold them."""

from __future__ import annotations

import os

import orjson
from hypothesis import settings

from pipeline.schema import HubEvent

settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def booking_body(order_id, seats=(("A1", 75),), event_name="Rock Concert", **fields) -> bytes:
    document = {
        "order_id": order_id,
        "booking_time": "2026-02-08T10:30:00Z",
        "customer": {"customer_id": "cust1", "name": "Ana", "email": "ana@example.com"},
        "event_details": {
            "event_id": "event1",
            "event_name": event_name,
            "event_location": "1 Main St",
            "seats": [{"seat_number": number, "price": price} for number, price in seats],
        },
    }
    document.update(fields)
    return orjson.dumps(document)


def payment_body(order_id, payment_id="payment_1", method="Credit Card", **fields) -> bytes:
    document = {
        "payment_id": payment_id,
        "order_id": order_id,
        "payment_time": "2026-02-08T10:31:00Z",
        "amount": 75,
        "payment_method": method,
        "payment_status": "Success",
    }
    document.update(fields)
    return orjson.dumps(document)


def hub_event(hub: str, micros: int, body: bytes, partition: str = "0", sequence: int = 0):
    return HubEvent(hub, partition, sequence, micros, None, body)
