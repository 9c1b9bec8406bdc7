"""Fault injection: after anything an operator or the infrastructure can do, the warehouse holds
exactly the rows the ASA query gives over the hub (``bms parity --events``): none lost, none
twice. Every test runs the real ``bms`` commands, on Prism where it streams.

  - rows ASA repeats (the same seat number twice, seats without numbers, a message sent twice,
    a payment sent twice) and poison values, through every target and write mode, rerun;
  - ``kill -9`` of the whole streaming job (bms and Prism) at seeded random moments, restarted
    each time, with a second job refused while one runs;
  - PostgreSQL stopped for 30 s under a streaming job, which waits it out;
  - a bounded run with checkpoints over 60,000 events.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid

import orjson
import pytest
import sqlalchemy as sa

from pipeline import runners
from pipeline.io.hubs import OutgoingEvent, checkpoint_scope
from pipeline.io.hubs.checkpoints import FileCheckpointStore
from pipeline.io.hubs.local import LocalHub
from pipeline.io.warehouses import create_engine, read_dead_letters
from pipeline.io.warehouses.sqldb import create_tables
from pipeline.schema import (
    BOOKING_HUB,
    FACT_SCHEMA,
    FACT_TABLE,
    HUBS,
    PAYMENT_HUB,
    datetime_to_micros,
)
from tests.conftest import booking_body, missing, payment_body, produce_into
from tests.pgcluster import throwaway_postgres_fixture

pytestmark = pytest.mark.slow

SECOND = 1_000_000
postgres = throwaway_postgres_fixture(scope="module")


def bms(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_parity(hub, warehouse) -> str:
    """``bms parity --events``: the warehouse equals the ASA query over the hub."""
    result = bms("parity", "--events", "--hub", str(hub), "--warehouse", warehouse)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def fresh_database(postgres) -> str:
    """A new, empty database in the throwaway cluster (the dead-letter table is per database)."""
    name = f"bms_{uuid.uuid4().hex[:10]}"
    postgres.psql(f"CREATE DATABASE {name} OWNER {postgres.user}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def append_tricky_events(hub_path, start_micros: int) -> dict[str, int]:
    """Rows ASA repeats and values no warehouse column can hold, at explicit enqueued times.
    Returns how many events went to each hub."""
    twins = ({"seat_number": "A1", "price": 75}, {"seat_number": "A1", "price": 50})
    no_numbers = ({"price": 10}, {"price": 10})
    bookings = [
        booking_body("o-twin", seats=twins),
        booking_body("o-nonum", seats=no_numbers),
        booking_body("o-sent-twice"),
        booking_body("o-sent-twice"),
        booking_body("o-paid-twice"),
        booking_body("o-nul", customer={"customer_id": "c", "name": "Ana\x00Bel", "email": "a"}),
        booking_body("o-long", customer={"customer_id": "c", "name": "x" * 1_000_000}),
        booking_body("o-tiny", seats=({"seat_number": "B2", "price": 1e-320},)),
    ]
    payments = [
        payment_body("o-twin"),
        payment_body("o-nonum"),
        payment_body("o-sent-twice"),
        payment_body("o-paid-twice"),
        payment_body("o-paid-twice"),
        payment_body("o-nul"),
        payment_body("o-long", payment_method="M" * 60),
        payment_body("o-tiny"),
    ]
    with LocalHub(hub_path) as hub:
        # One partition key per order: a message sent twice lands at the same enqueued time.
        hub.append(
            BOOKING_HUB,
            [OutgoingEvent(orjson.loads(b)["order_id"], b, start_micros) for b in bookings],
        )
        hub.append(
            PAYMENT_HUB,
            [
                OutgoingEvent(orjson.loads(b)["order_id"], b, start_micros + 60 * SECOND)
                for b in payments
            ],
        )
    return {BOOKING_HUB: len(bookings), PAYMENT_HUB: len(payments)}


def summary_count(output: str, what: str) -> int:
    return int(re.search(rf"(\d+) {what}", output).group(1))


@pytest.fixture(params=["sqlite", "postgresql", "odbc"])
def warehouse(request, tmp_path, postgres):
    """(where bms run writes, where bms parity reads): a fresh, empty warehouse of each kind:
    SQLite, PostgreSQL through SQLAlchemy, and PostgreSQL through the Synapse writer's ODBC
    path (tables made beforehand, as on Synapse)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'warehouse.db'}"
        return url, url
    url = fresh_database(postgres)
    if request.param == "postgresql":
        return url, url
    engine = create_engine(url)
    create_tables(engine)
    engine.dispose()
    database = url.rsplit("/", 1)[-1]
    return postgres.odbc.replace(f"Database={postgres.database}", f"Database={database}"), url


