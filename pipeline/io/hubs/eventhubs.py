"""Azure Event Hubs as a ``HubClient``: the same source that reads the local hub reads Event Hubs.

Setup (see the README's Azure section): a namespace holding the event hubs ``bookingtopic`` and
``paymentstopic``, and a consumer group for the pipeline. The hub URL names the namespace:

  - ``eventhubs://NAMESPACE.servicebus.windows.net`` authenticates with azure-identity's
    ``DefaultAzureCredential`` (managed identity, service principal from ``AZURE_CLIENT_ID`` /
    ``AZURE_TENANT_ID`` / ``AZURE_CLIENT_SECRET``, or ``az login``), which needs the role
    "Azure Event Hubs Data Receiver" (reading) or "... Data Sender" (publishing). One credential
    object serves every client of the process, so tokens are fetched once, not per reader;
  - ``eventhubs://`` with the environment variable ``EVENTHUB_CONNECTION_STRING`` set to a
    namespace-level connection string (a shared access policy) uses that instead. The secret never
    appears in a URL, a flag or a log line.

A query string chooses the consumer group: ``eventhubs://NS.servicebus.windows.net?consumer_group=bms``
(default ``$Default``).

Reading. The SDK only pushes events to a callback (``EventHubConsumerClient.receive_batch`` blocks
and calls back until the client is closed), while the source pulls ``read(partition, from, n)``.
Each partition therefore gets a ``_PartitionReader``: a daemon thread running ``receive_batch``
from a sequence number, handing batches to the caller through a bounded queue. The queue is the
back-pressure: when the pipeline is slow the callback blocks, the SDK stops crediting the link and
the service stops sending, so memory stays bounded by ``queue_batches x max_batch_size`` plus the
SDK's prefetch. The reader is reused while the caller reads on from where it stopped and is
restarted at the new position when the caller jumps (a split or a restart from a checkpoint).
The asynchronous client would avoid the threads, but it would need an event loop inside every
Beam worker thread; one thread per partition being read is cheap and keeps the code synchronous.

What the service does to readers, and what the reader does about it:

  - Redelivery. After a lost link the SDK reopens it at the last event it delivered, with the
    original inclusive flag, so that event (and any it had buffered) comes again; once its
    ``retry_total`` is spent it drops the consumer and, a ``LOAD_BALANCING_INTERVAL`` later,
    makes a new one from its in-memory checkpoint. The reader therefore drops every event below
    the next sequence number it expects, and moves that checkpoint (``update_checkpoint``) to
    the last event it queued, so a new consumer starts right after it. Reading on from the end
    of a partition starts *inclusive* on its last event and drops that one repeat, rather than
    asking for the events after it (an exclusive filter exactly on the last sequence number has
    been reported to return older events).
  - Epochs. Every reader is an epoch reader (``owner_level``): microseconds since the Unix epoch
    when it was made, and more than any earlier reader of this process. The service then keeps
    only the newest reader of a partition in a consumer group and disconnects the others
    (``amqp:link:stolen``); a disconnected reader stops for good, and the next ``read`` of its
    partition in that process starts a new one. So residuals of a partition that move between
    workers never pile up towards the service's limit of 5 readers per partition and consumer
    group, and the pipeline never needs a reader of another job on its consumer group to go
    away by itself. Readers not read from for ``idle_close`` seconds are closed.
  - Throttling. A busy namespace answers with the AMQP condition ``com.microsoft:server-busy``
    (the SDK raises it as a ``ConnectError``); the reader waits between attempts (4 s, doubling
    up to a minute) and reads return nothing meanwhile, so the source polls again later, for up
    to ``throttled_timeout`` seconds before failing.
  - Where a partition ends comes with every event (``track_last_enqueued_event_properties``):
    the client keeps the last sequence number heard of (``known_end``), and the source asks it,
    not the service, whether a piece of a partition is caught up or lies beyond the end. So a
    caught-up partition asks the service nothing but reads, and a reader restarted at the end
    of a partition starts inclusive on the last event heard of without asking where it is.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import tenacity

from pipeline.errors import UsageError
from pipeline.io.azure import (
    connection_string_settings,
    default_credential,
    import_extra,
    is_credential_error,
)
from pipeline.io.hubs.base import PartitionProperties
from pipeline.schema import HubEvent, datetime_to_micros

CONNECTION_STRING_ENV = "EVENTHUB_CONNECTION_STRING"
DEFAULT_CONSUMER_GROUP = "$Default"
URL_SCHEME = "eventhubs://"
#: Seconds after which the SDK makes a new consumer once one has spent its retries. The SDK's
#: receive loop spins while it has none, so this is short (its default is 30 s).
LOAD_BALANCING_INTERVAL = 1.0
#: AMQP error conditions, as the SDK's errors name them (the part after the namespace prefix).
SERVER_BUSY = "server-busy"  # com.microsoft:server-busy: throttled
LINK_STOLEN = "link:stolen"  # amqp:link:stolen: a reader with a higher epoch took the partition
#: Seconds to wait after a busy answer before the next attempt: the first, and the longest.
BUSY_BACKOFF = (4.0, 60.0)

_LOG = logging.getLogger(__name__)

CREDENTIAL_HINT = (
    f"set {CONNECTION_STRING_ENV} to a namespace connection string, or give DefaultAzureCredential "
    "an identity (az login, a managed identity, or AZURE_CLIENT_ID/AZURE_TENANT_ID/"
    "AZURE_CLIENT_SECRET) with an 'Azure Event Hubs Data Receiver/Sender' role"
)

_CREDENTIAL_LOCK = threading.Lock()
_credential: Any = None


def shared_credential() -> Any:
    """The process's one ``DefaultAzureCredential``, made on first use (it caches its tokens)."""
    global _credential
    with _CREDENTIAL_LOCK:
        if _credential is None:
            _credential = default_credential()
        return _credential


