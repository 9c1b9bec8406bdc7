"""Streaming end to end on Prism: producers publish in real time while ``bms run`` runs unbounded.

Rows must reach the warehouse while the producer is still publishing. The job is then drained
(Ctrl-C) while the producer goes on, and a second job resumes from the committed checkpoints.
Once the producer has stopped and every join window has closed, the warehouse must equal the
ASA query evaluated over everything in the hub: no row missing, none twice. Both join modes
(``--join``) run it. Also prints event-to-row latency, and, finer (``bench/latency.py``, the
warehouse polled every 0.1 s), the interval join's.

And the source alone, streaming on Prism: a backlog read unevenly across partitions loses no
row, and a partition added to the local hub while it runs is read, and its events are not late.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import apache_beam as beam
import pytest
import sqlalchemy as sa
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import FixedWindows

from bench import latency
from pipeline import runners
from pipeline.io.hubs import OutgoingEvent, checkpoint_scope, progress, read_all
from pipeline.io.hubs.checkpoints import FileCheckpointStore
from pipeline.io.hubs.local import LocalHub, partition_for_key
from pipeline.io.hubs.source import ReadFromHub
from pipeline.io.warehouses import read_facts
from pipeline.options import INTERVAL_JOIN, JOIN_MODES
from pipeline.parity.evaluator import evaluate
from pipeline.schema import FACT_COLUMN_NAMES, HUBS, datetime_to_micros
from tests.conftest import missing, produce_into
from tests.test_source import key_in_partition

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


def test_a_backlog_read_unevenly_across_partitions_loses_no_row(tmp_path):
    """Catching up on a backlog, one partition of each hub is read (and idle) long before the
    other: Prism 2.77 takes a reading stage's latest bundle's watermark estimate as the stage's,
    so without the source holding every partition to the hub's slowest read front, the busy
    partition's later rows came too late for their windows and were dropped (12 % of 200,000
    events' rows on this machine)."""
    try:
        runners.prism_binary()
    except runners.RunnerNotInstalled as error:
        missing(str(error))
    produced = tmp_path / "produced.db"
    produce_into(produced, "--count", "12000", "--simulate", "2026-02-08T10:00:00Z", "--seed", "5")
    with LocalHub(produced) as source:
        events = read_all(source)
    keys = {partition_for_key(str(n), 2): str(n) for n in range(50)}  # a key for each partition
    hub = tmp_path / "hub.db"
    with LocalHub(hub, partitions=2) as uneven:
        for name in HUBS:
            mine = sorted((e for e in events if e.hub == name), key=lambda e: e.enqueued_time)
            # Partition 1 holds the first minute only; partition 0 everything after it.
            uneven.append(
                name,
                [
                    OutgoingEvent(
                        keys[int(e.enqueued_time - mine[0].enqueued_time < 60_000_000)],
                        e.body,
                        e.enqueued_time,
                    )
                    for e in mine
                ],
            )
    with LocalHub(hub) as uneven:
        expected = Counter(evaluate(read_all(uneven)).rows)
    warehouse = f"sqlite:///{tmp_path / 'warehouse.db'}"
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        job = bms("run", "--hub", str(hub), "--warehouse", warehouse, stdout=log,
                  stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 120
        while row_count(warehouse) < sum(expected.values()) and time.monotonic() < deadline:
            assert job.poll() is None, first_errors(log_path)
            time.sleep(1)
        stop(job, log_path)
    assert Counter(read_facts(warehouse)) == expected


_GROUPED: list[tuple[str, int]] = []  # (partition, sequence number) out of a GroupByKey


def _record_grouped(group: tuple[str, list[int]]) -> None:
    """Runs in this process (LOOPBACK workers), by reference: a pickled list would be a copy."""
    _GROUPED.extend((group[0], n) for n in group[1])


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_partition_added_to_the_local_hub_while_streaming_is_read_and_not_late(tmp_path):
    """On Prism, streaming: the hub gets a second partition while the source reads the first,
    and events in it at once. The source lists partitions every 3 s, so the new one is found up
    to 3 s after its events came, while the first partition's watermark trails wall-clock time
    by 0.2 s: without the watcher's hold on the watermark those events would be late, and the
    GroupByKey over 1 s windows would drop them. Drained once everything came through."""
    try:
        prism = runners.prism_binary()
    except runners.RunnerNotInstalled as error:
        missing(str(error))
    hub_name = HUBS[0]
    path = tmp_path / "hub.db"
    with LocalHub(path, partitions=1) as hub:
        hub.append(hub_name, [OutgoingEvent("a", b"first")])
    _GROUPED.clear()
    progress.reset_drain()
    found: dict[str, bool] = {}

    def add_a_partition():
        found["first"] = _wait_until(lambda: ("0", 0) in _GROUPED, 60)
        with LocalHub(path) as hub:
            hub.add_partitions(hub_name, 2)
            key = key_in_partition(1, 2)
            hub.append(hub_name, [OutgoingEvent(key, b"new %d" % n) for n in range(3)])
        found["new"] = _wait_until(lambda: {("1", n) for n in range(3)} <= set(_GROUPED), 30)
        progress.request_drain()

    admin = threading.Thread(target=add_a_partition, daemon=True)
    admin.start()
    options = PipelineOptions(
        streaming=True,
        runner="pipeline.prism.PrismRunner",
        prism_location=prism,
        environment_type="LOOPBACK",
    )
    try:
        with beam.Pipeline(options=options) as pipeline:
            _ = (
                pipeline
                | ReadFromHub(
                    str(path),
                    hub_name,
                    bounded=False,
                    poll_interval=0.1,
                    idle_allowance=0.2,
                    partition_listing_interval=3.0,
                )
                | beam.Map(lambda event: (event.partition, event.sequence_number))
                | beam.WindowInto(FixedWindows(1))
                | beam.GroupByKey()
                | beam.Map(_record_grouped)
            )
    finally:
        progress.request_drain()
        admin.join(timeout=100)
        progress.reset_drain()
    assert found == {"first": True, "new": True}, _GROUPED
    assert sorted(_GROUPED) == [("0", 0), ("1", 0), ("1", 1), ("1", 2)]


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
