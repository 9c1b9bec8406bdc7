"""What a running job has done, while it runs: the live status line of ``bms run``.

Every ``interval`` seconds the line says how many events were read per hub (for a bounded run
also the share of the backlog known at start, with an ETA), rows newly written and already
present, dead letters, the event-time watermark and its lag behind the wall clock, and the
event time of the last committed position. On a terminal it is one line redrawn in place
(rich); otherwise a plain line every ``log_interval`` seconds, so logs stay readable.

It reads the counters of ``pipeline.metrics``, which workers in this process update: with
workers elsewhere (Dataflow) use the runner's own monitoring instead.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from pipeline import metrics
from pipeline.io.warehouses import DEAD_LETTERS, FACTS
from pipeline.schema import HUBS

__all__ = ["StatusLine", "describe"]


def _counts() -> dict[str, float]:
    counts = {hub: metrics.EVENTS_READ.value(hub=hub) for hub in HUBS}
    counts |= {
        "written": metrics.ROWS_WRITTEN.value(table=FACTS),
        "present": metrics.ROWS_ALREADY_PRESENT.value(table=FACTS),
        "dead": metrics.ROWS_WRITTEN.value(table=DEAD_LETTERS)
        + metrics.ROWS_ALREADY_PRESENT.value(table=DEAD_LETTERS),
        "retries": metrics.WRITE_RETRIES.value(),
    }
    return counts


def _clock(moment: float | None) -> str:
    if moment is None or moment < 0:  # none yet (a watermark at the beginning of time)
        return "-"
    when = dt.datetime.fromtimestamp(moment, dt.UTC)
    lag = time.time() - moment
    return f"{when:%H:%M:%S} (lag {lag:,.0f} s)"


def describe(
    counts: dict[str, float], elapsed: float, backlog: int | None, watermark, committed
) -> str:
    """The status line's text from counts since the job started."""
    read = sum(counts[hub] for hub in HUBS)
    parts = ["read " + ", ".join(f"{hub} {counts[hub]:,.0f}" for hub in HUBS)]
    if backlog:
        share = min(read / backlog, 1.0)
        eta = (elapsed / share - elapsed) if share > 0 else None
        parts[0] += f" ({share:.0%} of {backlog:,}" + (
            f", ETA {eta:,.0f} s)" if eta is not None and share < 1 else ")"
        )
    parts.append(f"rows {counts['written']:,.0f} new, {counts['present']:,.0f} already there")
    parts.append(f"dead letters {counts['dead']:,.0f}")
    if counts["retries"]:
        parts.append(f"warehouse retries {counts['retries']:,.0f}")
    parts.append(f"watermark {_clock(watermark)}")
    parts.append(f"committed up to {_clock(committed)}")
    return " | ".join(parts)


class StatusLine:
    """A context manager showing the status line while the job runs (see the module doc).

    Args:
      backlog: events a bounded run will read (known at start), for its share and ETA.
      stream: where to write (stderr: stdout keeps the summary for scripts).
      terminal: draw in place; default: whether ``stream`` is a terminal.
    """

    def __init__(
        self,
        backlog: int | None = None,
        *,
        interval: float = 2.0,
        log_interval: float = 30.0,
        stream: TextIO | None = None,
        terminal: bool | None = None,
    ):
        self._backlog = backlog
        self._stream = stream or sys.stderr
        self._terminal = self._stream.isatty() if terminal is None else terminal
        self._interval = interval if self._terminal else log_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bms-status", daemon=True)
        self.lines: list[str] = []  # what was shown, for tests

    def __enter__(self) -> StatusLine:
        metrics.reset_times()
        self._base = _counts()
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def text(self) -> str:
        now = _counts()
        since_start = {key: value - self._base[key] for key, value in now.items()}
        elapsed = time.monotonic() - self._started
        return describe(
            since_start, elapsed, self._backlog, metrics.watermark(), metrics.last_commit()
        )

    def _run(self) -> None:
        if not self._terminal:
            while not self._stop.wait(self._interval):
                self._show_plain()
            return
        console = Console(file=self._stream)
        with Live(Text(""), console=console, transient=True, auto_refresh=False) as live:
            while not self._stop.wait(self._interval):
                line = self.text()
                self.lines.append(line)
                live.update(Text(line, overflow="ellipsis", no_wrap=True), refresh=True)

    def _show_plain(self) -> None:
        line = self.text()
        self.lines.append(line)
        print(f"status: {line}", file=self._stream, flush=True)
