"""Streaming end to end on Prism: producers publish in real time while ``bms run`` runs unbounded.

Rows must reach the warehouse while the producer is still publishing, and once the producer has
stopped and every join window has closed, the warehouse must equal the ASA query evaluated over
everything in the hub: no row missing, none twice. Also prints event-to-row latency.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from pipeline import runners
from pipeline.io.hub import read_all
from pipeline.io.localhub import LocalHub
from pipeline.io.warehouse import read_facts
from pipeline.parity.evaluator import evaluate
from pipeline.schema import FACT_COLUMN_NAMES, datetime_to_micros

pytestmark = pytest.mark.slow

RATE = 50  # events per second
SECONDS = 150  # rows appear at the earliest 120 s after a booking, when its window closes
SETTLE_SECONDS = 300
PAYMENT_EVENT_TIME = FACT_COLUMN_NAMES.index("payment_event_time")


def row_count(url):
    try:
        with sa.create_engine(url).connect() as connection:
            return connection.exec_driver_sql("SELECT COUNT(*) FROM bookings_fact").scalar()
    except sa.exc.OperationalError:  # the sink has not created the table yet
        return 0


def first_errors(log_path) -> str:
    """The job log's first error lines: what killed it, not the shutdown noise after."""
    lines = log_path.read_text().splitlines()
    errors = [n for n, line in enumerate(lines) if "ERROR" in line or "Error:" in line]
    start = errors[0] if errors else max(0, len(lines) - 40)
    return "\n".join(lines[start : start + 40])


def bms(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], **kwargs)


def test_rows_arrive_while_producing_and_equal_the_asa_query_after_the_stop(tmp_path):
    try:
        runners.prism_binary()
    except runners.RunnerNotInstalled as error:
        pytest.skip(str(error))
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'warehouse.db'}"
    LocalHub(hub).close()
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115 (closed below)
    job = bms("run", "--hub", str(hub), "--warehouse", warehouse, stdout=log, stderr=log)
    producer = bms(
        "produce", "--hub", str(hub), "--count", str(RATE * SECONDS), "--rate", str(RATE),
        "--seed", "11", stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seen_at: dict[tuple, int] = {}  # row -> wall-clock micros when first seen

    def observe() -> Counter:
        assert job.poll() is None, first_errors(tmp_path / "run.log")
        rows = Counter(read_facts(warehouse)) if row_count(warehouse) else Counter()
        now = time.time_ns() // 1000
        for row in rows:
            seen_at.setdefault(row, now)
        time.sleep(1)
        return rows

    try:
        while producer.poll() is None:
            rows_while_producing = sum(observe().values())
        assert producer.returncode == 0
        with LocalHub(hub) as client:
            expected = Counter(evaluate(read_all(client)).rows)
        deadline = time.monotonic() + SETTLE_SECONDS
        while (actual := observe()) != expected and time.monotonic() < deadline:
            pass
    finally:
        job.send_signal(signal.SIGINT)
        try:
            job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            job.kill()
        log.close()
    assert rows_while_producing > 0, "no row reached the warehouse while the producer ran"
    assert actual == expected, f"{sum((expected - actual).values())} missing, " + (
        f"{sum((actual - expected).values())} extra after the producer stopped"
    )
    latencies = sorted(
        (seen - datetime_to_micros(row[PAYMENT_EVENT_TIME])) / 1e6 for row, seen in seen_at.items()
    )
    if latencies:
        p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
        print(
            f"\nPrism: {sum(expected.values())} rows; {rows_while_producing} while producing; "
            f"latency from the later event to the row (p50, p99): {p50:.1f} s, {p99:.1f} s "
            "(the warehouse polled every second)",
            file=sys.__stdout__,
        )