@pytest.mark.parametrize("checkpoints", [False, True], ids=["plain", "checkpoints"])
def test_repeated_rows_and_poison_values_through_every_target_and_mode(
    tmp_path, warehouse, checkpoints
):
    warehouse, readable = warehouse
    hub = tmp_path / "hub.db"
    start = datetime_to_micros(dt.datetime(2026, 2, 8, 10, 0))
    append_tricky_events(hub, start)
    produce_into(hub, "--count", "400", "--seed", "5", "--simulate", "2026-02-08T10:05:00Z")
    run = ["run", "--bounded", "--hub", str(hub), "--warehouse", warehouse]
    if checkpoints:
        run += ["--checkpoints", str(tmp_path / "checkpoints")]
    first = bms(*run)
    assert first.returncode == 0, first.stderr
    report = assert_parity(hub, readable)
    # o-long (a 1 MB name) and o-tiny (a price below FLOAT's range) fit no target; o-nul's NUL
    # fits SQLite's text, not PostgreSQL's.
    unstorable = 2 if warehouse.startswith("sqlite") else 3
    assert f"unstorable fact rows: {unstorable}" in report
    reasons = sorted(letter.reason for letter in read_dead_letters(readable))
    assert any("customer_name" in r for r in reasons) and any("seat_price" in r for r in reasons)
    computed = summary_count(first.stdout, "computed")
    assert summary_count(first.stdout, "already present") == 0 and computed > 400
    # A rerun (a restart over the same events) adds nothing and fails on nothing.
    again = bms(*run)
    assert again.returncode == 0, again.stderr
    assert summary_count(again.stdout, "newly written") == 0
    assert_parity(hub, readable)


def test_an_unreachable_warehouse_is_one_line_at_launch(tmp_path):
    hub = tmp_path / "hub.db"
    produce_into(hub, "--count", "10", "--seed", "1", "--simulate", "2026-02-08T10:00:00Z")
    nowhere = "postgresql+psycopg://bms:s3cret@127.0.0.1:9/nowhere"
    result = bms("run", "--bounded", "--hub", str(hub), "--warehouse", nowhere)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1 and "s3cret" not in result.stderr
    assert "cannot reach the warehouse postgresql+psycopg://bms:***@127.0.0.1:9/nowhere" in (
        result.stderr
    )


# ---- streaming jobs on Prism, killed, restarted, starved of their database ----


def prism_or_skip() -> None:
    try:
        runners.prism_binary()
    except runners.RunnerNotInstalled as error:
        missing(str(error))


class StreamingJob:
    """``bms run`` (unbounded, on Prism) in a session of its own, so that ``kill()`` takes the
    whole job down at once, as a crash of its machine would: SIGKILL to the session, and Prism
    (in a session of its own) dies with bms through its parent-death signal."""

    def __init__(self, log_path, *args: str):
        self.log_path = log_path
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "run", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def drain(self, timeout: float = 120) -> str:
        """Ctrl-C to bms: reading stops, open windows are written, positions committed."""
        self.process.send_signal(signal.SIGINT)
        try:
            assert self.process.wait(timeout=timeout) == 0, self.log()
        finally:
            if self.alive():
                self.kill()
        return self.log()

    def log(self) -> str:
        return self.log_path.read_text()


def rows_in(url: str) -> int:
    engine = create_engine(url)
    table = FACT_TABLE if url.startswith("sqlite") else f"{FACT_SCHEMA}.{FACT_TABLE}"
    try:
        with engine.connect() as connection:
            return connection.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").scalar()
    except sa.exc.DBAPIError:  # not created yet, or the database is down
        return 0
    finally:
        engine.dispose()


