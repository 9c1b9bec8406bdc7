"""Where the streaming runners' local parts are: the Prism binary. And a fix for Beam's
in-process runner's metrics.

``scripts/setup-runners`` builds or fetches them into ``$BMS_CACHE`` (default ``~/.cache/bms``);
environment variables override each location.
"""

from __future__ import annotations

import os
from pathlib import Path


class RunnerNotInstalled(RuntimeError):
    """A runner's local part is missing; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("BMS_CACHE", Path.home() / ".cache" / "bms"))


def prism_binary() -> str:
    """The Prism runner binary (built from Beam's Go module by scripts/setup-runners), which
    ``pipeline.prism`` starts for streaming runs."""
    path = Path(os.environ.get("PRISM_BIN", cache_dir() / "bin" / "prism"))
    if not path.is_file():
        raise RunnerNotInstalled(
            f"no Prism binary at {path}: run scripts/setup-runners prism (or set PRISM_BIN)"
        )
    return str(path)


def fold_fn_api_metrics_eagerly() -> None:
    """Makes Beam's in-process runner (FnApiRunner, Beam 2.77) fold each bundle's metrics into
    its stage's totals at once.

    It folds them with a lazy generator wrapped around the previous one, one level per bundle
    of a stage, so reading the metrics after N bundles recurses N deep: past the recursion
    limit (1,000, or 3,000 once IPython's jedi is imported) ``result.metrics()`` raises
    RecursionError. A bounded run with --checkpoints runs one bundle per commit (per 30 s of
    event time). Folded eagerly the depth stays 1, memory holds one list per stage instead of
    every bundle's metrics, and the metrics can be read more than once. Idempotent; does
    nothing if Beam no longer folds that way.
    """
    from apache_beam.metrics import monitoring_infos
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    if getattr(fn_runner, "consolidate_monitoring_infos", None) is not monitoring_infos.consolidate:
        return

    def consolidate_now(metrics, key=monitoring_infos.to_key):
        return list(monitoring_infos.consolidate(metrics, key))

    fn_runner.consolidate_monitoring_infos = consolidate_now
