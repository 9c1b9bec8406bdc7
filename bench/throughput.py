"""Throughput of bms beside Flink SQL, DuckDB and plain Python, on the same events.

    python -m bench.throughput                          # 200,000 and 1,000,000 events
    python -m bench.throughput --events 50000 --events 200000
    python -m bench.throughput --quick                  # 4,000 events, about a minute (CI)
    python -m bench.throughput --table bench/results/last.json   # the README table again

For each size it generates the events once with the project's producer (seeded), replays them
into a fresh local hub and exports them to files (``bench/events.py``), then runs each engine as
a process of its own, one at a time:

  python           plain Python + orjson with pipeline.rules, no writes (bench/reference.py)
  duckdb           the ASA query as the parity evaluator translates it, DuckDB, 2 threads
  flink-streaming  Flink SQL's interval join, the same query (bench/sql/), streaming mode,
                   parallelism 2, file sink; PyFlink in its own virtual environment
  flink-batch      the same in batch mode
  bms-bounded      bms run --bounded into a fresh SQLite warehouse (the FnApiRunner)
  bms-streaming    bms run (unbounded, on Prism) over the same hub: the catch-up, until the
                   warehouse holds every expected row; then Ctrl-C (SIGINT), which drains it

Each is measured as a whole process tree (``bench/measure.py``): wall time, CPU-seconds (the
JVM, Prism and Beam's workers included) and peak RSS. An engine that fails, runs out of time or
holds more than ``--max-rss-gib`` is killed and reported, and every engine that ran must give
the same number of fact rows; otherwise the run exits 1. It prints a table per size, with
events/s (for bms-streaming, events over the time until the last row was in the warehouse),
events per CPU-second and both as ratios to Flink streaming, and writes everything as JSON
(``--json``, default ``bench/results/last.json``; ``--quick`` runs write
``bench/results/quick.json``).

The machine is shared: the JSON keeps the load average around each run; compare CPU-seconds
and ratios within one run rather than wall times across runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import orjson

from bench import flink
from bench.events import EventSet, generate
from bench.measure import MeasureError, Usage, run_measured
from pipeline.schema import BOOKING_HUB, FACT_TABLE, PAYMENT_HUB

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "bench" / "results"
DEFAULT_SIZES = (200_000, 1_000_000)
QUICK_SIZE = 4_000
DEFAULT_RATE = 40.0  # events/s of the simulated history: 4,800 events in a 2-minute join window
PEER = "flink-streaming"
MEMORY_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
#: The engines in the order they run; bms-streaming last, once the expected rows are known.
ENGINES = {
    "python": "plain Python + orjson (pipeline.rules), no writes",
    "duckdb": "DuckDB, 2 threads (the parity evaluator's SQL)",
    "flink-streaming": "PyFlink SQL interval join, streaming, parallelism 2, file sink",
    "flink-batch": "PyFlink SQL, batch mode, parallelism 2, file sink",
    "bms-bounded": "bms run --bounded (FnApiRunner) into SQLite",
    "bms-streaming": "bms run on Prism, streaming catch-up into SQLite",
}


class BenchError(RuntimeError):
    """An engine gave no valid result."""


@dataclass(frozen=True)
class EngineResult:
    """One engine's run over one event set: measured, or failed with the reason."""

    rows: int | None
    usage: Usage | None
    load_before: float  # 1-minute load average when it started
    load_after: float
    error: str | None = None


@dataclass(frozen=True)
class Context:
    """What every engine's run needs."""

    events: EventSet
    work: Path
    expected_rows: int | None  # known once one engine has run
    flink_python: Path | None
    timeout: float
    max_rss_bytes: int


