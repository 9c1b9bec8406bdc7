"""Runs bench/sql/flink_interval_join.sql on PyFlink: the benchmark's peer (Flink SQL's join).

    PYFLINK_PYTHON bench/flink_job.py --mode streaming|batch --bookings FILE --payments FILE
        --output DIR --checkpoints DIR [--parallelism 2]

Runs in the PyFlink virtual environment that bench/flink.py makes (apache-flink pins an older
apache-beam than the project's), so it imports nothing but PyFlink and the standard library.
Flink runs in its local mini-cluster, inside the JVM that PyFlink starts; the fact rows go to
CSV files in ``--output`` (the harness counts them). Streaming mode checkpoints every
``CHECKPOINT_INTERVAL`` into files in ``--checkpoints`` (the default, the JobManager's memory,
refuses state over 5 MB, and the join's state is larger): the file sink publishes its files on
checkpoints, the last one when the bounded input ends. A failure ends the job (no restarts): a
benchmark run that needed one would not measure the same thing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyflink.table import EnvironmentSettings, TableEnvironment

QUERY = Path(__file__).with_name("sql") / "flink_interval_join.sql"
CHECKPOINT_INTERVAL = "5 s"


def statements(bookings: str, payments: str, output: str) -> list[str]:
    """The query file's statements with the paths filled in, comment lines left out."""
    text = "\n".join(
        line for line in QUERY.read_text().splitlines() if not line.lstrip().startswith("--")
    )
    text = text.replace("{bookings}", bookings).replace("{payments}", payments)
    text = text.replace("{output}", output)
    return [statement.strip() for statement in text.split(";\n") if statement.strip(" \n;")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("streaming", "batch"), required=True)
    parser.add_argument("--bookings", required=True)
    parser.add_argument("--payments", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--parallelism", type=int, default=2)
    args = parser.parse_args()
    settings = (
        EnvironmentSettings.in_streaming_mode()
        if args.mode == "streaming"
        else EnvironmentSettings.in_batch_mode()
    )
    table_env = TableEnvironment.create(settings)
    config = table_env.get_config()
    config.set("parallelism.default", str(args.parallelism))
    config.set("table.local-time-zone", "UTC")
    config.set("restart-strategy.type", "none")
    if args.mode == "streaming":
        config.set("execution.checkpointing.interval", CHECKPOINT_INTERVAL)
        config.set("execution.checkpointing.storage", "filesystem")
        config.set("execution.checkpointing.dir", Path(args.checkpoints).resolve().as_uri())
    *definitions, insert = statements(args.bookings, args.payments, args.output)
    for statement in definitions:
        table_env.execute_sql(statement)
    table_env.execute_sql(insert).wait()


if __name__ == "__main__":
    main()
