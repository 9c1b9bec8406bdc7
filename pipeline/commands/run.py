"""``bms run``: the pipeline, bounded on the in-process runner or unbounded on a streaming one."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Mapping

import apache_beam as beam
import sqlalchemy as sa
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    PortableOptions,
    StandardOptions,
)

from pipeline import pipeline as bms_pipeline
from pipeline import runners
from pipeline.cli import UsageError
from pipeline.io import progress, synapse
from pipeline.io.checkpoints import open_checkpoint_store
from pipeline.io.hub import checkpoint_scope
from pipeline.join import ROWS_PER_CATEGORY_NAMESPACE
from pipeline.options import BmsOptions
from pipeline.schema import BOOKING_HUB, DEAD_LETTER_TABLE, FACT_TABLE, PAYMENT_HUB

STREAMING_JOB_SERVER_TIMEOUT = 30 * 24 * 3600  # seconds: how long an unbounded run can last


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the pipeline: hubs -> join -> warehouse",
        description="Run the pipeline. With --bounded it reads what the hubs hold now on the "
        "in-process runner and stops; without, it runs unbounded on a streaming runner until "
        "Ctrl-C, which drains it (a second Ctrl-C cancels). Options it does not know "
        "(--runner, --flink_master, ...) go to Apache Beam.",
    )
    BmsOptions._add_argparse_args(parser)
    parser.set_defaults(func=run, beam_args_allowed=True)


def pipeline_options(args: argparse.Namespace) -> PipelineOptions:
    """Beam options from the parsed command line: our flags plus whatever Beam flags followed.

    Bounded runs default to the in-process FnApiRunner, named explicitly: "DirectRunner" would
    first try to download Prism from GitHub (and, where that works, run on it instead); unbounded
    runs default to Prism, built locally by scripts/setup-runners.
    """
    ours = {name: getattr(args, name) for name in _our_option_names()}
    runner = PipelineOptions(args.beam_args).view_as(StandardOptions).runner
    defaults: dict = {}
    if args.bounded:
        if runner is None:
            defaults = {"runner": "FnApiRunner"}
    else:
        # Portable runners give the job's state and message streams job_server_timeout as a
        # deadline (300 s by default): past it wait_until_finish fails and takes the job down.
        defaults = {"streaming": True, "job_server_timeout": STREAMING_JOB_SERVER_TIMEOUT}
        if runner is None:
            try:
                prism = runners.prism_binary()
            except runners.RunnerNotInstalled as error:
                raise UsageError(f"{error}; or use --bounded") from None
            defaults |= {
                "runner": "PrismRunner",
                "prism_location": prism,
                "environment_type": "LOOPBACK",
            }
    return PipelineOptions(args.beam_args, **defaults, **ours)


def _options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    BmsOptions._add_argparse_args(parser)
    return parser


def _our_option_names() -> list[str]:
    return [action.dest for action in _options_parser()._actions]


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    """``bms run``'s arguments as the command line would give them (for other commands)."""
    args, beam_args = _options_parser().parse_known_args(argv)
    args.beam_args = beam_args
    return args


def run_pipeline(options: PipelineOptions) -> beam.runners.runner.PipelineResult:
    """Builds and runs the job, waiting for it to finish.

    An unbounded job whose workers run in this process (``--environment_type=LOOPBACK``, the
    local default) drains on Ctrl-C (see ``pipeline.io.progress``): reading stops, open windows
    fire, rows are written and positions committed, then the job ends; a second Ctrl-C cancels
    it at once. Any other job is cancelled by Ctrl-C.
    """
    bms = options.view_as(BmsOptions)
    if synapse.is_odbc_target(bms.warehouse):
        if bms.checkpoints is not None and not synapse.parse_target(bms.warehouse).idempotent:
            raise UsageError(
                "--checkpoints resumes by reading the last join window again, which needs "
                "idempotent writes: remove idempotent=false from --warehouse"
            )
    else:
        try:
            sa.make_url(bms.warehouse)
        except sa.exc.ArgumentError:
            raise UsageError(
                f"--warehouse {bms.warehouse!r} is not a database URL; "
                "try sqlite:///path/to/warehouse.db"
            ) from None
    if bms.checkpoints is not None:
        try:  # a store that cannot be configured fails here, in one line, not on a worker
            open_checkpoint_store(bms.checkpoints, checkpoint_scope(bms.hub)).close()
        except ValueError as error:
            raise UsageError(str(error)) from None
    pipeline = beam.Pipeline(options=options)
    bms_pipeline.build(pipeline, bms)
    progress.reset_drain()
    result = pipeline.run()
    try:
        workers_here = options.view_as(PortableOptions).environment_type == "LOOPBACK"
        with _drain_on_interrupt(enabled=workers_here and not bms.bounded):
            result.wait_until_finish()
    except KeyboardInterrupt:
        result.cancel()
        raise
    return result


@contextlib.contextmanager
def _drain_on_interrupt(enabled: bool):
    """While inside, the first SIGINT requests a drain and the next raises KeyboardInterrupt."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum, frame):
        if progress.drain_requested():
            raise KeyboardInterrupt
        progress.request_drain()
        print(
            "bms run: draining: reading stops, open windows are written and positions "
            "committed; Ctrl-C again cancels at once",
            file=sys.stderr,
        )

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def counters(result: beam.runners.runner.PipelineResult) -> dict[tuple[str, str], int]:
    """The job's counters as {(namespace, name): value}, summed over steps."""
    totals: dict[tuple[str, str], int] = {}
    for counter in result.metrics().query()["counters"]:
        key = (counter.key.metric.namespace, counter.key.metric.name)
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[key] = totals.get(key, 0) + (value or 0)
    return totals


def summary(totals: Mapping[tuple[str, str], int], warehouse_url: str) -> str:
    """What a run did, and where to look at the result."""
    read = {
        BOOKING_HUB: totals.get(("bms", "booking_events"), 0),
        PAYMENT_HUB: totals.get(("bms", "payment_events"), 0),
    }
    categories = sorted(
        (name, value)
        for (namespace, name), value in totals.items()
        if namespace == ROWS_PER_CATEGORY_NAMESPACE
    )
    lines = [
        "events read: " + ", ".join(f"{hub} {count}" for hub, count in read.items()),
        f"dead letters: {totals.get(('bms', 'dead_letters_written'), 0)}"
        f" (table {DEAD_LETTER_TABLE})",
        f"fact rows written: {totals.get(('bms', 'facts_written'), 0)} (table {FACT_TABLE})",
        "rows per event_category: "
        + (", ".join(f"{name} {value}" for name, value in categories) or "none"),
    ]
    if synapse.is_odbc_target(warehouse_url) and not warehouse_url.startswith("mssql"):
        return "\n".join([*lines, "warehouse: the ODBC data source given with --warehouse"])
    url = sa.make_url(warehouse_url)
    if url.get_backend_name() == "sqlite" and url.database:
        lines += [
            f"warehouse: {url.database}",
            f'  query it: sqlite3 {url.database} "SELECT event_category, COUNT(*) '
            f'FROM {FACT_TABLE} GROUP BY event_category"',
        ]
    else:
        lines.append(f"warehouse: {url.render_as_string(hide_password=True)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    options = pipeline_options(args)
    result = run_pipeline(options)
    print(summary(counters(result), args.warehouse), file=sys.stdout)
    return 0
