"""``bms status``: where a job stands, running or stopped, from its hub, warehouse and checkpoints.

For every partition: the events the hub holds, the last committed position, where a job would
resume and the backlog from there; the rows in the warehouse; and whether a job holds the
checkpoints' lease (and which). Works for local and Azure URLs alike, through the same adapters
``bms run`` uses.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
from typing import Any

import sqlalchemy as sa

from pipeline.errors import RuntimeFailure, UsageError
from pipeline.io.hubs import checkpoint_scope, missing_hub, open_hub
from pipeline.io.hubs.checkpoints import open_checkpoint_store
from pipeline.io.hubs.lease import LeaseHeld, hold_lease
from pipeline.io.warehouses import masked_url, read_dead_letters, synapse
from pipeline.io.warehouses.sqldb import create_engine, warehouse_tables
from pipeline.options import (
    CHECKPOINTS_ENV,
    add_flag,
    add_hub_flag,
    add_warehouse_flag,
    env_default,
    shown,
)
from pipeline.schema import HUBS, micros_to_datetime


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="where a job stands: read, written, committed, backlog, lease",
        description="Show what a running or stopped job has read, written and committed, where "
        "it would resume, the backlog per partition, and whether a job holds the checkpoints.",
    )
    checkpoints = env_default(CHECKPOINTS_ENV, None)
    add_hub_flag(parser)
    add_warehouse_flag(parser)
    add_flag(
        parser,
        "--checkpoints",
        default=checkpoints,
        help=f"default: {shown(checkpoints) if checkpoints else 'none'}; env {CHECKPOINTS_ENV}",
    )
    add_flag(parser, "--output", choices=("text", "json"), default="text", help="default: text")
    parser.set_defaults(func=run)


def _time(micros: int | None) -> str | None:
    return None if micros is None else micros_to_datetime(micros).isoformat() + "Z"


def _partitions(hub_url: str, committed: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    rows = []
    with contextlib.closing(open_hub(hub_url)) as client:
        for hub in HUBS:
            for partition in client.partition_ids(hub):
                properties = client.partition_properties(hub, partition)
                last_committed = committed.get(hub, {}).get(partition)
                resume_at = properties.first_sequence_number
                if last_committed is not None:
                    resume_at = max(resume_at, last_committed + 1)
                rows.append(
                    {
                        "hub": hub,
                        "partition": partition,
                        "first_sequence_number": properties.first_sequence_number,
                        "last_sequence_number": properties.last_sequence_number,
                        "last_enqueued_time": _time(properties.last_enqueued_time),
                        "committed": last_committed,
                        "resumes_at": resume_at,
                        "backlog": max(0, properties.last_sequence_number + 1 - resume_at),
                    }
                )
    return rows


def _warehouse(url: str) -> dict[str, Any]:
    if synapse.is_odbc_target(url) and not url.startswith("mssql"):
        raise UsageError("bms status counts rows through a mssql+pyodbc:// URL, not an ODBC string")
    engine = create_engine(url)
    try:
        facts, dead_letters = warehouse_tables(engine)
        with engine.connect() as connection:
            rows = connection.execute(sa.select(sa.func.count()).select_from(facts)).scalar()
        letters = read_dead_letters(url)
    except sa.exc.NoSuchTableError:
        return {"url": masked_url(url), "fact_rows": 0, "dead_letters": 0, "unstorable_rows": 0}
    except sa.exc.DBAPIError as error:
        if "no such table" in str(error.orig) or "does not exist" in str(error.orig):
            return {"url": masked_url(url), "fact_rows": 0, "dead_letters": 0, "unstorable_rows": 0}
        raise RuntimeFailure(f"cannot read the warehouse {masked_url(url)}: {error.orig}") from None
    finally:
        engine.dispose()
    unstorable = sum(letter.is_fact_row for letter in letters)
    return {
        "url": masked_url(url),
        "fact_rows": rows,
        "dead_letters": len(letters) - unstorable,
        "unstorable_rows": unstorable,
    }


def _lease(location: str, hub_url: str) -> dict[str, Any]:
    """Whether a job holds the checkpoints: found by trying to claim them for an instant."""
    try:
        with hold_lease(location, checkpoint_scope(hub_url)):
            return {"held": False}
    except LeaseHeld as held:
        owner = held.owner
        return {"held": True, **(owner._asdict() if owner else {})}


def status(args: argparse.Namespace) -> dict[str, Any]:
    problem = missing_hub(args.hub)
    if problem is not None:
        raise UsageError(problem)
    committed: dict[str, dict[str, int]] = {}
    report: dict[str, Any] = {"hub": args.hub, "checkpoints": args.checkpoints}
    if args.checkpoints is not None:
        try:
            store = open_checkpoint_store(args.checkpoints, checkpoint_scope(args.hub))
            with contextlib.closing(store):
                committed = {hub: store.last_processed(hub) for hub in HUBS}
        except ValueError as error:
            raise UsageError(str(error)) from None
        report["lease"] = _lease(args.checkpoints, args.hub)
    report["partitions"] = _partitions(args.hub, committed)
    report["warehouse"] = _warehouse(args.warehouse)
    report["at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"hub {report['hub']}"]
    for row in report["partitions"]:
        held = row["last_sequence_number"] - row["first_sequence_number"] + 1
        committed = "none" if row["committed"] is None else row["committed"]
        lines.append(
            f"  {row['hub']} partition {row['partition']}: {max(held, 0):,} events "
            f"(last enqueued {row['last_enqueued_time'] or '-'}), committed {committed}, "
            f"resumes at {row['resumes_at']}, backlog {row['backlog']:,}"
        )
    lines.append(f"backlog: {sum(row['backlog'] for row in report['partitions']):,} events")
    warehouse = report["warehouse"]
    lines.append(
        f"warehouse {warehouse['url']}: {warehouse['fact_rows']:,} fact rows, "
        f"{warehouse['dead_letters']:,} dead letters, {warehouse['unstorable_rows']:,} "
        "unstorable rows"
    )
    if report["checkpoints"] is None:
        lines.append("checkpoints: none (give --checkpoints to see commits and the lease)")
    else:
        lease = report["lease"]
        holder = (
            f"held by pid {lease.get('pid')} on host {lease.get('host')} since {lease.get('since')}"
            if lease["held"]
            else "no job holds them"
        )
        lines.append(f"checkpoints {report['checkpoints']}: {holder}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = status(args)
    print(json.dumps(report, indent=2) if args.output == "json" else render(report))
    return 0
