"""The benchmark's events: generated once with the project's producer, then handed to every
engine in the form it reads, all through bms's own commands.

1. ``bms produce --simulate START --seed S`` publishes a seeded history into a generation hub
   (the same seed, the same events);
2. ``bms hub export`` writes each event hub as JSON Lines (``<hub>.jsonl``): what DuckDB and
   plain Python read;
3. ``bms replay`` appends those files to a fresh hub: what ``bms run`` reads, bounded and
   streaming (so the files and the hub provably hold the same events);
4. for Flink, each export line again with its body as a JSON object (malformed bodies stay
   strings) and the enqueued time as integer microseconds (``<hub>.flink.jsonl``): the shape a
   Kafka or Event Hubs JSON source gives Flink, so that Flink's JSON format parses each body once,
   as the pipeline does.

Only the engines' runs are measured, never these steps.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson

from pipeline.schema import HUBS, datetime_to_micros

#: Every history starts here, long enough ago for 10 million events at the default rate to end
#: before now (a streaming job writes the rows of future events only when their time comes).
SIMULATE_FROM = "2026-01-01T00:00:00Z"
MALFORMED_SHARE = 0.001  # a few dead letters, as in real traffic


@dataclass(frozen=True)
class EventSet:
    """One generated event set and where each engine finds it."""

    events: int
    hub: Path  # the fresh hub the exports were replayed into
    exports: dict[str, Path]  # event hub name -> bms hub export file
    flink_inputs: dict[str, Path]  # event hub name -> the export with bodies as objects
    events_by_hub: dict[str, int]
    body_bytes_by_hub: dict[str, int]  # total body bytes per event hub

    @property
    def mean_body_bytes(self) -> float:
        """Mean event body size, the payload an event hub bills for."""
        return sum(self.body_bytes_by_hub.values()) / max(1, self.events)


def bms(*args: str, cwd: Path) -> None:
    """Runs one bms command, failing loudly with its output."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"bms {' '.join(args)} failed:\n{result.stdout}{result.stderr}")


def generate(
    work: Path,
    count: int,
    *,
    seed: int,
    rate: float,
    repository: Path,
    malformed: float = MALFORMED_SHARE,
) -> EventSet:
    """Generates ``count`` events into ``work`` (``malformed``: the share of broken bodies) and
    prepares every engine's input."""
    work.mkdir(parents=True, exist_ok=True)
    generation_hub, hub = work / "generated-hub.db", work / "hub.db"
    bms(
        "produce", "--hub", str(generation_hub), "--count", str(count), "--rate", str(rate),
        "--seed", str(seed), "--malformed-share", str(malformed),
        "--simulate", SIMULATE_FROM, "-q",
        cwd=repository,
    )  # fmt: skip
    exports, flink_inputs, events_by_hub, body_bytes = {}, {}, {}, {}
    for name in HUBS:
        exports[name] = work / f"{name}.jsonl"
        bms("hub", "export", "--hub", str(generation_hub), "--hub-name", name,
            str(exports[name]), "-q", cwd=repository)  # fmt: skip
        bms("replay", "--hub", str(hub), "--hub-name", name, str(exports[name]), "-q",
            cwd=repository)  # fmt: skip
        flink_inputs[name] = work / f"{name}.flink.jsonl"
        events_by_hub[name], body_bytes[name] = _write_flink_input(
            exports[name], flink_inputs[name]
        )
    generation_hub.unlink()
    return EventSet(
        events=sum(events_by_hub.values()),
        hub=hub,
        exports=exports,
        flink_inputs=flink_inputs,
        events_by_hub=events_by_hub,
        body_bytes_by_hub=body_bytes,
    )


def enqueued_micros(text: str) -> int:
    """An export line's enqueued time (ISO 8601 UTC) as microseconds since the epoch."""
    return datetime_to_micros(dt.datetime.fromisoformat(text))


def _write_flink_input(export: Path, target: Path) -> tuple[int, int]:
    """Writes the Flink form of an export file; returns its event count and body bytes."""
    events = body_bytes = 0
    with export.open("rb") as source, target.open("wb") as output:
        for line in source:
            record = orjson.loads(line)
            body = record["body"]
            events += 1
            body_bytes += len(body.encode())
            # A malformed body stays a string: Flink's JSON format skips it, as the pipeline
            # dead-letters it.
            with contextlib.suppress(orjson.JSONDecodeError):
                body = orjson.loads(body)
            micros = enqueued_micros(record["enqueued_time"])
            output.write(orjson.dumps({"enqueued_micros": micros, "body": body}) + b"\n")
    return events, body_bytes
