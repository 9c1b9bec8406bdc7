"""The pipeline's own options, parsed with Beam's (so ``--runner`` and friends pass through).

Flags are kebab-case like every other bms command (``--window-period``); Beam's snake_case
spelling (``--window_period``, also the Dataflow template's parameter names) is accepted as a
hidden alias. ``--hub``, ``--warehouse`` and ``--checkpoints`` default to the environment
variables ``BMS_HUB``, ``BMS_WAREHOUSE`` and ``BMS_CHECKPOINTS`` when set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os

import sqlalchemy as sa
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import rules
from pipeline.errors import UsageError
from pipeline.event_time import (
    DEFAULT_LATE_ARRIVAL_TOLERANCE_SECONDS,
    ENQUEUED,
    PAYLOAD,
    POLICIES,
)
from pipeline.io.hubs import DEFAULT_HUB_URL
from pipeline.io.hubs.positions import StartPosition
from pipeline.io.warehouses import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_RETRY_DEADLINE_SECONDS,
    DEFAULT_STAGING_BATCH_SECONDS,
    DEFAULT_STAGING_BATCH_SIZE,
    DEFAULT_WAREHOUSE_URL,
)
from pipeline.join import DEFAULT_PERIOD_SECONDS

#: The join modes (``--join``): sliding windows and CoGroupByKey (``pipeline.join``), or pairs
#: emitted as soon as their second row arrives (``pipeline.interval_join``).
WINDOWED_JOIN = "windowed"
INTERVAL_JOIN = "interval"
JOIN_MODES = (WINDOWED_JOIN, INTERVAL_JOIN)
#: What an unbounded run joins with unless told (bounded runs: the windowed join's global window).
DEFAULT_STREAMING_JOIN = INTERVAL_JOIN

HUB_ENV = "BMS_HUB"
WAREHOUSE_ENV = "BMS_WAREHOUSE"
CHECKPOINTS_ENV = "BMS_CHECKPOINTS"


def env_default(variable: str, default: str | None) -> str | None:
    """An option's default: the environment variable when set, else ``default``."""
    return os.environ.get(variable) or default


def shown(url: str | None) -> str:
    """A default as --help shows it: never a password."""
    if url is None or "://" not in url:
        return str(url)
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url.split("@")[-1]


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """``--kebab-case`` in help, with ``--snake_case`` accepted as a hidden alias."""
    dest = name.lstrip("-").replace("-", "_")
    parser.add_argument("--" + dest.replace("_", "-"), dest=dest, **kwargs)
    if "_" in dest:
        hidden = {key: value for key, value in kwargs.items() if key != "help"}
        parser.add_argument("--" + dest, dest=dest, help=argparse.SUPPRESS, **hidden)


