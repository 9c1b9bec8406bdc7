"""Latency of streaming ``bms run`` on Prism at a sustained rate, for each join mode.

    python bench/latency.py [--rate 1000] [--seconds 300] [--joins interval,windowed]
                            [--seed 1] [--json PATH] [-- BMS RUN ARGS...]

For each join mode (``--join``), in turn and on a fresh local hub and SQLite warehouse:
``bms run`` streams on Prism while ``bms produce --rate RATE`` publishes for SECONDS; the
warehouse is polled every 0.1 s. Printed per mode:

  - latency of each fact row: from its payment's enqueued time (the later event of every pair
    that joins) to the poll that first saw the row; p50, p90, p99, max;
  - CPU-seconds of the job's whole process tree (bms, its workers, Prism) per event read, over
    the steady part of the run (after a warm-up, until the producer stops), and the producer's
    own CPU beside it; the ratio of the modes' CPU per event;
  - every 30 s: resident memory of bms and of Prism, the rows the interval join holds
    (``bms_join_state_rows``), the watermark lag, rows written;
  - whether the warehouse, once the stream settled and the job drained, equals the ASA query
    evaluated over everything in the hub.

Speed depends on the machine and on whatever else runs on it: compare the two modes measured in
the same run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from pipeline.io.hubs import read_all
from pipeline.io.hubs.local import LocalHub
from pipeline.io.warehouses import read_facts
from pipeline.parity.evaluator import evaluate
from pipeline.schema import FACT_TABLE

WARM_UP_SECONDS = 30.0
POLL_SECONDS = 0.1
SAMPLE_SECONDS = 30.0
SETTLE_TIMEOUT_SECONDS = 400.0  # the windowed join writes a pair up to 150 s after its booking
DRAIN_TIMEOUT_SECONDS = 180.0


@dataclass
class Sample:
    """The job at one moment of a run (seconds since the producer started)."""

    at: float
    bms_rss_mb: float
    prism_rss_mb: float
    state_rows: float | None
    watermark_lag_s: float | None
    rows_written: int


@dataclass
class Result:
    join: str
    rate: float
    seconds: float
    events: int = 0
    rows: int = 0
    latency_s: dict[str, float] = field(default_factory=dict)
    cpu_s_per_event: float = 0.0
    steady_events: float = 0.0
    steady_cpu_s: float = 0.0
    producer_cpu_s: float = 0.0
    first_row_after_s: float | None = None
    equals_asa_query: bool = False
    samples: list[Sample] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tree_cpu_seconds(root: psutil.Process) -> float:
    """CPU-seconds (user and system) of a process and all its descendants, alive or reaped."""
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def rss_mb(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total / 2**20


def scrape(port: int) -> dict[str, float]:
    """The job's Prometheus metrics without labels (``--metrics-port``); empty until it serves."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def events_read(port: int) -> float | None:
    """Events the job has read from both hubs (summed over the hub label)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            lines = response.read().decode().splitlines()
    except OSError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("bms_events_read_total{")
    )


class Watcher:
    """Polls the warehouse's fact table for new rows; remembers when each was first seen."""

    def __init__(self, path: Path):
        self._path = path
        self._last_rowid = 0
        self.latencies: list[float] = []  # seconds, one per row
        self.first_seen: float | None = None

    def poll(self) -> None:
        try:
            with contextlib.closing(sqlite3.connect(self._path, timeout=5)) as connection:
                rows = connection.execute(
                    f"SELECT rowid, payment_event_time FROM {FACT_TABLE} WHERE rowid > ?",
                    (self._last_rowid,),
                ).fetchall()
        except sqlite3.OperationalError:  # the job has not created the table yet
            return
        now = time.time()
        for rowid, payment_event_time in rows:
            enqueued = dt.datetime.fromisoformat(payment_event_time).replace(tzinfo=dt.UTC)
            self.latencies.append(now - enqueued.timestamp())
            self._last_rowid = max(self._last_rowid, rowid)
        if rows and self.first_seen is None:
            self.first_seen = now

    @property
    def rows(self) -> int:
        return len(self.latencies)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    at = {name: q for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
    picked = {name: ordered[min(len(ordered) - 1, int(len(ordered) * q))] for name, q in at.items()}
    return {**picked, "max": ordered[-1]}


def bms(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], **kwargs)


