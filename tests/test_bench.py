"""The benchmark harness (bench/): its meter, its reference engines, and a whole small run.

Speed is never asserted here: the harness measures it, and its targets live in bench/. What is
checked is that it measures the whole process tree, that every engine computes the ASA query's
rows, and that a run produces the documented JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.events import generate
from bench.reference import duckdb_rows, python_rows
from bench.throughput import ENGINES, PEER, QUICK_SIZE
from pipeline import runners
from pipeline.io.hubs import read_all
from pipeline.io.hubs.local import LocalHub
from pipeline.parity.evaluator import evaluate
from pipeline.schema import BOOKING_HUB, PAYMENT_HUB
from tests.conftest import missing

REPOSITORY = Path(__file__).resolve().parents[1]
ORPHAN_CPU_SECONDS = 1.0
ORPHAN_BYTES = 300 * 2**20


def test_the_meter_counts_an_orphaned_grandchild_cpu_and_memory(tmp_path):
    """A runner left behind by the process that started it (PyFlink's JVM, Prism) is measured:
    the command here exits at once, leaving a grandchild that holds 300 MiB and burns 1 s of
    CPU. Run in a process of its own: the meter makes its process a child subreaper."""
    grandchild = (
        f"import time; block = bytearray({ORPHAN_BYTES}); block[::4096] = b'x' * "
        f"len(block[::4096]); start = time.process_time()\n"
        f"while time.process_time() - start < {ORPHAN_CPU_SECONDS}: pass"
    )
    child = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {grandchild!r}])"
    meter = textwrap.dedent(f"""
        import json, sys
        from dataclasses import asdict
        from pathlib import Path
        from bench.measure import run_measured
        usage = run_measured([sys.executable, "-c", {child!r}], log=Path({str(tmp_path)!r}) /
                             "orphan.log", timeout=120)
        print(json.dumps(asdict(usage)))
    """)
    result = subprocess.run(
        [sys.executable, "-c", meter], cwd=REPOSITORY, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    usage = json.loads(result.stdout)
    assert usage["cpu_seconds"] >= ORPHAN_CPU_SECONDS
    assert usage["peak_rss_bytes"] >= ORPHAN_BYTES
    assert usage["wall_seconds"] >= ORPHAN_CPU_SECONDS  # it waited for the orphan
    assert usage["stragglers_killed"] == 0


def test_reference_engines_give_the_evaluators_rows_malformed_events_included(tmp_path):
    """DuckDB loading the export files itself, and plain Python over rules, give as many rows
    as the parity evaluator over the hub the files were replayed into."""
    events = generate(tmp_path, 1500, seed=7, rate=40.0, repository=REPOSITORY, malformed=0.05)
    with LocalHub(events.hub) as hub:
        evaluation = evaluate(read_all(hub))
    assert evaluation.dropped, "no malformed event: the case is not exercised"
    files = events.exports[BOOKING_HUB], events.exports[PAYMENT_HUB]
    assert python_rows(*files) == duckdb_rows(*files) == len(evaluation.rows) > 0
    assert events.events == 1500 and events.mean_body_bytes > 100


@pytest.mark.slow
def test_a_quick_run_has_every_engine_agree_and_writes_the_json(tmp_path, report):
    """``python -m bench.throughput --quick`` end to end: every engine (PyFlink in its own
    environment, made here if missing; Prism; the FnApiRunner; DuckDB; Python) on the same
    events. The harness itself fails on any disagreement; the JSON must say the same."""
    if shutil.which("java") is None:
        missing("no java on PATH: PyFlink needs it (scripts/setup-runners pyflink)")
    try:
        runners.prism_binary()
    except runners.RunnerNotInstalled as error:
        missing(str(error))
    results = tmp_path / "results.json"
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--quick", "--json", str(results),
         "--work", str(tmp_path / "work")],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(results.read_text())
    assert {"measured_at", "commit", "machine", "versions", "seed", "rate"} <= data.keys()
    assert data["versions"]["apache_flink"] and data["versions"]["java"]
    (size,) = data["sizes"]
    assert size["events"] == QUICK_SIZE and size["mean_event_bytes"] > 0
    engines = size["engines"]
    assert list(engines) == list(ENGINES)
    assert {engine["rows"] for engine in engines.values()} == {size["rows"]}
    assert size["rows"] > 0
    for name, engine in engines.items():
        for field in ("wall_seconds", "cpu_seconds", "peak_rss_bytes", "events_per_second",
                      "events_per_cpu_second"):  # fmt: skip
            assert engine[field] > 0, (name, field)
        for metric in ("events_per_second", "events_per_cpu_second"):
            ratio = engine[metric] / engines[PEER][metric]
            assert engine[f"{metric}_vs_{PEER}"] == pytest.approx(ratio)
    assert 0 < engines["bms-streaming"]["stopped_after"] <= engines["bms-streaming"]["wall_seconds"]
    assert "| engine |" in run.stdout
    report(
        f"bench --quick ({QUICK_SIZE:,} events, {size['rows']:,} rows): {seconds:.0f} s in all; "
        + ", ".join(f"{name} {engine['wall_seconds']:.1f} s" for name, engine in engines.items())
    )