def add_hub_flag(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """``--hub``, the same for every command: where the event hubs are."""
    hub = env_default(HUB_ENV, DEFAULT_HUB_URL)
    add_flag(
        parser,
        "--hub",
        default=hub,
        help=f"{purpose}where the event hubs are: a local hub file, or eventhubs://NAMESPACE "
        f"(default: {shown(hub)}; env {HUB_ENV})",
    )


def add_warehouse_flag(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """``--warehouse``, the same for every command."""
    warehouse = env_default(WAREHOUSE_ENV, DEFAULT_WAREHOUSE_URL)
    add_flag(
        parser,
        "--warehouse",
        default=warehouse,
        help=f"{purpose}the warehouse: sqlite:///FILE, postgresql+psycopg://..., "
        f"mssql+pyodbc://SERVER/DB or an ODBC string (default: {shown(warehouse)}; "
        f"env {WAREHOUSE_ENV})",
    )


def add_time_range_flags(parser: argparse.ArgumentParser) -> None:
    """``--from``/``--to`` on booking_event_time, parsed with ``time_flag``."""
    parser.add_argument(
        "--from", dest="start", metavar="TIME", help="only rows with booking_event_time >= TIME"
    )
    parser.add_argument(
        "--to", dest="end", metavar="TIME", help="only rows with booking_event_time < TIME"
    )


def time_flag(text: str | None, flag: str) -> dt.datetime | None:
    """An ISO 8601 time given to ``flag`` (as TRY_CAST reads it: UTC without an offset)."""
    if text is None:
        return None
    moment = rules.try_cast_datetime(text)
    if moment is None:
        raise UsageError(f"{flag} {text!r} is not an ISO 8601 time")
    return moment


class BmsOptions(PipelineOptions):
    """Where events come from, where rows go, and how the join windows."""

    @classmethod
    def _add_argparse_args(cls, parser):
        checkpoints = env_default(CHECKPOINTS_ENV, None)
        add_hub_flag(parser)
        add_warehouse_flag(parser, "where rows go: ")
        add_flag(
            parser,
            "--bounded",
            action="store_true",
            help="read what the hubs hold now, write the result and stop",
        )
        add_flag(
            parser,
            "--start",
            type=StartPosition.parse,
            default=StartPosition.earliest(),
            help="where to start reading each partition: earliest (default), latest, an ISO 8601 "
            "enqueued time, or partition:sequence pairs such as 0:120,1:97",
        )
        add_flag(
            parser,
            "--checkpoints",
            default=checkpoints,
            help="where to keep read positions, committed once their rows are written: a folder, "
            "https://ACCOUNT.blob.core.windows.net/CONTAINER or blob:CONTAINER; a rerun resumes "
            "from them; one job at a time holds them (default: "
            f"{shown(checkpoints) if checkpoints else 'none, start from --start'}; "
            f"env {CHECKPOINTS_ENV})",
        )
        add_flag(
            parser,
            "--wait_for_lease",
            action="store_true",
            help="if another job holds --checkpoints, wait for it to end instead of refusing to "
            "start",
        )
        add_flag(
            parser,
            "--event_time",
            choices=POLICIES,
            default=ENQUEUED,
            help="the time events are joined at: enqueued (the hub's, as the ASA job without "
            "TIMESTAMP BY; default) or payload (booking_time / payment_time, as TIMESTAMP BY)",
        )
        add_flag(
            parser,
            "--late_arrival_tolerance",
            type=float,
            default=DEFAULT_LATE_ARRIVAL_TOLERANCE_SECONDS,
            help="with --event-time payload: seconds a payload time may lie before its enqueued "
            "time; earlier ones are adjusted to it, as ASA does (default: %(default)s)",
        )
        add_flag(
            parser,
            "--join",
            choices=JOIN_MODES,
            default=None,
            help="interval: write each pair as soon as its second event is read; windowed: when "
            "the sliding window of its booking closes, 2 to 2.5 min later (default: "
            f"{DEFAULT_STREAMING_JOIN}; with --bounded {WINDOWED_JOIN}). Both write the same rows",
        )
        add_flag(
            parser,
            "--window_period",
            type=float,
            default=None,
            help="seconds between the starts of the join's sliding windows; shorter means "
            f"earlier output when streaming, more work per event (default: "
            f"{DEFAULT_PERIOD_SECONDS:g}; with --bounded none: the global window)",
        )
        add_flag(
            parser,
            "--write_batch_size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help="rows per warehouse insert batch (default: %(default)s)",
        )
        add_flag(
            parser,
            "--write_batch_seconds",
            type=float,
            default=None,
            help="keep rows across bundles until a batch is full or this many seconds passed "
            "(default: 0, a batch ends with each bundle; "
            f"{DEFAULT_STAGING_BATCH_SECONDS:g} with --staging)",
        )
        add_flag(
            parser,
            "--staging",
            default=None,
            help="load a Synapse dedicated pool through Parquet files and COPY INTO, for volume: "
            "a blob container, https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX] (the "
            "pool reads it with its managed identity) or blob:CONTAINER[/PREFIX] (with "
            "AZURE_STORAGE_CONNECTION_STRING); see docs/synapse.md (default: insert rows)",
        )
        add_flag(
            parser,
            "--staging_batch_rows",
            type=int,
            default=DEFAULT_STAGING_BATCH_SIZE,
            help="with --staging, rows per Parquet file and COPY INTO (default: %(default)s)",
        )
        add_flag(
            parser,
            "--write_retry_deadline",
            type=float,
            default=DEFAULT_RETRY_DEADLINE_SECONDS,
            help="seconds to wait out an unreachable or locked warehouse, retrying with backoff "
            "while reading pauses, before the job stops (default: %(default)g)",
        )
        add_flag(
            parser,
            "--metrics_port",
            type=int,
            default=None,
            help="serve the job's metrics for Prometheus at http://127.0.0.1:PORT/metrics while "
            "it runs (workers in this process: the local runners)",
        )
        add_flag(
            parser,
            "--read_batch_size",
            type=int,
            default=1000,
            help="events per hub read call (default: %(default)s)",
        )

    def watermark_delay(self) -> float:
        """Seconds the source's watermark trails the enqueued times: events are never late."""
        return self.late_arrival_tolerance if self.event_time == PAYLOAD else 0.0

    def join_mode(self) -> str:
        """The join to use: the one given, else the default for the run's mode."""
        if self.join is not None:
            return self.join
        return WINDOWED_JOIN if self.bounded else DEFAULT_STREAMING_JOIN

    def join_period(self) -> float | None:
        """The window period to use: the one given, else the default for the run's mode (None
        for bounded runs: the global window, see ``pipeline.join``)."""
        if self.window_period is not None:
            return self.window_period
        return None if self.bounded else DEFAULT_PERIOD_SECONDS
