"""``bms produce``: publish mock booking and payment events."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from pipeline.errors import UsageError
from pipeline.io.hub import DEFAULT_HUB_URL
from producers.eventhubs import PublishError
from producers.events import Shares
from producers.publish import DEFAULT_RATE, LocalHubPublisher, Publisher, produce


def _utc_datetime(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share is between 0 and 1, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "produce",
        help="publish mock booking and payment events",
        description="Publish mock booking and payment events (partition key = order_id). "
        "Runs until --count events are sent, or until Ctrl-C.",
    )
    parser.add_argument(
        "--to", choices=("local", "eventhubs"), default="local", help="where to publish"
    )
    parser.add_argument(
        "--hub",
        help=f"local hub file (default: {DEFAULT_HUB_URL}), or with --to eventhubs "
        "eventhubs://NAMESPACE.servicebus.windows.net (default: eventhubs://, which uses "
        "EVENTHUB_CONNECTION_STRING)",
    )
    parser.add_argument("--count", type=int, help="events to send (default: until Ctrl-C)")
    parser.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help="events per second (default: %(default)s, a booking and a payment every 5 s)",
    )
    parser.add_argument("--seed", type=int, help="random seed: the same seed, the same events")
    defaults = Shares()
    for name, help_text in (
        ("late", "share of orders paid more than 2 minutes after booking"),
        ("early", "share of orders whose payment is published before the booking"),
        ("failed", "share of orders with a failed payment followed by a retry"),
        ("malformed", "share of events with a malformed body"),
    ):
        parser.add_argument(
            f"--{name}-share",
            type=_share,
            default=getattr(defaults, name),
            help=f"{help_text} (default: %(default)s)",
        )
    parser.add_argument(
        "--simulate",
        nargs="?",
        const="now",
        metavar="START",
        help="do not wait: stamp events with enqueued times from a virtual clock starting at "
        "START (ISO 8601, default now) as if published at --rate",
    )
    parser.set_defaults(func=run)


def open_publisher(args: argparse.Namespace) -> Publisher:
    if args.to == "eventhubs":
        from producers.eventhubs import EventHubsPublisher

        return EventHubsPublisher.from_url(args.hub or "eventhubs://")
    from pipeline.io.localhub import LocalHub

    return LocalHubPublisher(LocalHub(args.hub or DEFAULT_HUB_URL))


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 0:
        raise UsageError("--count must be 0 or more")
    if args.rate <= 0:
        raise UsageError("--rate must be more than 0 events per second")
    simulate_from = None
    if args.to == "eventhubs" and args.simulate is not None:
        raise UsageError("Event Hubs stamps enqueued times itself: --simulate needs --to local")
    if args.simulate is not None:
        if args.simulate == "now":
            simulate_from = dt.datetime.now(dt.UTC)
        else:
            try:
                simulate_from = _utc_datetime(args.simulate)
            except argparse.ArgumentTypeError as error:
                raise UsageError(f"--simulate: {error}") from None
    try:
        shares = Shares(args.late_share, args.early_share, args.failed_share, args.malformed_share)
    except ValueError as error:
        raise UsageError(str(error)) from None
    publisher = open_publisher(args)
    try:
        produce(
            publisher,
            count=args.count,
            rate=args.rate,
            seed=args.seed,
            shares=shares,
            simulate_from=simulate_from,
            progress=sys.stderr,
        )
    except KeyboardInterrupt:
        print("stopped by Ctrl-C", file=sys.stderr)
    except PublishError as error:  # failed after its retries: throttled, offline, too large
        raise UsageError(str(error)) from None
    finally:
        publisher.close()
    return 0
