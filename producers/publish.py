"""Publishing mock events to a hub, paced in real time or simulated as fast as possible."""

from __future__ import annotations

import datetime as dt
import heapq
import math
import random
import secrets
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol, TextIO

from pipeline.io.hubs import OutgoingEvent
from pipeline.io.hubs.local import LocalHub
from pipeline.schema import datetime_to_micros
from producers.events import EventGenerator, ScheduledEvent, Shares

DEFAULT_RATE = 0.4  # the seed: one booking and one payment every 5 seconds
_SEND_BATCH = 500
_RUN_ID_ALPHABET = string.ascii_lowercase + string.digits
_RUN_ID_LENGTH = 5  # 36**5: two runs out of thousands share one with a chance of about 1 in 10**4
_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


class Publisher(Protocol):
    """Where produced events go: the local hub, or Azure Event Hubs."""

    def send(self, hub: str, events: Sequence[OutgoingEvent]) -> None: ...

    def new_run_id(self) -> str:
        """A short id for one producer run, different from those of earlier runs."""
        ...

    def close(self) -> None: ...


def random_run_id() -> str:
    """A run id where no counter can be kept (Event Hubs): five random letters and digits."""
    return "".join(secrets.choice(_RUN_ID_ALPHABET) for _ in range(_RUN_ID_LENGTH))


class LocalHubPublisher:
    """Publishes to the local hub."""

    def __init__(self, hub: LocalHub):
        self._hub = hub

    def send(self, hub: str, events: Sequence[OutgoingEvent]) -> None:
        self._hub.append(hub, events)

    def new_run_id(self) -> str:
        """The hub file counts producer runs: 1 in a fresh hub, then 2, 3, ..."""
        return str(self._hub.next_run_number())

    def close(self) -> None:
        self._hub.close()


class _LatestTime:
    """A publisher that keeps only the latest enqueued time it was sent (a dry run)."""

    def __init__(self):
        self.latest: int | None = None

    def send(self, hub: str, events: Sequence[OutgoingEvent]) -> None:
        for event in events:
            if self.latest is None or event.enqueued_time > self.latest:
                self.latest = event.enqueued_time

    def new_run_id(self) -> str:
        return "dry"

    def close(self) -> None:
        pass


def simulated_span(
    count: int,
    rate: float,
    seed: int,
    shares: Shares = Shares(),  # noqa: B008 (frozen dataclass)
) -> dt.timedelta:
    """How long after its start a simulated history of ``count`` events ends (its last enqueued
    time), found by generating it once without publishing: the schedule depends on the seed,
    the rate and the shares, never on the start."""
    latest = _LatestTime()
    produce(
        latest,
        count=count,
        rate=rate,
        seed=seed,
        shares=shares,
        simulate_from=_EPOCH,
        run_id="dry",
        progress=None,
    )
    if latest.latest is None:
        return dt.timedelta(0)
    return dt.timedelta(microseconds=latest.latest - datetime_to_micros(_EPOCH))


def new_seed() -> int:
    """A seed for a run given none, drawn when two passes must generate the same events."""
    return random.SystemRandom().randrange(2**32)


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
    simulate_until: dt.datetime | None = None,
    run_id: str | None = None,
    progress: TextIO | None = sys.stderr,
    sleep: Callable[[float], None] = time.sleep,
) -> Counter:
    """Publishes ``count`` events (forever if None) at ``rate`` events/s; returns sent per hub.

    In real time the hub assigns enqueued times as events arrive. With ``simulate_from`` (an
    aware datetime) nothing sleeps: events carry enqueued times from a virtual clock starting
    there, as if published at ``rate``, so thousands of events take a moment. With
    ``simulate_until`` instead (``count`` required) the simulated history is back-dated to end
    exactly then: its last event is enqueued at ``simulate_until`` (typically now).

    Order and payment ids carry ``run_id`` (``order_<run_id>_<n>``); by default the publisher
    gives a new one (``Publisher.new_run_id``), so ids of two runs into one hub never collide.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if count is not None and count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    if simulate_until is not None:
        if simulate_from is not None:
            raise ValueError("give simulate_from or simulate_until, not both")
        if count is None:
            raise ValueError("simulate_until needs a count: the history must have an end")
        if seed is None:
            seed = new_seed()  # the dry run and the real one must generate the same events
        simulate_from = simulate_until - simulated_span(count, rate, seed, shares)
    if run_id is None:
        run_id = publisher.new_run_id()
    generator = EventGenerator(seed, shares, run_id)
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
