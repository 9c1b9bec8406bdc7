"""Shared test helpers: building events the way hubs hold them."""

from __future__ import annotations

import os

import apache_beam as beam
import orjson
import pytest
from hypothesis import settings

from pipeline.schema import HubEvent

settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

_MEASUREMENTS: list[str] = []


#: The shared PostgreSQL test database that scripts/setup-services starts.
POSTGRES_URL = os.environ.get(
    "BMS_TEST_POSTGRES_URL", "postgresql+psycopg://bms:bms@127.0.0.1:5432/bms_test"
)


def postgres_or_skip():
    """An engine on the shared PostgreSQL test database (see ``missing`` when it is down)."""
    import sqlalchemy as sa

    engine = sa.create_engine(POSTGRES_URL)
    try:
        engine.connect().close()
    except sa.exc.OperationalError as error:
        missing(f"no PostgreSQL at {POSTGRES_URL} ({error.orig}); run scripts/setup-services")
    return engine


def missing(reason: str):
    """A service or tool the test needs is missing: a skip locally, a failure under CI, where a
    broken install step must never hide behind a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (under CI every service must be there)")
    pytest.skip(reason)


@pytest.fixture
def report():
    """Adds a line to the end of the test run's summary: measurements stay visible in CI logs,
    where pytest captures what tests print."""
    return _MEASUREMENTS.append


def pytest_terminal_summary(terminalreporter):
    if _MEASUREMENTS:
        terminalreporter.section("measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)


def booking_document(order_id, seats=({"seat_number": "A1", "price": 75},), **fields) -> dict:
    """A booking in the seed's shape; fields of event_details may be overridden by name."""
    document = {
        "order_id": order_id,
        "booking_time": "2026-02-08T10:30:00Z",
        "customer": {"customer_id": "c1", "name": "Ana", "email": "ana@example.com"},
        "event_details": {
            "event_id": "e1",
            "event_name": "Rock Concert",
            "event_location": "1 Main St",
            "seats": list(seats) if isinstance(seats, list | tuple) else seats,
        },
    }
    for key, value in fields.items():
        if key in document["event_details"]:
            document["event_details"][key] = value
        else:
            document[key] = value
    return document


def payment_document(order_id, payment_id="p1", **fields) -> dict:
    return {
        "payment_id": payment_id,
        "order_id": order_id,
        "payment_time": "2026-02-08T10:31:00Z",
        "amount": 75,
        "payment_method": "Credit Card",
        "payment_status": "Success",
        **fields,
    }


def booking_body(order_id, **fields) -> bytes:
    return orjson.dumps(booking_document(order_id, **fields))


def payment_body(order_id, payment_id="p1", **fields) -> bytes:
    return orjson.dumps(payment_document(order_id, payment_id, **fields))


def produce_into(hub, *args: str) -> None:
    """``bms produce --simulate`` into a local hub file, failing the test if it fails."""
    from pipeline.cli import main

    assert main(["produce", "--hub", str(hub), *args]) == 0


def hub_event(hub: str, micros: int, body: bytes, partition: str = "0", sequence: int = 0):
    return HubEvent(hub, partition, sequence, micros, None, body)


def _in_a_list(element) -> list:
    return [element]


def one_row_batches(label: str = "OneRowBatches") -> beam.PTransform:
    """Rows as the warehouse sink takes them, in batches (lists): here one row each, so that
    each keeps its own timestamp and window."""
    return label >> beam.Map(_in_a_list)


def unbatched(label: str = "Unbatched") -> beam.PTransform:
    """The fact rows of the join's batches, one element each."""
    return label >> beam.FlatMap(lambda rows: rows)
