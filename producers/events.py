"""Mock booking and payment events in the seed's JSON shapes (pure: no clocks, no I/O).

Every payment refers to a booking. Most payments follow their booking within the 2-minute join
window; configurable shares arrive later than that, arrive before their booking, fail (and are
retried, so one order gets two payments), or are malformed (to exercise the dead-letter path).
Everything is drawn from one seeded ``random.Random`` and one seeded Faker, so a seed fixes the
whole stream.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import NamedTuple

import orjson
from faker import Faker

from pipeline.schema import BOOKING_HUB, PAYMENT_HUB

EVENT_NAMES = (
    "Rock Concert",
    "Jazz Night Concert",
    "Symphony Concert",
    "Broadway Play",
    "Shakespeare Play",
    "Children's Play",
    "Movie Premiere",
    "Midnight Movie Marathon",
    "Stand-up Comedy",
    "Football Match",
    "Art Exhibition",
)
PAYMENT_METHODS = ("Credit Card", "Debit Card", "PayPal")
SEAT_ROWS = "ABCDEFGHJK"
SEAT_PRICES = (50, 75, 100, 150, 250)
JOIN_WINDOW_SECONDS = 120


@dataclass(frozen=True)
class Shares:
    """Shares of orders (0..1) whose payments misbehave, and of events that are malformed."""

    late: float = 0.05  # paid more than 2 minutes after the booking
    early: float = 0.02  # payment published before its booking
    failed: float = 0.10  # a failed payment, then a successful retry
    malformed: float = 0.0  # bodies the pipeline must dead-letter

    def __post_init__(self):
        for name in ("late", "early", "failed", "malformed"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"the {name} share must be between 0 and 1, got {value}")
        if self.late + self.early > 1.0:
            raise ValueError("the late and early shares together cannot exceed 1")


class ScheduledEvent(NamedTuple):
    """An event body due on a hub ``due`` seconds (>= 0) after its order was placed."""

    due: float
    hub: str
    partition_key: str
    body: bytes


def isoformat_utc(moment: dt.datetime) -> str:
    """UTC ISO 8601 with milliseconds and a Z that is true (the seed's producers lied)."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class EventGenerator:
    """Generates orders: one booking and its payments, each with its due time.

    ``run_id`` goes into every order and payment id (``order_<run_id>_<n>``,
    ``payment_<run_id>_<n>``) so that runs publishing into the same hub never share an id;
    without it ids are ``order_<n>``. It draws nothing from the random streams: with the same
    seed, runs differ in their ids alone.
    """

    def __init__(
        self, seed: int | None = None, shares: Shares = Shares(), run_id: str | None = None
    ):
        self._prefix = "" if run_id is None else f"{run_id}_"
        self._random = random.Random(seed)
        self._faker = Faker()
        self._faker.seed_instance(seed)
        self._shares = shares
        self._orders = 0
        self._payments = 0

    def order(self, placed_at: dt.datetime) -> list[ScheduledEvent]:
        """One order placed at ``placed_at`` (aware, UTC): its booking and payments, each due
        some seconds after ``placed_at``. The first event is due at once; when the payment is
        early, that is the payment and the booking follows it."""
        self._orders += 1
        rand = self._random
        delay = self._payment_delay()
        booking_due = max(0.0, -delay)
        booked_at = placed_at + dt.timedelta(seconds=booking_due)
        order_id = f"order_{self._prefix}{self._orders}"
        seat_row = rand.choice(SEAT_ROWS)
        first_seat = rand.randint(1, 30)
        price = rand.choice(SEAT_PRICES)
        seats = [
            {"seat_number": f"{seat_row}{first_seat + n}", "price": price}
            for n in range(rand.choices((1, 2, 3, 4, 5, 6), weights=(3, 5, 3, 2, 1, 1))[0])
        ]
        customer_number = rand.randint(1000, 9999)
        booking = {
            "order_id": order_id,
            "booking_time": isoformat_utc(booked_at),
            "customer": {
                "customer_id": f"cust{customer_number}",
                "name": self._faker.name(),
                "email": self._faker.email(),
            },
            "event_details": {
                "event_id": f"event{rand.randint(1, 200)}",
                "event_name": rand.choice(EVENT_NAMES),
                "event_location": self._faker.address().replace("\n", ", "),
                "seats": seats,
            },
        }
        events = [
            ScheduledEvent(booking_due, BOOKING_HUB, order_id, self._body(booking, booking=True))
        ]
        amount = price * len(seats)
        paid_after = booking_due + delay
        if rand.random() < self._shares.failed:
            events.append(self._payment(order_id, placed_at, paid_after, amount, "Failed"))
            paid_after += rand.uniform(5, 40)
        events.append(self._payment(order_id, placed_at, paid_after, amount, "Success"))
        return events

    def _payment_delay(self) -> float:
        rand = self._random
        draw = rand.random()
        if draw < self._shares.late:
            return rand.uniform(JOIN_WINDOW_SECONDS + 1, 10 * 60)
        if draw < self._shares.late + self._shares.early:
            return -rand.uniform(0.5, 30)
        return rand.uniform(2, JOIN_WINDOW_SECONDS - 10)

    def _payment(
        self, order_id: str, placed_at: dt.datetime, due: float, amount: float, status: str
    ) -> ScheduledEvent:
        self._payments += 1
        payment = {
            "payment_id": f"payment_{self._prefix}{self._payments}",
            "order_id": order_id,
            "payment_time": isoformat_utc(placed_at + dt.timedelta(seconds=due)),
            "amount": amount,
            "payment_method": self._random.choice(PAYMENT_METHODS),
            "payment_status": status,
        }
        return ScheduledEvent(due, PAYMENT_HUB, order_id, self._body(payment, booking=False))

    def _body(self, document: dict, *, booking: bool) -> bytes:
        if self._random.random() >= self._shares.malformed:
            return orjson.dumps(document)
        kinds = ["truncated", "not_an_object"] + (["seats_not_an_array"] if booking else [])
        kind = self._random.choice(kinds)
        if kind == "truncated":
            return orjson.dumps(document)[: self._random.randint(1, 20)]
        if kind == "not_an_object":
            return orjson.dumps([document])
        broken = dict(document, event_details=dict(document["event_details"], seats="A1,A2"))
        return orjson.dumps(broken)
