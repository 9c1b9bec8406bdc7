"""Publishing mock events to a hub, paced in real time or simulated as fast as possible."""

from __future__ import annotations

import datetime as dt
import heapq
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol, TextIO

from pipeline.io.hub import OutgoingEvent
from pipeline.io.localhub import LocalHub
from pipeline.schema import datetime_to_micros
from producers.events import EventGenerator, ScheduledEvent, Shares

DEFAULT_RATE = 0.4  # the seed: one booking and one payment every 5 seconds
_SEND_BATCH = 500


class Publisher(Protocol):
    """Where produced events go: the local hub, or Azure Event Hubs."""

    def send(self, hub: str, events: Sequence[OutgoingEvent]) -> None: ...

    def close(self) -> None: ...


class LocalHubPublisher:
    """Publishes to the local hub."""

    def __init__(self, hub: LocalHub):
        self._hub = hub

    def send(self, hub: str, events: Sequence[OutgoingEvent]) -> None:
        self._hub.append(hub, events)

    def close(self) -> None:
        self._hub.close()


class _Progress:
    """A status line on a stream, rewritten in place on a terminal, at most once a second."""

    def __init__(self, stream: TextIO | None):
        self._stream = stream
        self._last = 0.0

    def show(self, sent: Counter, final: bool = False) -> None:
        if self._stream is None:
            return
        now = time.monotonic()
        if not final and now - self._last < 1.0:
            return
        self._last = now
        parts = ", ".join(f"{hub} {count}" for hub, count in sorted(sent.items()))
        line = f"sent {sum(sent.values())} events ({parts or 'none yet'})"
        if self._stream.isatty():
            self._stream.write("\r" + line + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()


def produce(
    publisher: Publisher,
    *,
    count: int | None,
    rate: float = DEFAULT_RATE,
    seed: int | None = None,
    shares: Shares = Shares(),  # noqa: B008 (frozen dataclass)
    simulate_from: dt.datetime | None = None,
    progress: TextIO | None = sys.stderr,
    sleep: Callable[[float], None] = time.sleep,
) -> Counter:
    """Publishes ``count`` events (forever if None) at ``rate`` events/s; returns sent per hub.

    In real time the hub assigns enqueued times as events arrive. With ``simulate_from`` (an
    aware datetime) nothing sleeps: events carry enqueued times from a virtual clock starting
    there, as if published at ``rate``, so thousands of events take a moment.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if count is not None and count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    generator = EventGenerator(seed, shares)
    simulated = simulate_from is not None
    start = simulate_from if simulated else dt.datetime.now(dt.UTC)
    started = time.monotonic()
    booking_interval = 2.0 / rate  # a booking and (about) a payment per interval
    pending: list[tuple[float, int, ScheduledEvent]] = []  # (due, tie-break, event)
    tie_break = 0
    next_order_at = 0.0
    outbox: dict[str, list[OutgoingEvent]] = {}
    sent: Counter = Counter()
    bar = _Progress(progress)

    def remaining() -> float:
        return math.inf if count is None else count - sum(sent.values()) - _size(outbox)

    def flush() -> None:
        for hub, events in outbox.items():
            publisher.send(hub, events)
            sent[hub] += len(events)
        outbox.clear()
        bar.show(sent)

    try:
        while remaining() > 0:
            # Orders keep coming at the rate until count events are out: those are the first
            # count events to come due, and what is still pending then is never sent.
            if simulated:
                # Virtual time jumps to the next thing that happens. No order's events are due
                # before the order is placed, so everything due by then can be released.
                now = min(pending[0][0] if pending else math.inf, next_order_at)
            else:
                now = time.monotonic() - started
            while next_order_at <= now:
                for event in generator.order(start + dt.timedelta(seconds=next_order_at)):
                    heapq.heappush(pending, (next_order_at + event.due, tie_break, event))
                    tie_break += 1
                next_order_at += booking_interval
            while pending and pending[0][0] <= now and remaining() > 0:
                due_at, _, event = heapq.heappop(pending)
                enqueued = (
                    datetime_to_micros(start + dt.timedelta(seconds=due_at)) if simulated else None
                )
                outbox.setdefault(event.hub, []).append(
                    OutgoingEvent(event.partition_key, event.body, enqueued)
                )
            if not simulated or _size(outbox) >= _SEND_BATCH:
                flush()
            if not simulated:
                next_due = min(pending[0][0] if pending else math.inf, next_order_at)
                wait = next_due - (time.monotonic() - started)
                if wait > 0:
                    sleep(min(wait, 1.0))
        flush()
    finally:
        bar.show(sent, final=True)
    return sent


def _size(outbox: dict[str, list[OutgoingEvent]]) -> int:
    return sum(len(events) for events in outbox.values())