def producer(hub, rate: int, seconds: int, seed: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "produce", "--hub", str(hub),
         "--count", str(rate * seconds), "--rate", str(rate), "--seed", str(seed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def backlog(hub, minutes: int, count: int, seed: int) -> None:
    """Events over the last ``minutes``, so a starting job has old windows to close and write."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes)
    rate = count / (minutes * 60 - 30)  # ends half a minute ago
    produce_into(
        hub, "--count", str(count), "--seed", str(seed), "--rate", f"{rate:.3f}",
        "--simulate", start.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )  # fmt: skip


def test_kill_9_at_random_moments_then_restart_loses_and_doubles_nothing(tmp_path, report):
    prism_or_skip()
    rng = random.Random(20261125)
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'warehouse.db'}"
    checkpoints = tmp_path / "checkpoints"
    # Rows ASA repeats and poison values first, so every partition's times go forward.
    append_tricky_events(hub, datetime_to_micros(dt.datetime.now(dt.UTC)) - 420 * SECOND)
    backlog(hub, minutes=6, count=3000, seed=21)
    args = ["--hub", str(hub), "--warehouse", warehouse, "--checkpoints", str(checkpoints)]
    live = producer(hub, rate=20, seconds=150, seed=22)
    store = FileCheckpointStore(checkpoints, checkpoint_scope(str(hub)))
    kills = []
    try:
        for cycle in range(5):
            job = StreamingJob(tmp_path / f"job{cycle}.log", *args)
            if cycle == 1:  # a second job on the same checkpoints is refused, naming the first
                time.sleep(3)
                second = bms("run", "--bounded", *args, timeout=120)
                assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
                assert f"in use by another bms run (pid {job.process.pid}" in second.stderr
            time.sleep(rng.uniform(5, 35))
            assert job.alive(), job.log()
            job.kill()
            kills.append(
                (rows_in(warehouse), sum(sum(store.last_processed(h).values()) for h in HUBS))
            )
        assert live.wait(timeout=300) == 0
    finally:
        if live.poll() is None:
            live.kill()
    # Restarted once more, as a bounded run: it reads on from the checkpoints to the end.
    final = bms("run", "--bounded", *args)
    assert final.returncode == 0, final.stderr
    assert_parity(hub, warehouse)
    assert kills[-1][0] > 0, "no row was written before the last kill: the kills proved nothing"
    report(f"kill -9 x5: (rows, sum of committed sequence numbers) at each kill: {kills}")


def test_a_30_second_database_outage_is_waited_out_without_a_restart(tmp_path, postgres, report):
    prism_or_skip()
    hub, warehouse = tmp_path / "hub.db", fresh_database(postgres)
    checkpoints = tmp_path / "checkpoints"
    backlog(hub, minutes=5, count=2000, seed=31)
    args = ["--hub", str(hub), "--warehouse", warehouse, "--checkpoints", str(checkpoints)]
    live = producer(hub, rate=20, seconds=110, seed=32)
    job = StreamingJob(tmp_path / "job.log", *args)
    try:
        deadline = time.monotonic() + 120
        while rows_in(warehouse) == 0 and time.monotonic() < deadline:
            assert job.alive(), job.log()
            time.sleep(1)
        before = rows_in(warehouse)
        assert before > 0, "no row written before the outage"
        postgres.stop()
        time.sleep(30)
        assert job.alive(), job.log()
        postgres.start()
        time.sleep(20)
        assert job.alive(), job.log()
        assert live.wait(timeout=120) == 0
        output = job.drain()
    finally:
        for process in (live, job.process):
            if process.poll() is None:
                process.kill()
    assert "reading paused" in output and "is back; reading resumes" in output
    # Its status line (a line every 30 s in a log) shows the watermark moving on.
    watermarks = re.findall(r"^status: .*watermark (\d\d:\d\d:\d\d)", output, re.MULTILINE)
    assert len(set(watermarks)) >= 2, output[-3000:]
    retries = int(re.search(r"warehouse write retries: (\d+)", output).group(1))
    final = bms("run", "--bounded", *args)
    assert final.returncode == 0, final.stderr
    assert_parity(hub, warehouse)
    assert "Traceback" not in output
    report(f"PostgreSQL down 30 s: {before} rows before, {retries} write retries, job kept going")


def test_a_bounded_run_with_checkpoints_over_60000_events_commits_and_a_rerun_adds_nothing(
    tmp_path,
):
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'warehouse.db'}"
    produce_into(hub, "--count", "60000", "--seed", "6", "--simulate", "2026-02-08T00:00:00Z")
    run = ["run", "--bounded", "--hub", str(hub), "--warehouse", warehouse]
    run += ["--checkpoints", str(tmp_path / "checkpoints")]
    first = bms(*run)
    assert first.returncode == 0, first.stderr[-3000:]
    written = summary_count(first.stdout, "newly written")
    assert written == summary_count(first.stdout, "computed") > 60000
    store = FileCheckpointStore(tmp_path / "checkpoints", checkpoint_scope(str(hub)))
    with LocalHub(hub) as client:
        partitions = [(name, p) for name in HUBS for p in client.partition_ids(name)]
        events = {key: client.read(*key, 0, 10**6) for key in partitions}
    # A later run can pair only events of the last 2 minutes (before the earliest partition's
    # last event) with events it reads: everything before them is committed, nothing after.
    frontier = min(partition[-1].enqueued_time for partition in events.values())
    slack = 30 * SECOND  # position marks come per 10 s of event time, events every few seconds
    for (name, partition), read in events.items():
        committed = store.last_processed(name)[partition]
        done = [event for event in read if event.sequence_number <= committed]
        assert done[-1].enqueued_time <= frontier - 120 * SECOND
        assert all(
            event.enqueued_time > frontier - 120 * SECOND - slack
            for event in read
            if event.sequence_number > committed
        )
    again = bms(*run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert summary_count(again.stdout, "newly written") == 0
    assert_parity(hub, warehouse)