def measure(
    join: str, rate: float, seconds: float, seed: int, directory: Path, run_args: list[str] = ()
) -> Result:
    """One streaming run of one join mode (see the module doc); ``run_args`` go to bms run."""
    hub, database = directory / "hub.db", directory / "warehouse.db"
    LocalHub(hub).close()
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")  # the polls never block the job's writes
    port = free_port()
    log = open(directory / "job.log", "w")  # noqa: SIM115 (open for the job's lifetime)
    job = bms(
        "run", "--hub", str(hub), "--warehouse", f"sqlite:///{database}", "--join", join,
        "--metrics-port", str(port), *run_args, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    result = Result(join, rate, seconds)
    watcher = Watcher(database)
    try:
        root = psutil.Process(job.pid)
        while not scrape(port):  # the job serves its metrics once it is launched
            if job.poll() is not None:
                raise RuntimeError(f"bms run ended: {(directory / 'job.log').read_text()[-2000:]}")
            time.sleep(0.5)
        time.sleep(5)  # Prism starts the pipeline
        count = str(int(rate * seconds))
        producer = bms(
            "produce", "--hub", str(hub), "--rate", str(rate), "--count", count,
            "--seed", str(seed), stderr=subprocess.DEVNULL,
        )  # fmt: skip
        producing = psutil.Process(producer.pid)
        started = time.time()
        steady_start = None
        next_sample = started
        producer_cpu = 0.0
        while producer.poll() is None:
            watcher.poll()
            now = time.time()
            with contextlib.suppress(psutil.NoSuchProcess):
                producer_cpu = tree_cpu_seconds(producing)
            if steady_start is None and now - started >= WARM_UP_SECONDS:
                steady_start = (tree_cpu_seconds(root), events_read(port))
            if now >= next_sample:
                result.samples.append(sample(root, port, now - started, watcher.rows))
                next_sample += SAMPLE_SECONDS
            time.sleep(POLL_SECONDS)
        if producer.returncode != 0:
            raise RuntimeError(f"bms produce failed with status {producer.returncode}")
        steady_end = (tree_cpu_seconds(root), events_read(port))
        result.producer_cpu_s = producer_cpu
        if steady_start is not None and steady_start[1] is not None and steady_end[1]:
            result.steady_cpu_s = steady_end[0] - steady_start[0]
            result.steady_events = steady_end[1] - steady_start[1]
            result.cpu_s_per_event = result.steady_cpu_s / max(result.steady_events, 1)
        with LocalHub(hub) as client:
            events = read_all(client)
        result.events = len(events)
        expected = Counter(evaluate(events).rows)
        deadline = time.time() + SETTLE_TIMEOUT_SECONDS
        while watcher.rows < expected.total() and time.time() < deadline:
            watcher.poll()
            if time.time() >= next_sample:
                result.samples.append(sample(root, port, time.time() - started, watcher.rows))
                next_sample += SAMPLE_SECONDS
            time.sleep(POLL_SECONDS)
        job.send_signal(signal.SIGINT)  # a drain: whatever is still open is written
        job.wait(timeout=DRAIN_TIMEOUT_SECONDS)
        watcher.poll()
        result.rows = watcher.rows
        result.latency_s = percentiles(watcher.latencies)
        if watcher.first_seen is not None:
            result.first_row_after_s = watcher.first_seen - started
        result.equals_asa_query = Counter(read_facts(f"sqlite:///{database}")) == expected
    finally:
        for process in (job,):
            if process.poll() is None:
                process.kill()
        log.close()
    return result


def sample(root: psutil.Process, port: int, at: float, rows: int) -> Sample:
    tree = [root, *root.children(recursive=True)]
    prism = [p for p in tree if _name(p) == "prism"]
    metrics = scrape(port)
    return Sample(
        at=round(at, 1),
        bms_rss_mb=round(rss_mb([p for p in tree if p not in prism]), 1),
        prism_rss_mb=round(rss_mb(prism), 1),
        state_rows=metrics.get("bms_join_state_rows"),
        watermark_lag_s=metrics.get("bms_watermark_lag_seconds"),
        rows_written=rows,
    )


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def report(results: list[Result]) -> None:
    print(f"{'join':9s} {'events':>8s} {'rows':>8s}  latency p50 / p90 / p99 / max (s)   "
          "first row  CPU-s/event  (producer CPU-s)  = ASA")  # fmt: skip
    for r in results:
        latency = " / ".join(f"{r.latency_s.get(k, float('nan')):5.2f}" for k in
                             ("p50", "p90", "p99", "max"))  # fmt: skip
        first = "-" if r.first_row_after_s is None else f"{r.first_row_after_s:6.1f} s"
        print(f"{r.join:9s} {r.events:8d} {r.rows:8d}  {latency}   {first:>9s}  "
              f"{r.cpu_s_per_event * 1000:7.3f} ms  ({r.producer_cpu_s:6.1f})  "
              f"{'yes' if r.equals_asa_query else 'NO'}")  # fmt: skip
    by_join = {r.join: r for r in results}
    if {"interval", "windowed"} <= set(by_join) and by_join["windowed"].cpu_s_per_event:
        ratio = by_join["interval"].cpu_s_per_event / by_join["windowed"].cpu_s_per_event
        print(f"CPU per event, interval / windowed: {ratio:.2f}x")
    for r in results:
        print(f"\n{r.join}: every {SAMPLE_SECONDS:g} s")
        print("     t   bms RSS MB  Prism RSS MB  join state rows  watermark lag s  rows")
        for s in r.samples:
            state = "-" if s.state_rows is None else f"{s.state_rows:.0f}"
            lag = "-" if s.watermark_lag_s is None else f"{s.watermark_lag_s:.1f}"
            print(f"{s.at:6.0f}  {s.bms_rss_mb:10.0f}  {s.prism_rss_mb:12.0f}  {state:>15s}  "
                  f"{lag:>15s}  {s.rows_written}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=300.0, help="how long to produce")
    parser.add_argument("--joins", default="interval,windowed", help="join modes, in order")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here, as JSON")
    parser.add_argument("run_args", nargs="*", help="more bms run flags, after --")
    args = parser.parse_args()
    results = []
    for join in args.joins.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bms-latency-{join}-") as directory:
            results.append(
                measure(join, args.rate, args.seconds, args.seed, Path(directory), args.run_args)
            )
    report(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
