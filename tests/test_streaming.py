"""Streaming end to end on Prism: producers publish in real time while ``bms run`` runs unbounded.

Rows must reach the warehouse while the producer is still publishing. The job is then drained
(Ctrl-C) while the producer goes on, and a second job resumes from the committed checkpoints.
Once the producer has stopped and every join window has closed, the warehouse must equal the
ASA query evaluated over everything in the hub: no row missing, none twice. Both join modes
(``--join``) run it. Also prints event-to-row latency, and, finer (``bench/latency.py``, the
warehouse polled every 0.1 s), the interval join's.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from bench import latency
from pipeline import runners
from pipeline.io.hubs import checkpoint_scope, read_all
from pipeline.io.hubs.checkpoints import FileCheckpointStore
from pipeline.io.hubs.local import LocalHub
from pipeline.io.warehouses import read_facts
from pipeline.options import INTERVAL_JOIN, JOIN_MODES
from pipeline.parity.evaluator import evaluate
from pipeline.schema import FACT_COLUMN_NAMES, HUBS, datetime_to_micros
from tests.conftest import missing

pytestmark = pytest.mark.slow

RATE = 50  # events per second
SECONDS = 220  # rows appear at the earliest 120 s after a booking, when its window closes
DRAIN_AFTER_SECONDS = 190  # commits trail the watermark by a window (150 s): some are made
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


def stop(job, log_path, timeout=90) -> str:
    """Ctrl-C (a drain) and the job's output; fails if it does not end cleanly in time."""
    job.send_signal(signal.SIGINT)
    try:
        returncode = job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"the job did not drain within {timeout} s:\n{first_errors(log_path)}")
    assert returncode == 0, first_errors(log_path)
    return log_path.read_text()


def require_prism() -> None:
    try:
        runners.prism_binary()
    except runners.RunnerNotInstalled as error:
        missing(str(error))


@pytest.mark.parametrize("join", JOIN_MODES)
def test_rows_arrive_while_producing_survive_a_drain_and_equal_the_asa_query(
    tmp_path, report, join
):
    require_prism()
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'warehouse.db'}"
    checkpoints = tmp_path / "checkpoints"
    LocalHub(hub).close()
    run_args = [
        "run",
        "--hub",
        str(hub),
        "--warehouse",
        warehouse,
        "--checkpoints",
        str(checkpoints),
        "--join",
        join,
    ]

    def start(name):
        log_path = tmp_path / f"{name}.log"
        return bms(*run_args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT), log_path

    job, log_path = start("first")
    started = time.monotonic()
    producer = bms(
        "produce", "--hub", str(hub), "--count", str(RATE * SECONDS), "--rate", str(RATE),
        "--seed", "11", stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seen_at: dict[tuple, int] = {}  # row -> wall-clock micros when first seen

    def observe() -> Counter:
        assert job.poll() is None, first_errors(log_path)
        rows = Counter(read_facts(warehouse)) if row_count(warehouse) else Counter()
        now = time.time_ns() // 1000
        for row in rows:
            seen_at.setdefault(row, now)
        time.sleep(1)
        return rows

    store = FileCheckpointStore(checkpoints, checkpoint_scope(str(hub)))
    try:
        # The first job streams until shortly before the producer ends, then drains.
        while time.monotonic() - started < DRAIN_AFTER_SECONDS:
            rows_while_producing = sum(observe().values())
        assert producer.poll() is None, "the producer ended before the drain; raise SECONDS"
        output = stop(job, log_path)
        assert "draining" in output
        committed = {hub: store.last_processed(hub) for hub in HUBS}
        assert any(committed.values()), "the drain committed no position"

        # The second job resumes from the checkpoints while the producer is still running.
        job, log_path = start("second")
        producer.wait(timeout=SECONDS)
        assert producer.returncode == 0
        with LocalHub(hub) as client:
            expected = Counter(evaluate(read_all(client)).rows)
        deadline = time.monotonic() + SETTLE_SECONDS
        while (actual := observe()) != expected and time.monotonic() < deadline:
            pass
        stop(job, log_path)
    finally:
        for process in (job, producer):
            if process.poll() is None:
                process.kill()
    assert rows_while_producing > 0, "no row reached the warehouse while the producer ran"
    assert actual == expected, f"{sum((expected - actual).values())} missing, " + (
        f"{sum((actual - expected).values())} extra after the producer stopped"
    )
    second_log = (tmp_path / "second.log").read_text()
    read_again = {hub: int(n) for hub, n in re.findall(r"(\w+topic) (\d+)", second_log)}
    assert 0 < sum(read_again.values()) < RATE * SECONDS, "the second job did not resume"
    final = {hub: store.last_processed(hub) for hub in HUBS}
    assert all(final[h][p] >= n for h in HUBS for p, n in committed[h].items())
    latencies = sorted(
        (seen - datetime_to_micros(row[PAYMENT_EVENT_TIME])) / 1e6 for row, seen in seen_at.items()
    )
    if latencies:
        p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
        report(
            f"Prism, --join {join}: {sum(expected.values())} rows; "
            f"{rows_while_producing} while producing; "
            f"second job re-read {sum(read_again.values())} of {RATE * SECONDS} events; "
            f"latency from the later event to the row (p50, p99): {p50:.1f} s, {p99:.1f} s "
            "(the warehouse polled every second)"
        )


def test_the_interval_join_writes_rows_seconds_after_their_payment(tmp_path, report):
    require_prism()
    result = latency.measure(INTERVAL_JOIN, rate=200, seconds=30, seed=5, directory=tmp_path)
    assert result.rows > 0
    assert result.equals_asa_query, f"{result.rows} rows differ from the ASA query's"
    p50, p99 = result.latency_s["p50"], result.latency_s["p99"]
    report(
        f"Prism, --join interval at 200 events/s for 30 s: {result.rows} rows; latency from the "
        f"payment's enqueue to its row (p50, p99): {p50:.2f} s, {p99:.2f} s (the warehouse "
        f"polled every {latency.POLL_SECONDS:g} s); first row {result.first_row_after_s:.1f} s "
        f"after the producer started; {result.cpu_s_per_event * 1000:.2f} CPU-ms per event"
    )