_OWNER_LEVEL_LOCK = threading.Lock()
_last_owner_level = 0


def next_owner_level() -> int:
    """The epoch of a new reader: microseconds since the Unix epoch, and more than any epoch given
    before in this process, so the newest reader of a partition has the highest (readers on other
    machines are ordered by their clocks)."""
    global _last_owner_level
    with _OWNER_LEVEL_LOCK:
        _last_owner_level = max(_last_owner_level + 1, time.time_ns() // 1_000)
        return _last_owner_level


def error_condition(error: BaseException | None) -> str | None:
    """The AMQP error condition behind an error, without its namespace prefix: ``server-busy``
    for ``com.microsoft:server-busy``, ``link:stolen`` for ``amqp:link:stolen``; None if the error
    carries none. Reads pyamqp's errors (``condition``) and the SDK's (``error``), and their
    causes."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        condition = getattr(error, "condition", None)
        if condition is not None:
            value = getattr(condition, "value", condition)
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            return text.partition(":")[2] or text
        named = getattr(error, "error", None)
        if isinstance(named, str) and named:
            return named
        error = error.__cause__ or error.__context__
    return None


def is_server_busy(error: BaseException | None) -> bool:
    """Whether the service is throttling: ``com.microsoft:server-busy``, however the SDK raised
    it (a ``ConnectError`` on a link detach, an ``EventDataSendError`` on a rejected send)."""
    return error_condition(error) == SERVER_BUSY


class EventHubsAddress(NamedTuple):
    """Where a namespace is and how to sign in to it, parsed from an ``eventhubs://`` URL.

    ``namespace`` is the fully qualified host name, or None when the connection string from
    ``EVENTHUB_CONNECTION_STRING`` is used (its Endpoint then names the namespace).
    """

    namespace: str | None
    consumer_group: str = DEFAULT_CONSUMER_GROUP

    @classmethod
    def parse(cls, url: str) -> EventHubsAddress:
        if not url.startswith(URL_SCHEME):
            raise UsageError(f"not an Event Hubs URL: {url!r} (expected {URL_SCHEME}NAMESPACE)")
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        unknown = set(query) - {"consumer_group"}
        if unknown:
            raise UsageError(
                f"unknown option(s) {', '.join(sorted(unknown))} in {url!r}; "
                "the only one is consumer_group"
            )
        consumer_group = query.get("consumer_group", [DEFAULT_CONSUMER_GROUP])[-1]
        namespace = parts.hostname or None
        if namespace is None and not os.environ.get(CONNECTION_STRING_ENV):
            raise UsageError(
                f"{url!r} names no namespace and {CONNECTION_STRING_ENV} is not set; "
                f"use {URL_SCHEME}NAMESPACE.servicebus.windows.net or {CREDENTIAL_HINT}"
            )
        return cls(namespace, consumer_group)

    def checkpoint_namespace(self) -> str:
        """The fully qualified namespace, from the URL or the connection string's Endpoint."""
        return self.namespace or _endpoint_host(os.environ.get(CONNECTION_STRING_ENV, "")) or ""

    def client_arguments(self, hub: str) -> dict[str, Any]:
        """Keyword arguments that make an SDK client for one event hub of this namespace."""
        connection_string = os.environ.get(CONNECTION_STRING_ENV)
        if connection_string:
            settings = connection_string_settings(connection_string)
            if settings.get("entitypath"):
                raise UsageError(
                    f"{CONNECTION_STRING_ENV} is scoped to the event hub "
                    f"{settings['entitypath']!r}; the pipeline uses two hubs, so give it a "
                    "namespace-level connection string (without EntityPath)"
                )
            endpoint_host = _endpoint_host(connection_string)
            if self.namespace and endpoint_host and endpoint_host != self.namespace:
                raise UsageError(
                    f"{CONNECTION_STRING_ENV} is for {endpoint_host}, not {self.namespace}"
                )
            return {"conn_str": connection_string, "eventhub_name": hub}
        return {
            "fully_qualified_namespace": self.namespace,
            "eventhub_name": hub,
            "credential": shared_credential(),
        }


def _endpoint_host(connection_string: str) -> str | None:
    """The namespace host a connection string's Endpoint names."""
    endpoint = connection_string_settings(connection_string).get("endpoint", "")
    return urlsplit(endpoint).hostname


def _sdk():
    return import_extra("azure.eventhub", "azure")


def consumer_client(address: EventHubsAddress, hub: str, **options: Any) -> Any:
    """An ``EventHubConsumerClient`` for one hub (the SDK's own retries: exponential backoff).

    ``options`` go to the SDK client as they are (e.g. ``retry_total``); the load-balancing
    interval, which here only says how soon a consumer that spent its retries is made anew, is
    ``LOAD_BALANCING_INTERVAL`` unless given."""
    sdk = _sdk()
    arguments = {
        **address.client_arguments(hub),
        "load_balancing_interval": LOAD_BALANCING_INTERVAL,
        **options,
    }
    if "conn_str" in arguments:
        return sdk.EventHubConsumerClient.from_connection_string(
            consumer_group=address.consumer_group, **arguments
        )
    return sdk.EventHubConsumerClient(consumer_group=address.consumer_group, **arguments)


def event_body(event: Any) -> bytes:
    """The payload of an ``EventData`` as bytes, whatever AMQP body type the sender used."""
    if event.body_type.value == "data":  # the usual case: one or more binary data sections
        return b"".join(event.body)
    return event.body_as_str().encode("utf-8")


class ReceivedEvent(HubEvent):
    """A ``HubEvent`` read from Event Hubs, which also knows the service's ``offset`` of the event:
    the source puts it into its position marks, so checkpoints name it (it equals a plain
    ``HubEvent`` with the same fields)."""

    offset: str | None = None


def to_hub_event(hub: str, partition: str, event: Any) -> ReceivedEvent:
    """An ``azure.eventhub.EventData`` received from the service as a ``HubEvent`` (a
    ``ReceivedEvent``, with the event's offset)."""
    partition_key = event.partition_key
    if isinstance(partition_key, bytes):
        partition_key = partition_key.decode("utf-8")
    received = ReceivedEvent(
        hub,
        partition,
        event.sequence_number,
        datetime_to_micros(event.enqueued_time),
        partition_key,
        event_body(event),
    )
    received.offset = event.offset
    return received


def to_partition_properties(properties: dict[str, Any]) -> PartitionProperties:
    """``get_partition_properties()``'s dictionary as ``PartitionProperties``.

    Sequence numbers never restart in Event Hubs: a partition whose events all expired is empty
    with a last sequence number of N, and its next event will be N + 1. It is reported as
    first = N + 1, last = N (empty means last < first), so bounded reads skip it and unbounded
    reads start at the next event.
    """
    last = properties["last_enqueued_sequence_number"]
    first = last + 1 if properties["is_empty"] else properties["beginning_sequence_number"]
    enqueued: dt.datetime | None = properties.get("last_enqueued_time_utc")
    return PartitionProperties(
        str(properties["id"]),
        first,
        last,
        None if enqueued is None or properties["is_empty"] else datetime_to_micros(enqueued),
    )


def starting_position(sequence_number: int, last_known: int) -> dict[str, Any]:
    """``receive_batch`` arguments that start at sequence_number, or just before it.

    The service rejects a sequence-number filter beyond the last event it has, so reading on from
    the end of a partition starts inclusive on the last event (the reader drops that repeat), or
    at the start of the stream (offset "-1") when the partition never held any. It never asks
    for the events after the last one (an exclusive filter): one exactly on the last sequence
    number has been reported to return older events (azure-sdk-for-java #29502).
    """
    if last_known >= 0:
        return {
            "starting_position": min(sequence_number, last_known),
            "starting_position_inclusive": True,
        }
    return {"starting_position": "-1", "starting_position_inclusive": False}


def _utc(micros: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=micros)


class HubReadError(RuntimeError):
    """Reading a partition failed in a way the SDK's own retries did not overcome."""


class _PartitionReader:
    """Receives one partition from a position on a thread, into a bounded queue.

    ``start`` is the sequence number the first event handed out must have at least: events below
    it, and below the next one expected after each batch, are repeats and are dropped (None when
    starting at an enqueued time: the first event delivered sets it).
    """

    def __init__(
        self,
        client: Any,
        hub: str,
        partition: str,
        start: int | None,
        position: dict[str, Any],
        *,
        owner_level: int,
        max_batch_size: int,
        queue_batches: int,
        prefetch: int,
        busy_backoff: tuple[float, float] = BUSY_BACKOFF,
    ):
        self.hub = hub
        self.partition = partition
        self.next_sequence_number = start
        self.owner_level = owner_level
        #: The partition's last sequence number as the service last reported it with an event.
        self.last_enqueued = -1
        #: Set when a reader with a higher epoch took the partition: this one has stopped.
        self.superseded = False
        #: When the service began answering "busy" (time.monotonic()), None while it is not.
        self.throttled_since: float | None = None
        self.last_used = time.monotonic()
        self.taking = False
        self._expected = -1 if start is None else start  # the receiving thread's next
        self._client = client
        self._batches: queue.Queue[list[HubEvent]] = queue.Queue(maxsize=queue_batches)
        self._carry: list[HubEvent] = []
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._busy_backoff = busy_backoff
        self._busy_delay = busy_backoff[0]
        self._thread = threading.Thread(
            target=self._receive,
            kwargs={
                **position,
                "max_batch_size": max_batch_size,
                "prefetch": prefetch,
                "owner_level": owner_level,
                "track_last_enqueued_event_properties": True,
            },
            name=f"eventhubs-{hub}-{partition}",
            daemon=True,
        )
        self._thread.start()

    def _receive(self, **options: Any) -> None:
        try:
            self._client.receive_batch(
                on_event_batch=self._on_batch,
                on_error=self._on_error,
                partition_id=self.partition,
                **options,
            )
        except BaseException as error:  # surfaced to the reading thread by take()
            self._error = error

    def _on_batch(self, context: Any, events: list[Any]) -> None:
        if not events:
            return
        self._track(context, events)
        fresh = [event for event in events if event.sequence_number >= self._expected]
        if not fresh:
            return  # repeats after a reconnect: all handed out already
        self._expected = fresh[-1].sequence_number + 1
        self.throttled_since = None
        self._busy_delay = self._busy_backoff[0]
        if context is not None:
            # The SDK's in-memory checkpoint: a consumer it makes anew starts after this event.
            context.update_checkpoint(fresh[-1])
        batch = [to_hub_event(self.hub, self.partition, event) for event in fresh]
        while not self._stopping.is_set():
            try:
                self._batches.put(batch, timeout=0.2)
                return
            except queue.Full:
                continue

    def _track(self, context: Any, events: list[Any]) -> None:
        """Learns where the partition ends: from the last-enqueued properties the service sends
        with every event (``track_last_enqueued_event_properties``), or at least from the events
        themselves."""
        properties = getattr(context, "last_enqueued_event_properties", None)
        last = properties.get("sequence_number") if properties else None
        last = max(events[-1].sequence_number, -1 if last is None else last)
        if last > self.last_enqueued:
            self.last_enqueued = last

    def _on_error(self, _context: Any, error: BaseException) -> None:
        # The SDK calls this when a consumer has spent its retries (and for failures of its
        # partition listing), then makes a new consumer; remember it to explain a timeout.
        self._error = error
        condition = error_condition(error)
        if condition == LINK_STOLEN:
            # A newer reader has the partition: stop, rather than have the SDK try again with
            # this reader's (lower) epoch every LOAD_BALANCING_INTERVAL.
            _LOG.info(
                "reader of %s partition %s (epoch %d) disconnected: a newer reader took it",
                self.hub,
                self.partition,
                self.owner_level,
            )
            self.superseded = True
            self._stopping.set()
            self._client.close()
        elif condition == SERVER_BUSY:
            if self.throttled_since is None:
                self.throttled_since = time.monotonic()
            _LOG.warning(
                "Event Hubs is throttling reads of %s partition %s: waiting %g s",
                self.hub,
                self.partition,
                self._busy_delay,
            )
            self._stopping.wait(self._busy_delay)  # the SDK waits for this callback
            self._busy_delay = min(self._busy_delay * 2, self._busy_backoff[1])

    def alive(self) -> bool:
        return self._thread.is_alive() and not self.superseded

    def take(self, max_events: int, wait: float) -> list[HubEvent]:
        """Up to max_events events, waiting up to ``wait`` seconds for the first one."""
        self.last_used = time.monotonic()
        events = self._carry
        self._carry = []
        if not events:
            deadline = time.monotonic() + wait
            while not events:
                if self.superseded and self._batches.empty():
                    return []
                if not self._thread.is_alive() and self._batches.empty():
                    raise HubReadError(self._failure())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                try:
                    events = self._batches.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
        while len(events) < max_events:
            try:
                events = events + self._batches.get_nowait()
            except queue.Empty:
                break
        events, self._carry = events[:max_events], events[max_events:]
        self.next_sequence_number = events[-1].sequence_number + 1
        self.last_used = time.monotonic()
        return events

    def last_error(self) -> BaseException | None:
        return self._error

    def _failure(self) -> str:
        return (
            f"receiving {self.hub} partition {self.partition} stopped: "
            f"{type(self._error).__name__}: {self._error}"
        )

    def close(self) -> None:
        self._stopping.set()
        self._client.close()
        self._thread.join(timeout=10)


ClientFactory = Callable[[str], Any]


class EventHubsClient:
    """The event hubs of one namespace through the ``HubClient`` interface.

    Args:
      address: the namespace and consumer group.
      client_factory: makes an ``EventHubConsumerClient`` for a hub (tests pass a fake, or a real
        client with their own options).
      receive_timeout: seconds to wait for events known to be in a partition before failing.
      idle_wait: seconds to wait for new events when a partition has been read to its end.
      max_batch_size, queue_batches, prefetch: receiving batch size, batches buffered per
        partition, and events the SDK prefetches per partition.
      idle_close: seconds after which a reader nobody reads from is closed.
      throttled_timeout: seconds reads may find the service busy before failing.
      busy_backoff: the first and the longest wait after a busy answer.
    """

    def __init__(
        self,
        address: EventHubsAddress,
        client_factory: ClientFactory | None = None,
        *,
        receive_timeout: float = 60.0,
        idle_wait: float = 0.2,
        max_batch_size: int = 300,
        queue_batches: int = 4,
        prefetch: int = 300,
        idle_close: float = 5.0,
        throttled_timeout: float = 600.0,
        busy_backoff: tuple[float, float] = BUSY_BACKOFF,
    ):
        self.address = address
        self._client_factory = client_factory or (lambda hub: consumer_client(address, hub))
        self._receive_timeout = receive_timeout
        self._idle_wait = idle_wait
        self._idle_close = idle_close
        self._throttled_timeout = throttled_timeout
        self._busy_backoff = busy_backoff
        self._reader_options = {
            "max_batch_size": max_batch_size,
            "queue_batches": queue_batches,
            "prefetch": prefetch,
            "busy_backoff": busy_backoff,
        }
        self._management: dict[str, Any] = {}  # hub -> client for metadata calls
        self._readers: dict[tuple[str, str], _PartitionReader] = {}
        self._known_last: dict[tuple[str, str], tuple[int, float]] = {}  # -> (last seq, asked at)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sweeper: threading.Thread | None = None

    @classmethod
    def from_url(cls, url: str) -> EventHubsClient:
        _sdk()  # fail now, with the install hint, rather than on a worker
        return cls(EventHubsAddress.parse(url))

    def __repr__(self) -> str:
        return f"EventHubsClient({self.address!r})"

    def _metadata_client(self, hub: str) -> Any:
        if hub not in self._management:
            self._management[hub] = self._client_factory(hub)
        return self._management[hub]

    def _call(self, hub: str, what: str, call: Callable[[Any], Any]) -> Any:
        """A metadata call, waiting out a busy service (for up to ``throttled_timeout``)."""

        def busy(state: tenacity.RetryCallState) -> None:
            delay = state.next_action.sleep if state.next_action else 0
            _LOG.warning("Event Hubs is busy (to %s): trying again in %g s", what, delay)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_server_busy),
            wait=tenacity.wait_exponential(
                multiplier=self._busy_backoff[0], max=self._busy_backoff[1]
            ),
            stop=tenacity.stop_before_delay(self._throttled_timeout),
            before_sleep=busy,
            reraise=True,
        )
        try:
            return retrying(lambda: call(self._metadata_client(hub)))
        except Exception as error:
            if is_credential_error(error):
                raise UsageError(
                    f"Event Hubs refused to {what}: {error}; {CREDENTIAL_HINT}"
                ) from None
            raise

    def partition_ids(self, hub: str) -> list[str]:
        return [str(p) for p in self._call(hub, "list partitions", lambda c: c.get_partition_ids())]

    def partition_properties(self, hub: str, partition: str) -> PartitionProperties:
        properties = to_partition_properties(
            self._call(
                hub,
                "read partition properties",
                lambda client: client.get_partition_properties(partition),
            )
        )
        self._known_last[(hub, partition)] = (properties.last_sequence_number, time.monotonic())
        return properties

    def _last_known(self, key: tuple[str, str], reader: _PartitionReader | None = None) -> int:
        """The partition's last sequence number as last heard of (properties, or the events a
        reader received), without asking the service; -1 if nothing was heard."""
        last, asked_at = self._known_last.get(key, (-1, -1e9))
        if reader is not None and reader.last_enqueued > last:
            last = reader.last_enqueued
            self._known_last[key] = (last, asked_at)
        return last

    def known_end(self, hub: str, partition: str) -> int:
        """The sequence number after the last event heard of, from the partition's reader (the
        service reports the partition's last event with every event it delivers) or the last
        properties asked: no round trip."""
        key = (hub, partition)
        with self._lock:
            reader = self._readers.get(key)
        return self._last_known(key, reader) + 1

    def _reader(self, hub: str, partition: str, from_sequence_number: int) -> _PartitionReader:
        """The reader that hands out ``from_sequence_number`` next: the current one, or a new one
        (with a new, higher epoch)."""
        key = (hub, partition)
        with self._lock:
            reader = self._readers.get(key)
            if (
                reader is not None
                and reader.next_sequence_number == from_sequence_number
                and reader.alive()
            ):
                reader.last_used = time.monotonic()
                return reader
            self._readers.pop(key, None)
        if reader is not None:
            self._last_known(key, reader)
            reader.close()
        last, asked_at = self._known_last.get(key, (-1, -1e9))
        if (key not in self._known_last or from_sequence_number > last + 1) and (
            time.monotonic() - asked_at >= 1.0
        ):
            # Starting beyond the last event heard of (or knowing nothing): the service refuses
            # a start beyond its last event, so where does the partition end now? Reading on
            # from the last event heard of needs no answer: it starts inclusive on that one.
            last = self.partition_properties(hub, partition).last_sequence_number
        reader = _PartitionReader(
            self._client_factory(hub),
            hub,
            partition,
            from_sequence_number,
            starting_position(from_sequence_number, last),
            owner_level=next_owner_level(),
            **self._reader_options,
        )
        with self._lock:
            self._readers[key] = reader
            if self._sweeper is None:
                self._sweeper = threading.Thread(
                    target=self._sweep, name="eventhubs-idle-readers", daemon=True
                )
                self._sweeper.start()
        return reader

    def read(
        self, hub: str, partition: str, from_sequence_number: int, max_events: int
    ) -> Sequence[HubEvent]:
        key = (hub, partition)
        reader = self._reader(hub, partition, from_sequence_number)
        known = from_sequence_number <= self._last_known(key, reader)
        wait = self._receive_timeout if known else self._idle_wait
        if reader.throttled_since is not None:
            wait = self._idle_wait  # the source polls again later
        reader.taking = True
        try:
            events = reader.take(max_events, wait)
        finally:
            reader.taking = False
        self._last_known(key, reader)
        if events or not known or reader.superseded:
            return events  # superseded: a newer reader took the partition; the next read restarts
        error = reader.last_error()
        if error is not None and is_credential_error(error):
            raise UsageError(f"Event Hubs refused to receive: {error}; {CREDENTIAL_HINT}")
        throttled = reader.throttled_since
        if throttled is not None and time.monotonic() - throttled < self._throttled_timeout:
            return []
        raise HubReadError(
            f"no events from {hub} partition {partition} at sequence number "
            f"{from_sequence_number} within {wait:g} s although the "
            f"partition holds them (last error: {error!r})"
        )

    def first_sequence_number_at(self, hub: str, partition: str, enqueued_time: int) -> int:
        """The sequence number of the partition's first event enqueued at or after
        ``enqueued_time`` (µs, UTC), or the next one to come if there is none: one receiver
        started at that time (the service filters on milliseconds; earlier events are skipped)."""
        properties = self.partition_properties(hub, partition)
        end = properties.last_sequence_number + 1
        if (
            properties.last_sequence_number < properties.first_sequence_number
            or properties.last_enqueued_time is None
            or properties.last_enqueued_time < enqueued_time
        ):
            return end
        reader = _PartitionReader(
            self._client_factory(hub),
            hub,
            partition,
            None,
            {"starting_position": _utc(enqueued_time), "starting_position_inclusive": True},
            owner_level=next_owner_level(),
            **self._reader_options,
        )
        try:
            deadline = time.monotonic() + self._receive_timeout
            while (remaining := deadline - time.monotonic()) > 0:
                for event in reader.take(1000, remaining):
                    if event.enqueued_time >= enqueued_time:
                        return event.sequence_number
            raise HubReadError(
                f"no events from {hub} partition {partition} at or after enqueued time "
                f"{_utc(enqueued_time).isoformat()} within {self._receive_timeout:g} s although "
                f"the partition holds them (last error: {reader.last_error()!r})"
            )
        finally:
            reader.close()

    def _sweep(self) -> None:
        """Closes readers nobody read from for ``idle_close`` seconds (a residual that moved to
        another worker, a finished bounded range)."""
        while not self._closed.wait(min(1.0, self._idle_close / 2)):
            now = time.monotonic()
            with self._lock:
                idle = [
                    (key, reader)
                    for key, reader in self._readers.items()
                    if not reader.taking and now - reader.last_used > self._idle_close
                ]
                for key, _ in idle:
                    del self._readers[key]
            for (hub, partition), reader in idle:
                _LOG.debug("closing the idle reader of %s partition %s", hub, partition)
                self._last_known((hub, partition), reader)
                reader.close()

    def open_readers(self) -> int:
        """How many partition readers are open now."""
        with self._lock:
            return len(self._readers)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            readers = list(self._readers.values())
            self._readers.clear()
        for reader in readers:
            reader.close()
        for client in self._management.values():
            client.close()
        self._management.clear()
