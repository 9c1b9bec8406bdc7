"""``bms demo``: produce -> local hub -> pipeline -> local warehouse, then a summary."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from pipeline.commands import run as run_command
from pipeline.errors import UsageError
from pipeline.io.hubs.local import LocalHub
from producers.events import Shares
from producers.publish import LocalHubPublisher, produce

DEMO_DIR = Path(".bms/demo")
DEMO_MALFORMED_SHARE = 0.002


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole job on embedded defaults, with a summary",
        description="Generate a realistic stream of bookings and payments into a fresh local hub, "
        "run the pipeline over it, write the fact rows into a fresh local warehouse and print a "
        "summary. Needs no Azure account.",
    )
    parser.add_argument(
        "--count", type=int, default=10_000, help="events to generate (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEMO_DIR,
        help="where the hub and warehouse files go; replaced on each run (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    args.dir.mkdir(parents=True, exist_ok=True)
    hub_path = args.dir / "hub.db"
    warehouse_path = args.dir / "warehouse.db"
    for stale in args.dir.glob("*.db*"):
        stale.unlink()
    print(f"producing {args.count} events into {hub_path} ...", file=sys.stderr)
    produce(
        LocalHubPublisher(LocalHub(hub_path)),
        count=args.count,
        seed=args.seed,
        shares=Shares(malformed=DEMO_MALFORMED_SHARE),
        simulate_until=dt.datetime.now(dt.UTC),
        progress=None,
    )
    print("running the pipeline (bounded) ...", file=sys.stderr)
    warehouse_url = f"sqlite:///{warehouse_path}"
    run_args = run_command.parse_run_args(
        ["--bounded", "--hub", str(hub_path), "--warehouse", warehouse_url]
    )
    options = run_command.pipeline_options(run_args)
    result = run_command.run_pipeline(options)
    print(run_command.summary(run_command.counters(result), warehouse_url))
    return 0
