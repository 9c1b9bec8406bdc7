"""Seeing a job work: the live status line and the Prometheus endpoint of ``bms run``, on real
runs of the in-process runner (the streaming status is checked by tests/test_faults.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from pipeline import metrics
from pipeline.commands.run import counters, parse_run_args, pipeline_options, run_pipeline
from pipeline.io.hubs import checkpoint_scope
from pipeline.io.hubs.lease import hold_lease
from pipeline.io.hubs.local import LocalHub
from pipeline.status import StatusLine
from tests.conftest import produce_into


def bounded_options(tmp_path, *extra: str):
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'w.db'}"
    args = parse_run_args(["--bounded", "--hub", str(hub), "--warehouse", warehouse, *extra])
    return pipeline_options(args)


def test_the_status_line_of_a_bounded_run_reaches_its_backlog_and_the_summary(tmp_path):
    produce_into(tmp_path / "hub.db", "--count", "3000", "--seed", "4", "--simulate",
                 "2026-02-08T10:00:00Z")  # fmt: skip
    stream = io.StringIO()
    with StatusLine(3000, interval=0.1, terminal=False, log_interval=0.1, stream=stream) as line:
        result = run_pipeline(bounded_options(tmp_path), status=False)
        final = line.text()
    totals = counters(result)
    assert "100% of 3,000" in final
    read = {hub: int(n.replace(",", "")) for hub, n in re.findall(r"(\w+topic) ([\d,]+)", final)}
    assert sum(read.values()) == 3000
    assert f"rows {totals[('bms', 'facts_written')]:,} new" in final
    assert re.search(r"watermark 10:\d\d:\d\d", final) or "watermark 1" in final
    printed = stream.getvalue().splitlines()
    assert printed and all(line.startswith("status: read ") for line in printed)
    assert "\x1b" not in stream.getvalue()  # no terminal codes where there is no terminal


def test_no_status_is_printed_to_a_pipe_by_a_short_run(tmp_path):
    hub = tmp_path / "hub.db"
    produce_into(hub, "--count", "50", "--seed", "4", "--simulate", "2026-02-08T10:00:00Z")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--bounded", "--hub", str(hub),
         "--warehouse", f"sqlite:///{tmp_path / 'w.db'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "status:" not in result.stderr and "\x1b" not in result.stderr + result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("bms_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_prometheus_counters_rise_during_a_run_and_end_at_the_summary(tmp_path):
    produce_into(tmp_path / "hub.db", "--count", "20000", "--seed", "4", "--simulate",
                 "2026-02-08T10:00:00Z")  # fmt: skip
    port = free_port()
    before = metrics.ROWS_WRITTEN.value(table="facts")
    outcome = {}
    job = threading.Thread(
        target=lambda: outcome.setdefault(
            "result", run_pipeline(bounded_options(tmp_path, "--metrics-port", str(port)))
        )
    )
    job.start()
    scraped = []
    while job.is_alive():
        with contextlib.suppress(OSError):  # not serving yet, or done
            scraped.append(scrape(port))
        time.sleep(0.2)
    job.join()
    assert scraped, "the endpoint never answered while the job ran"
    read = [sum(v for k, v in s.items() if k.startswith("bms_events_read_total")) for s in scraped]
    assert read == sorted(read) and read[-1] > 0
    assert "bms_watermark_lag_seconds" in scraped[-1]
    totals = counters(outcome["result"])
    assert metrics.ROWS_WRITTEN.value(table="facts") - before == totals[("bms", "facts_written")]
    assert totals[("bms", "facts_written")] > 0
    with socket.socket() as probe:  # and the port is closed again
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def bms_status(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", "--output", "json", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_bms_status_after_a_run_and_while_a_job_holds_the_checkpoints(tmp_path):
    hub, checkpoints = tmp_path / "hub.db", tmp_path / "checkpoints"
    produce_into(hub, "--count", "400", "--seed", "4", "--simulate", "2026-02-08T10:00:00Z")
    options = bounded_options(tmp_path, "--checkpoints", str(checkpoints))
    totals = counters(run_pipeline(options, status=False))
    where = ["--hub", str(hub), "--warehouse", f"sqlite:///{tmp_path / 'w.db'}"]
    report = bms_status(*where, "--checkpoints", str(checkpoints))
    assert report["warehouse"]["fact_rows"] == totals[("bms", "facts_written")] > 0
    assert report["lease"] == {"held": False}
    with LocalHub(hub) as client:
        for row in report["partitions"]:
            last = client.partition_properties(row["hub"], row["partition"]).last_sequence_number
            assert row["last_sequence_number"] == last
            committed = row["committed"]
            assert row["resumes_at"] == (0 if committed is None else committed + 1)
            assert row["backlog"] == last + 1 - row["resumes_at"]
    assert any(row["committed"] is not None for row in report["partitions"])
    with hold_lease(str(checkpoints), checkpoint_scope(str(hub))):  # as a running job does
        held = bms_status(*where, "--checkpoints", str(checkpoints))["lease"]
    assert held["held"] and held["pid"] == os.getpid()
    text = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", *where], capture_output=True, text=True
    ).stdout
    assert "backlog:" in text and "fact rows" in text
