"""Throughput of the bounded pipeline, side by side with two references on the same events.

    python bench/throughput.py [--events 50000] [--seed 1]

Measures, in one run and on one event set in a local hub:
  - beam:      ``bms run --bounded`` end to end (hub -> parse -> join -> SQLite warehouse),
               on the in-process runner;
  - rules:     the same parsing and joining as plain Python (rules functions and a dict join),
               no Beam, no writes: the floor the per-event Python cost sets;
  - duckdb:    the reference evaluator running the ASA query in DuckDB.
and prints events/s for each and their ratios to beam. Numbers depend on the machine; compare
ratios, not absolute values, across machines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from pipeline import rules
from pipeline.commands import run as run_command
from pipeline.io.hubs import read_all
from pipeline.io.hubs.local import LocalHub
from pipeline.parity.evaluator import evaluate
from pipeline.schema import BOOKING_HUB, PAYMENT_HUB
from producers.events import Shares
from producers.publish import LocalHubPublisher, produce


def rules_only(events: list) -> int:
    seats = defaultdict(list)
    payments = []
    for event in events:
        try:
            if event.hub == BOOKING_HUB:
                for row in rules.booking_rows(event.body):
                    if row[0] is not None:
                        seats[row[0]].append((event.enqueued_time, row))
            elif event.hub == PAYMENT_HUB:
                payments.append((event.enqueued_time, rules.payment_row(event.body)))
        except rules.MalformedEvent:
            pass
    rows = 0
    for payment_time, payment in payments:
        for booking_time, booking in seats.get(payment[0], ()):
            if rules.joins(booking_time, payment_time):
                rules.fact_row(booking, booking_time, payment, payment_time)
                rows += 1
    return rows


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        hub_path = Path(directory) / "hub.db"
        produce(
            LocalHubPublisher(LocalHub(hub_path)),
            count=args.events,
            rate=40.0,
            seed=args.seed,
            shares=Shares(malformed=0.001),
            simulate_from=dt.datetime(2026, 2, 8, tzinfo=dt.UTC),
            progress=None,
        )
        with LocalHub(hub_path) as hub:
            events = read_all(hub)
        warehouse = f"sqlite:///{Path(directory) / 'warehouse.db'}"
        options = run_command.pipeline_options(
            run_command.parse_run_args(
                ["--bounded", "--hub", str(hub_path), "--warehouse", warehouse]
            )
        )
        results = {
            "beam": timed(lambda: run_command.counters(run_command.run_pipeline(options))),
            "rules": timed(lambda: rules_only(events)),
            "duckdb": timed(lambda: evaluate(events)),
        }
    rows = {
        "beam": results["beam"][1].get(("bms", "facts_written")),
        "rules": results["rules"][1],
        "duckdb": len(results["duckdb"][1].rows),
    }
    print(f"{len(events)} events, {rows['beam']} fact rows")
    beam_rate = len(events) / results["beam"][0]
    for name, (seconds, _) in results.items():
        rate = len(events) / seconds
        print(
            f"{name:7s} {seconds:7.2f} s  {rate:9.0f} events/s  {rate / beam_rate:5.2f}x beam"
            f"  rows {rows[name]}"
        )


if __name__ == "__main__":
    main()
