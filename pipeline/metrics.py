"""Every metric of a job, declared once.

Each counter is a Beam counter (namespace ``bms``: in the job's result on every runner, and in
Dataflow's monitoring) and, for workers running in this process (the local runners with
``--environment_type=LOOPBACK``, and the in-process runner), a Prometheus metric in ``REGISTRY``:
``bms run --metrics-port`` serves them and the live status line reads them. Names follow
Prometheus' conventions: a ``bms_`` prefix, base units (seconds), ``_total`` for counters.

Example alerts (PromQL):

  - the job falls behind: ``bms_watermark_lag_seconds > 300`` for 5 minutes;
  - events it cannot use: ``increase(bms_dead_letters_total[10m]) > 0``;
  - the warehouse struggles: ``increase(bms_warehouse_write_retries_total[5m]) > 10``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import prometheus_client
from apache_beam.metrics import Metrics

__all__ = [
    "COMMIT_LAG",
    "DEAD_LETTERS",
    "EVENTS_EXPIRED",
    "EVENTS_READ",
    "JOIN_LATE_ROWS",
    "JOIN_STATE_ROWS",
    "PARSED_EVENTS",
    "POSITIONS_COMMITTED",
    "REGISTRY",
    "ROWS_ALREADY_PRESENT",
    "ROWS_RECEIVED",
    "ROWS_UNSTORABLE",
    "ROWS_WITHOUT_ORDER_ID",
    "ROWS_WRITTEN",
    "WATERMARK_LAG",
    "WRITE_RETRIES",
    "JobCounter",
    "record_commit",
    "record_watermark",
    "reset_times",
]

NAMESPACE = "bms"
REGISTRY = prometheus_client.CollectorRegistry()


class JobCounter:
    """A Beam counter and a Prometheus counter counting the same thing.

    ``beam_name`` may hold ``{label}`` placeholders filled from the labels (Beam counters have
    no labels, so each label value is a counter of its own there).
    """

    def __init__(
        self, beam_name: str, name: str, documentation: str, labelnames: Sequence[str] = ()
    ):
        self._beam_name = beam_name
        self._labelnames = tuple(labelnames)
        self._counters: dict[tuple[str, ...], tuple[Any, Any]] = {}  # label values -> both
        self.prometheus = prometheus_client.Counter(
            name, documentation, self._labelnames, registry=REGISTRY
        )

    def _pair(self, labels: dict[str, str]) -> tuple[Any, Any]:
        # Counted per event on the hot path: look both counters up once per label value.
        key = tuple(labels[name] for name in self._labelnames)
        pair = self._counters.get(key)
        if pair is None:
            beam = Metrics.counter(NAMESPACE, self._beam_name.format(**labels))
            pair = self._counters[key] = (
                beam,
                self.prometheus.labels(*key) if key else self.prometheus,
            )
        return pair

    def inc(self, n: int = 1, **labels: str) -> None:
        if n:
            beam, prometheus = self._pair(labels)
            beam.inc(n)
            prometheus.inc(n)

    def value(self, **labels: str) -> float:
        """The Prometheus counter's value in this process (0 when never counted)."""
        return self._pair(labels)[1]._value.get()


EVENTS_READ = JobCounter("events_read", "bms_events_read", "Events read from the hubs", ["hub"])
EVENTS_EXPIRED = JobCounter(
    "events_expired",
    "bms_events_expired",
    "Events that left the hub (retention) before they were read",
    ["hub"],
)
PARSED_EVENTS = JobCounter(
    "{kind}_events", "bms_events_parsed", "Events parsed, by kind (booking, payment)", ["kind"]
)
ROWS_WITHOUT_ORDER_ID = JobCounter(
    "{kind}_rows_without_order_id",
    "bms_rows_without_order_id",
    "Rows with a NULL order_id, which never join (as in ASA)",
    ["kind"],
)
DEAD_LETTERS = JobCounter(
    "dead_letters", "bms_dead_letters", "Events the pipeline could not read (dead letters)"
)
ROWS_RECEIVED = JobCounter(
    "{table}_received", "bms_rows_received", "Rows that reached a warehouse writer", ["table"]
)
ROWS_WRITTEN = JobCounter(
    "{table}_written", "bms_rows_written", "Rows inserted into the warehouse", ["table"]
)
ROWS_ALREADY_PRESENT = JobCounter(
    "{table}_already_present",
    "bms_rows_already_present",
    "Rows not inserted because the table already held their row key",
    ["table"],
)
ROWS_UNSTORABLE = JobCounter(
    "{table}_unstorable",
    "bms_rows_unstorable",
    "Rows the warehouse cannot store, sent to dead letters",
    ["table"],
)
WRITE_RETRIES = JobCounter(
    "warehouse_write_retries",
    "bms_warehouse_write_retries",
    "Warehouse writes retried after a transient failure",
)
POSITIONS_COMMITTED = JobCounter(
    "positions_committed",
    "bms_positions_committed",
    "Read positions committed to the checkpoint store",
)

JOIN_LATE_ROWS = JobCounter(
    "join_late_rows",
    "bms_join_late_rows",
    "Rows the interval join dropped because their window had closed, as the windowed join does",
)
JOIN_STATE_ROWS = prometheus_client.Gauge(
    "bms_join_state_rows",
    "Rows the interval join holds in this process's memory, waiting for a partner",
    registry=REGISTRY,
)  # its value comes from pipeline.interval_join

_watermarks: dict[tuple[str, str], float] = {}
_last_commit: list[float] = []


def record_watermark(hub: str, partition: str, micros: int) -> None:
    """A partition's event-time watermark moved (µs since the epoch)."""
    _watermarks[(hub, partition)] = micros / 1e6


def record_commit(event_time_micros: int) -> None:
    """Positions up to events at this time (µs since the epoch) were committed."""
    _last_commit[:] = [event_time_micros / 1e6]


def reset_times() -> None:
    """Forgets watermarks and commits, before the next job in the same process."""
    _watermarks.clear()
    _last_commit.clear()


def watermark() -> float | None:
    """The job's event-time watermark in seconds since the epoch: its slowest partition's."""
    return min(_watermarks.values()) if _watermarks else None


def last_commit() -> float | None:
    return _last_commit[0] if _last_commit else None


def _lag(moment: float | None) -> float:
    return float("nan") if moment is None else max(0.0, time.time() - moment)


WATERMARK_LAG = prometheus_client.Gauge(
    "bms_watermark_lag_seconds",
    "How far the event-time watermark (the slowest partition's) is behind the wall clock",
    registry=REGISTRY,
)
WATERMARK_LAG.set_function(lambda: _lag(watermark()))
COMMIT_LAG = prometheus_client.Gauge(
    "bms_commit_lag_seconds",
    "How far the last committed position's event time is behind the wall clock",
    registry=REGISTRY,
)
COMMIT_LAG.set_function(lambda: _lag(last_commit()))