def _python_env() -> dict[str, str]:
    """The environment of the project's own processes: this checkout's code first."""
    path = os.pathsep.join(p for p in (str(REPOSITORY), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _flink_env() -> dict[str, str]:
    """PyFlink's environment must not see the project's packages (another apache-beam)."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def _measure(context: Context, name: str, command: list[str], **kwargs) -> Usage:
    return run_measured(
        command,
        log=context.work / f"{name}.log",
        timeout=context.timeout,
        max_rss_bytes=context.max_rss_bytes,
        cwd=REPOSITORY,
        **kwargs,
    )


def _reference(engine: str) -> Callable[[Context], tuple[int, Usage]]:
    def run(context: Context):
        exports = context.events.exports
        command = [sys.executable, "-m", "bench.reference", engine,
                   str(exports[BOOKING_HUB]), str(exports[PAYMENT_HUB])]  # fmt: skip
        usage = _measure(context, engine, command, env=_python_env())
        lines = (context.work / f"{engine}.log").read_text().strip().splitlines()
        return orjson.loads(lines[-1])["rows"], usage

    return run


def _flink(mode: str) -> Callable[[Context], tuple[int, Usage]]:
    def run(context: Context):
        output = context.work / f"flink-{mode}"
        shutil.rmtree(output, ignore_errors=True)
        inputs = context.events.flink_inputs
        command = [
            str(context.flink_python), str(REPOSITORY / "bench" / "flink_job.py"),
            "--mode", mode, "--bookings", str(inputs[BOOKING_HUB]),
            "--payments", str(inputs[PAYMENT_HUB]), "--output", str(output),
            "--checkpoints", str(context.work / f"flink-{mode}-checkpoints"),
        ]  # fmt: skip
        usage = _measure(context, f"flink-{mode}", command, env=_flink_env())
        return _count_sink_rows(output), usage

    return run


def _count_sink_rows(output: Path) -> int:
    """Rows in the CSV files Flink published (one line each: no value holds a line break).
    Hidden files are not published: in-progress files and the copies Flink's local-filesystem
    writer makes of them at each checkpoint and leaves behind."""
    rows = 0
    for path in output.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            with path.open("rb") as file:
                rows += sum(1 for _ in file)
    return rows


def warehouse_rows(database: Path) -> int | None:
    """Fact rows in a SQLite warehouse: 0 before the table exists, None while it is locked."""
    if not database.exists():
        return 0
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=0.5)
    try:
        return connection.execute(f"SELECT COUNT(*) FROM {FACT_TABLE}").fetchone()[0]
    except sqlite3.OperationalError as error:
        return 0 if "no such table" in str(error) else None
    finally:
        connection.close()


def _bms_run(mode: str) -> Callable[[Context], tuple[int, Usage]]:
    def run(context: Context):
        database = context.work / f"warehouse-{mode}.db"
        database.unlink(missing_ok=True)
        command = [sys.executable, "-m", "pipeline.cli", "run", "--hub", str(context.events.hub),
                   "--warehouse", f"sqlite:///{database}"]  # fmt: skip
        if mode == "bounded":
            usage = _measure(context, "bms-bounded", [*command, "--bounded"], env=_python_env())
            return warehouse_rows(database), usage
        expected = context.expected_rows

        def caught_up() -> bool:
            rows = warehouse_rows(database)
            return rows is not None and rows >= expected

        try:
            usage = _measure(
                context, "bms-streaming", command, env=_python_env(), stop_when=caught_up
            )
        except MeasureError as error:
            written = warehouse_rows(database)
            raise BenchError(f"{written or 0:,} of {expected:,} rows written; {error}") from None
        return warehouse_rows(database), usage

    return run


RUNNERS: dict[str, Callable[[Context], tuple[int, Usage]]] = {
    "python": _reference("python"),
    "duckdb": _reference("duckdb"),
    "flink-streaming": _flink("streaming"),
    "flink-batch": _flink("batch"),
    "bms-bounded": _bms_run("bounded"),
    "bms-streaming": _bms_run("streaming"),
}


def run_size(
    count: int,
    engines: list[str],
    *,
    work: Path,
    seed: int,
    rate: float,
    flink_python: Path | None,
    max_rss_bytes: int,
) -> tuple[dict, list[str]]:
    """Generates one event set and runs every engine over it: the size's JSON record, and what
    went wrong (an engine that failed, engines that disagree on the rows)."""
    print(f"\n== {count:,} events: generating (seed {seed}, {rate:g} events/s) ...", flush=True)
    events = generate(work, count, seed=seed, rate=rate, repository=REPOSITORY)
    if engines == ["bms-streaming"]:
        engines = ["python", *engines]  # the catch-up needs to know when it is done
    results: dict[str, EngineResult] = {}
    expected = None
    for name in engines:
        context = Context(events, work, expected, flink_python, 600 + count / 100, max_rss_bytes)
        print(f"-- {name}: {ENGINES[name]} ...", flush=True)
        load_before = os.getloadavg()[0]
        try:
            rows, usage = RUNNERS[name](context)
        except (BenchError, MeasureError) as error:
            results[name] = EngineResult(
                None, None, load_before, os.getloadavg()[0], error=str(error)
            )
            print(f"   FAILED: {error}", flush=True)
            continue
        results[name] = EngineResult(rows, usage, load_before, os.getloadavg()[0])
        expected = rows if expected is None else expected
        print(
            f"   {rows:,} rows, {usage.wall_seconds:.1f} s wall, {usage.cpu_seconds:.1f} CPU-s, "
            f"peak RSS {usage.peak_rss_bytes / 2**30:.2f} GiB (load {load_before:.1f})",
            flush=True,
        )
    problems = [
        f"{name} failed on {count:,} events: {r.error}" for name, r in results.items() if r.error
    ]
    counts = {name: r.rows for name, r in results.items() if r.error is None}
    if len(set(counts.values())) > 1:
        problems.append(
            f"engines disagree on the fact rows of {count:,} events: "
            + ", ".join(f"{name} {rows:,}" for name, rows in counts.items())
        )
    return _size_record(events, results, expected), problems


def _size_record(events: EventSet, results: dict[str, EngineResult], rows: int | None) -> dict:
    """Per engine: rows, wall, CPU, RSS, the rates and their ratios to the peer (or the error)."""
    engines = {}
    for name, result in results.items():
        record = {
            "description": ENGINES[name],
            "rows": result.rows,
            "error": result.error,
            "load_before": result.load_before,
            "load_after": result.load_after,
        }
        if result.usage is not None:
            # bms-streaming: events over the time until the warehouse held every row (the stop).
            seconds = result.usage.stopped_after or result.usage.wall_seconds
            record |= {
                **asdict(result.usage),
                "events_per_second": events.events / seconds,
                "events_per_cpu_second": events.events / result.usage.cpu_seconds,
            }
        engines[name] = record
    peer = engines.get(PEER, {})
    for record in engines.values():
        for metric in ("events_per_second", "events_per_cpu_second"):
            measured = metric in record and metric in peer
            record[f"{metric}_vs_{PEER}"] = record[metric] / peer[metric] if measured else None
    return {
        "events": events.events,
        "events_by_hub": events.events_by_hub,
        "mean_event_bytes": events.mean_body_bytes,
        "mean_event_bytes_by_hub": {
            hub: events.body_bytes_by_hub[hub] / max(1, n)
            for hub, n in events.events_by_hub.items()
        },
        "rows": rows,
        "engines": engines,
    }


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True)
    return result.stdout.strip()


def _versions(flink_python: Path | None) -> dict:
    import apache_beam

    return {
        "python": platform.python_version(),
        "apache_beam": apache_beam.__version__,
        "duckdb": duckdb.__version__,
        "apache_flink": flink.installed_version(flink_python) if flink_python else None,
        "java": flink.java_version() if flink_python else None,
    }


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def markdown(results: dict) -> str:
    """The results as Markdown tables, one per size (the README shows this)."""
    lines = []
    for size in results["sizes"]:
        lines += [
            f"**{size['events']:,} events** ({size['rows'] or 0:,} fact rows; mean event "
            f"{size['mean_event_bytes']:.0f} bytes)",
            "",
            "| engine | wall s | events/s | × Flink streaming | CPU-s | events/CPU-s "
            "| × Flink streaming | peak RSS |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, engine in size["engines"].items():
            if engine["error"] is not None:
                lines.append(
                    f"| {name}: {engine['description']} | failed: {engine['error']} "
                    "| — | — | — | — | — | — |"
                )
                continue
            wall = f"{engine['wall_seconds']:.1f}"
            if engine["stopped_after"] is not None:
                wall = f"{engine['stopped_after']:.1f} to all rows, {wall} drained"
            lines.append(
                f"| {name}: {engine['description']} | {wall} "
                f"| {_rate(engine['events_per_second'])} "
                f"| {_ratio(engine[f'events_per_second_vs_{PEER}'])} "
                f"| {engine['cpu_seconds']:.1f} | {_rate(engine['events_per_cpu_second'])} "
                f"| {_ratio(engine[f'events_per_cpu_second_vs_{PEER}'])} "
                f"| {engine['peak_rss_bytes'] / 2**30:.2f} GiB |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    parser.add_argument(
        "--events",
        type=int,
        action="append",
        metavar="N",
        help="an event count to run (repeatable; default: 200000 and 1000000)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_SIZE:,} events only: the whole harness in minutes (CI)",
    )
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"engines to run, comma-separated (default: all: {', '.join(ENGINES)})",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help="events/s of the simulated history (default: %(default)s)",
    )
    parser.add_argument("--flink-version", default=flink.FLINK_VERSION)
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the results (default: "
        "bench/results/last.json, or quick.json with --quick)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="keep events, warehouses and logs here (default: a temporary folder)",
    )
    parser.add_argument(
        "--max-rss-gib",
        type=float,
        default=round(MEMORY_BYTES / 2**30 / 2, 1),
        help="kill an engine whose processes together hold more than this (default: half of "
        "this machine's memory, %(default)s): it fails, the others still run",
    )
    parser.add_argument(
        "--table",
        type=Path,
        metavar="JSON",
        help="only print the Markdown tables of an earlier run's JSON",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(orjson.loads(args.table.read_bytes())))
        return 0
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    engines = [name for name in ENGINES if name in engines]
    sizes = [QUICK_SIZE] if args.quick else (args.events or list(DEFAULT_SIZES))
    target = args.json or RESULTS / ("quick.json" if args.quick else "last.json")
    try:
        flink_python = None
        if any(name.startswith("flink") for name in engines):
            flink_python = flink.flink_python(args.flink_version)
    except flink.FlinkUnavailable as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    versions = _versions(flink_python)
    print(
        f"PyFlink {versions['apache_flink']} on Java {versions['java']}; Beam "
        f"{versions['apache_beam']}; DuckDB {versions['duckdb']}",
        flush=True,
    )
    results = {
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--", "pipeline", "bench")),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_bytes": MEMORY_BYTES,
            "platform": platform.platform(),
        },  # fmt: skip
        "versions": versions,
        "seed": args.seed,
        "rate": args.rate,
        "sizes": [],
    }
    problems = []
    for count in sizes:
        with tempfile.TemporaryDirectory(prefix="bms-bench-") as scratch:
            work = (args.work or Path(scratch)) / f"{count}"
            shutil.rmtree(work, ignore_errors=True)
            record, found = run_size(
                count, engines, work=work, seed=args.seed, rate=args.rate,
                flink_python=flink_python, max_rss_bytes=int(args.max_rss_gib * 2**30),
            )  # fmt: skip
        results["sizes"].append(record)
        problems += found
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    print()
    print(markdown(results))
    print(f"results: {target}")
    for problem in problems:
        print(f"bench: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
