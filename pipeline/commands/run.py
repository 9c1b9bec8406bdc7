"""``bms run``: the pipeline, bounded on the in-process runner or unbounded on a streaming one."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import sys
import threading
from collections.abc import Mapping

import apache_beam as beam
import prometheus_client
import sqlalchemy as sa
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    PortableOptions,
    StandardOptions,
)

from pipeline import metrics, runners
from pipeline import pipeline as bms_pipeline
from pipeline.errors import RuntimeFailure, UsageError
from pipeline.io.hubs import checkpoint_scope, missing_hub, open_hub, progress
from pipeline.io.hubs.checkpoints import open_checkpoint_store, resume_positions
from pipeline.io.hubs.lease import LeaseHeld, hold_lease
from pipeline.io.hubs.local import clock_ahead
from pipeline.io.hubs.positions import first_sequence_number
from pipeline.io.warehouses import (
    DEAD_LETTERS,
    FACTS,
    driver_hint,
    masked_url,
    open_writer,
    synapse,
)
from pipeline.io.warehouses.base import WarehouseError, describe_error
from pipeline.join import ROWS_PER_CATEGORY_NAMESPACE
from pipeline.options import BmsOptions, add_flag
from pipeline.schema import BOOKING_HUB, DEAD_LETTER_TABLE, FACT_TABLE, HUBS, PAYMENT_HUB
from pipeline.status import StatusLine

_LOG = logging.getLogger("bms")
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
    add_flag(
        parser,
        "--output",
        choices=("text", "json"),
        default="text",
        help="the summary at the end: text (default) or json, for scripts and CI gates",
    )
    parser.set_defaults(func=run, beam_args_allowed=True)


def pipeline_options(args: argparse.Namespace) -> PipelineOptions:
    """Beam options from the parsed command line: our flags plus whatever Beam flags followed.

    Bounded runs default to the in-process FnApiRunner, named explicitly: "DirectRunner" would
    first try to download Prism from GitHub (and, where that works, run on it instead); unbounded
    runs default to Prism, built locally by scripts/setup-runners, started by bms the way a
    terminal needs it (``pipeline.prism``: Ctrl-C reaches bms alone, which drains the job).
    """
    ours = {name: getattr(args, name) for name in _our_option_names()}
    beam_options = PipelineOptions(args.beam_args)
    runner = beam_options.view_as(StandardOptions).runner
    if (
        runner is not None
        and "Dataflow" in runner
        and synapse.is_odbc_target(args.warehouse)
        and not beam_options.get_all_options()["sdk_container_image"]
    ):
        raise UsageError(
            "a Synapse warehouse on Dataflow needs workers with Microsoft's ODBC driver: build "
            "deploy/dataflow/worker.Dockerfile and pass --sdk_container_image=IMAGE"
        )
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
                "runner": "pipeline.prism.PrismRunner",
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


def run_pipeline(
    options: PipelineOptions, status: bool = True
) -> beam.runners.runner.PipelineResult:
    """Builds and runs the job, waiting for it to finish.

    An unbounded job whose workers run in this process (``--environment_type=LOOPBACK``, the
    local default) drains on Ctrl-C (see ``pipeline.io.hubs.progress``): reading stops, open windows
    fire, rows are written and positions committed, then the job ends; a second Ctrl-C cancels
    it at once. Any other job is cancelled by Ctrl-C.
    """
    bms = options.view_as(BmsOptions)
    _check_hub(bms.hub)
    if not bms.bounded:
        ahead = clock_ahead(bms.hub)
        if ahead is not None:
            _LOG.warning("%s", ahead)
    _check_warehouse(bms.warehouse)
    if bms.checkpoints is None:
        return _run_job(options, bms, status)
    _check_checkpoints(bms.checkpoints, bms.hub)
    lost = threading.Event()

    def lease_lost(reason: str) -> None:
        lost.set()
        progress.request_drain()

    try:
        with hold_lease(
            bms.checkpoints, checkpoint_scope(bms.hub), wait=bms.wait_for_lease, on_lost=lease_lost
        ):
            result = _run_job(options, bms, status)
    except LeaseHeld as error:
        raise UsageError(str(error)) from None
    except PermissionError as error:
        raise UsageError(
            f"--checkpoints {bms.checkpoints} cannot be written ({error.strerror}: "
            f"{error.filename}): choose a folder you may write to"
        ) from None
    if lost.is_set():
        raise RuntimeFailure(
            f"lost the lease on checkpoints {bms.checkpoints} while running, so the job was "
            "drained: another job may have taken them over"
        )
    return result


def _check_hub(url: str) -> None:
    """The hubs must be there and readable: a local hub must exist (a typo must not read an
    empty new one), Event Hubs must answer; an empty hub is worth a warning."""
    problem = missing_hub(url)
    if problem is not None:
        raise UsageError(problem)
    try:
        with contextlib.closing(open_hub(url)) as client:
            empty = all(
                client.partition_properties(hub, partition).last_sequence_number < 0
                for hub in HUBS
                for partition in client.partition_ids(hub)
            )
    except (ValueError, UsageError) as error:  # a URL or credentials that cannot work
        raise UsageError(f"--hub {url}: {error}") from None
    except Exception as error:  # unreachable (DNS, network, refused credentials)
        where = checkpoint_scope(url).namespace if url.startswith("eventhubs://") else url
        raise RuntimeFailure(f"cannot read the hubs at {where}: {describe_error(error)}") from None
    if empty:
        _LOG.warning("hub %s holds no events yet", url)


def _check_checkpoints(location: str, hub_url: str) -> None:
    """A checkpoint store that cannot be configured or read fails here, in one line."""
    try:
        with contextlib.closing(
            open_checkpoint_store(location, checkpoint_scope(hub_url))
        ) as store:
            for hub in HUBS:
                store.last_processed(hub)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _check_warehouse(url: str) -> None:
    """Fails in one line, at launch rather than on a worker, when the warehouse cannot be
    used: a URL no writer takes, a driver not installed, a database not reachable, a table
    that cannot enforce row identity. Creates the tables where the writer may."""
    try:
        writers = [open_writer(url, target) for target in (FACTS, DEAD_LETTERS)]
    except sa.exc.ArgumentError:
        raise UsageError(
            f"--warehouse {url!r} is not a database URL; try sqlite:///path/to/warehouse.db"
        ) from None
    except ValueError as error:
        raise UsageError(f"--warehouse: {error}") from None
    except (ImportError, sa.exc.NoSuchModuleError):
        raise UsageError(_missing_driver(url)) from None
    for writer in writers:
        try:
            writer.prepare()
        except WarehouseError as error:
            raise UsageError(str(error)) from None
        except (ImportError, sa.exc.NoSuchModuleError):
            raise UsageError(_missing_driver(url)) from None
        except Exception as error:
            raise RuntimeFailure(
                f"cannot reach the warehouse {writer.description}: {describe_error(error)}"
            ) from None
        finally:
            writer.close()


def _missing_driver(url: str) -> str:
    return (
        f"--warehouse {masked_url(url)}: its database driver is not installed; {driver_hint(url)}"
    )


@contextlib.contextmanager
def _watching(bms: BmsOptions, status: bool):
    """While the job runs: the Prometheus endpoint (--metrics-port, on 127.0.0.1 only) and the
    live status line (unless -q)."""
    with contextlib.ExitStack() as stack:
        if bms.metrics_port is not None:
            try:
                server, _ = prometheus_client.start_http_server(
                    bms.metrics_port, addr="127.0.0.1", registry=metrics.REGISTRY
                )
            except OSError as error:
                raise UsageError(
                    f"--metrics-port {bms.metrics_port}: {error.strerror}; choose another port"
                ) from None
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
        if status:
            stack.enter_context(StatusLine(_backlog(bms) if bms.bounded else None))
        yield


def _backlog(bms: BmsOptions) -> int | None:
    """How many events a bounded run will read: from where each partition starts (its
    checkpoint, or --start) to its last event now."""
    resume = {}
    if bms.checkpoints is not None:
        store = open_checkpoint_store(bms.checkpoints, checkpoint_scope(bms.hub))
        with contextlib.closing(store):
            resume = {hub: resume_positions(store, hub) for hub in HUBS}
    total = 0
    with contextlib.closing(open_hub(bms.hub)) as client:
        for hub in HUBS:
            for partition in client.partition_ids(hub):
                first = first_sequence_number(
                    client, hub, partition, bms.start, resume.get(hub, {}).get(partition)
                )
                last = client.partition_properties(hub, partition).last_sequence_number
                total += max(0, last + 1 - first)
    return total


def _run_job(
    options: PipelineOptions, bms: BmsOptions, status: bool = True
) -> beam.runners.runner.PipelineResult:
    pipeline = beam.Pipeline(options=options)
    bms_pipeline.build(pipeline, bms)
    progress.reset_drain()
    runners.fold_fn_api_metrics_eagerly()  # else counters() recurses once per bundle
    try:
        with _watching(bms, status):
            result = pipeline.run()
            try:
                workers_here = options.view_as(PortableOptions).environment_type == "LOOPBACK"
                with _drain_on_interrupt(enabled=workers_here and not bms.bounded):
                    result.wait_until_finish()
            except KeyboardInterrupt:
                result.cancel()
                raise
    except Exception as error:
        cause = _warehouse_failure(error)
        if cause is None:
            raise
        raise RuntimeFailure(cause) from error
    finally:
        progress.resume_reading()
    return result


_WAREHOUSE_FAILURE = re.compile(r"(?:WarehouseUnavailable|WarehouseWriteError): (.+)")
_STEP_SUFFIX = re.compile(r" \[while running '[^']*'\]")


def _warehouse_failure(error: Exception) -> str | None:
    """The one-line cause of a job that failed because the warehouse did, or None. Workers in
    this process raise the error itself; portable runners report a worker's error as text."""
    if isinstance(error, WarehouseError):
        message = str(error)
    else:
        causes = _WAREHOUSE_FAILURE.findall(str(error))
        if not causes:
            return None
        message = causes[-1]
    return _STEP_SUFFIX.sub("", message.splitlines()[0]).strip()


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


