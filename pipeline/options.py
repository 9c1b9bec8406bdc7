"""The pipeline's own options, parsed with Beam's (so ``--runner`` and friends pass through)."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.event_time import (
    DEFAULT_LATE_ARRIVAL_TOLERANCE_SECONDS,
    ENQUEUED,
    PAYLOAD,
    POLICIES,
)
from pipeline.io.hub import DEFAULT_HUB_URL
from pipeline.io.positions import StartPosition
from pipeline.io.warehouses import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_RETRY_DEADLINE_SECONDS,
    DEFAULT_WAREHOUSE_URL,
)
from pipeline.join import BOUNDED_PERIOD_SECONDS, DEFAULT_PERIOD_SECONDS


class BmsOptions(PipelineOptions):
    """Where events come from, where rows go, and how the join windows."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--hub",
            default=DEFAULT_HUB_URL,
            help="where the event hubs are: a local hub file, or eventhubs://NAMESPACE "
            "(default: %(default)s)",
        )
        parser.add_argument(
            "--warehouse",
            default=DEFAULT_WAREHOUSE_URL,
            help="SQLAlchemy URL of the warehouse to write to (default: %(default)s)",
        )
        parser.add_argument(
            "--bounded",
            action="store_true",
            help="read what the hubs hold now, write the result and stop",
        )
        parser.add_argument(
            "--start",
            type=StartPosition.parse,
            default=StartPosition.earliest(),
            help="where to start reading each partition: earliest (default), latest, an ISO 8601 "
            "enqueued time, or partition:sequence pairs such as 0:120,1:97",
        )
        parser.add_argument(
            "--checkpoints",
            default=None,
            help="where to keep read positions, committed once their rows are written: a folder, "
            "https://ACCOUNT.blob.core.windows.net/CONTAINER or blob:CONTAINER; a rerun resumes "
            "from them; one job at a time holds them (default: none, start from --start)",
        )
        parser.add_argument(
            "--wait_for_lease",
            "--wait-for-lease",
            action="store_true",
            help="if another job holds --checkpoints, wait for it to end instead of refusing to "
            "start",
        )
        parser.add_argument(
            "--event_time",
            choices=POLICIES,
            default=ENQUEUED,
            help="the time events are joined at: enqueued (the hub's, as the ASA job without "
            "TIMESTAMP BY; default) or payload (booking_time / payment_time, as TIMESTAMP BY)",
        )
        parser.add_argument(
            "--late_arrival_tolerance",
            type=float,
            default=DEFAULT_LATE_ARRIVAL_TOLERANCE_SECONDS,
            help="with --event_time payload: seconds a payload time may lie before its enqueued "
            "time; earlier ones are adjusted to it, as ASA does (default: %(default)s)",
        )
        parser.add_argument(
            "--window_period",
            type=float,
            default=None,
            help="seconds between the starts of the join's sliding windows; shorter means "
            f"earlier output when streaming, more work per event (default: "
            f"{DEFAULT_PERIOD_SECONDS:g}, or {BOUNDED_PERIOD_SECONDS:g} with --bounded)",
        )
        parser.add_argument(
            "--write_batch_size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help="rows per warehouse insert batch (default: %(default)s)",
        )
        parser.add_argument(
            "--write_retry_deadline",
            type=float,
            default=DEFAULT_RETRY_DEADLINE_SECONDS,
            help="seconds to wait out an unreachable or locked warehouse, retrying with backoff "
            "while reading pauses, before the job stops (default: %(default)g)",
        )
        parser.add_argument(
            "--read_batch_size",
            type=int,
            default=1000,
            help="events per hub read call (default: %(default)s)",
        )

    def watermark_delay(self) -> float:
        """Seconds the source's watermark trails the enqueued times: events are never late."""
        return self.late_arrival_tolerance if self.event_time == PAYLOAD else 0.0

    def join_period(self) -> float:
        """The window period to use: the one given, else the default for the run's mode."""
        if self.window_period is not None:
            return self.window_period
        return BOUNDED_PERIOD_SECONDS if self.bounded else DEFAULT_PERIOD_SECONDS
