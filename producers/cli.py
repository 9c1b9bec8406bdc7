"""``bms produce``: publish mock booking and payment events."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from pipeline.errors import UsageError
from pipeline.io.hubs import DEFAULT_HUB_URL
from pipeline.io.hubs.local import FUTURE_TOLERANCE_S, describe_duration
from producers.eventhubs import PublishError
from producers.events import Shares, isoformat_utc
from producers.publish import (
    DEFAULT_RATE,
    LocalHubPublisher,
    Publisher,
    new_seed,
    produce,
    simulated_span,
)


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
        help="do not wait: publish --count events at once, stamped with enqueued times from a "
        "virtual clock as if published at --rate. Without START the history is back-dated to end "
        "now; with START (ISO 8601) it begins there, and must end by now unless --allow-future",
    )
    parser.add_argument(
        "--allow-future",
        action="store_true",
        help="let --simulate START publish a history that ends in the future (a streaming job "
        "writes its rows only once that time has come)",
    )
    parser.set_defaults(func=run)


def open_publisher(args: argparse.Namespace) -> Publisher:
    if args.to == "eventhubs":
        from producers.eventhubs import EventHubsPublisher

        return EventHubsPublisher.from_url(args.hub or "eventhubs://", report=sys.stderr)
    from pipeline.io.hubs.local import LocalHub

    return LocalHubPublisher(LocalHub(args.hub or DEFAULT_HUB_URL))


def _history_end(start: dt.datetime, count: int, rate: float, seed: int, shares: Shares):
    """When a simulated history from ``start`` ends. Every order has an event due when it is
    placed, one order every 2/rate seconds, so the last of ``count`` events is due by
    (count - 1) * 2 / rate: when even that is in the past, no dry run is needed."""
    bound = start + dt.timedelta(seconds=max(count - 1, 0) * 2.0 / rate)
    if bound <= dt.datetime.now(dt.UTC):
        return bound
    return start + simulated_span(count, rate, seed, shares)


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 0:
        raise UsageError("--count must be 0 or more")
    if args.rate <= 0:
        raise UsageError("--rate must be more than 0 events per second")
    if args.to == "eventhubs" and args.simulate is not None:
        raise UsageError("Event Hubs stamps enqueued times itself: --simulate needs --to local")
    try:
        shares = Shares(args.late_share, args.early_share, args.failed_share, args.malformed_share)
    except ValueError as error:
        raise UsageError(str(error)) from None
    seed = args.seed
    simulate_from = None
    header = f"publishing at {args.rate:g} events/s until " + (
        "Ctrl-C" if args.count is None else f"{args.count} are sent (or Ctrl-C)"
    )
    if args.simulate is not None:
        if args.count is None:
            raise UsageError("--simulate needs --count: a simulated history has an end")
        if seed is None:
            seed = new_seed()  # checking the history's end generates it once more, the same
        if args.simulate == "now":
            now = dt.datetime.now(dt.UTC)
            simulate_from = now - simulated_span(args.count, args.rate, seed, shares)
            end = now
        else:
            try:
                simulate_from = _utc_datetime(args.simulate)
            except argparse.ArgumentTypeError as error:
                raise UsageError(f"--simulate: {error}") from None
            end = _history_end(simulate_from, args.count, args.rate, seed, shares)
            ahead = (end - dt.datetime.now(dt.UTC)).total_seconds()
            if ahead > FUTURE_TOLERANCE_S and not args.allow_future:
                raise UsageError(
                    f"--simulate {args.simulate}: these {args.count} events would end "
                    f"{describe_duration(ahead)} from now, at {isoformat_utc(end)}, and live "
                    "events published later would come before them in time; leave out START "
                    "to end the history now, or pass --allow-future"
                )
        header = (
            f"simulating {args.count} events enqueued from {isoformat_utc(simulate_from)} "
            f"to {isoformat_utc(end)}"
        )
    publisher = open_publisher(args)
    try:
        run_id = publisher.new_run_id()
        print(f"{header}; order ids order_{run_id}_1, order_{run_id}_2, ...", file=sys.stderr)
        produce(
            publisher,
            count=args.count,
            rate=args.rate,
            seed=seed,
            shares=shares,
            simulate_from=simulate_from,
            run_id=run_id,
            progress=sys.stderr,
        )
    except KeyboardInterrupt:
        print("stopped by Ctrl-C", file=sys.stderr)
    except PublishError as error:  # failed after its retries: throttled, offline, too large
        raise UsageError(str(error)) from None
    finally:
        publisher.close()
    return 0