def summary_counts(totals: Mapping[tuple[str, str], int], warehouse_url: str) -> dict:
    """What a run did, as numbers (``bms run --output json``)."""

    def count(name: str) -> int:
        return totals.get(("bms", name), 0)

    return {
        "events_read": {BOOKING_HUB: count("booking_events"), PAYMENT_HUB: count("payment_events")},
        "fact_rows": {
            "computed": count("facts_received"),
            "newly_written": count("facts_written"),
            "already_present": count("facts_already_present"),
            "unstorable": count("facts_unstorable"),
        },
        "dead_letters": {
            "total": count("dead_letters_received"),
            "newly_written": count("dead_letters_written"),
        },
        "rows_per_event_category": dict(
            sorted(
                (name, value)
                for (namespace, name), value in totals.items()
                if namespace == ROWS_PER_CATEGORY_NAMESPACE
            )
        ),
        "warehouse_write_retries": count("warehouse_write_retries"),
        "positions_committed": count("positions_committed"),
        "warehouse": masked_url(warehouse_url),
    }


def summary(totals: Mapping[tuple[str, str], int], warehouse_url: str) -> str:
    """What a run did, and where to look at the result."""
    counts = summary_counts(totals, warehouse_url)
    facts, letters = counts["fact_rows"], counts["dead_letters"]
    lines = [
        "events read: " + ", ".join(f"{hub} {n}" for hub, n in counts["events_read"].items()),
        f"fact rows: {facts['computed']} computed, {facts['newly_written']} newly written, "
        f"{facts['already_present']} already present"
        + (f", {facts['unstorable']} unstorable" if facts["unstorable"] else "")
        + f" (table {FACT_TABLE})",
        f"dead letters: {letters['total']} ({letters['newly_written']} newly written; "
        f"table {DEAD_LETTER_TABLE})",
        "rows per event_category: "
        + (
            ", ".join(f"{name} {n}" for name, n in counts["rows_per_event_category"].items())
            or "none"
        ),
    ]
    if counts["warehouse_write_retries"]:
        lines.append(f"warehouse write retries: {counts['warehouse_write_retries']}")
    url = sa.make_url(warehouse_url) if not synapse.is_odbc_target(warehouse_url) else None
    if url is not None and url.get_backend_name() == "sqlite" and url.database:
        lines += [
            f"warehouse: {url.database}",
            f'  query it: sqlite3 {url.database} "SELECT event_category, COUNT(*) '
            f'FROM {FACT_TABLE} GROUP BY event_category"',
        ]
    else:
        lines.append(f"warehouse: {counts['warehouse']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    options = pipeline_options(args)
    result = run_pipeline(options, status=args.verbosity >= 0)
    totals = counters(result)
    if args.output == "json":
        print(json.dumps(summary_counts(totals, args.warehouse), indent=2))
    else:
        print(summary(totals, args.warehouse))
    return 0
