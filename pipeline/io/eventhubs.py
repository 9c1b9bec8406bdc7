"""Azure Event Hubs as a ``HubClient``: the same source that reads the local hub reads Event Hubs.

Setup (see the README's Azure section): a namespace holding the event hubs ``bookingtopic`` and
``paymentstopic``, and a consumer group for the pipeline. The hub URL names the namespace:

  - ``eventhubs://NAMESPACE.servicebus.windows.net`` authenticates with azure-identity's
    ``DefaultAzureCredential`` (managed identity, service principal from ``AZURE_CLIENT_ID`` /
    ``AZURE_TENANT_ID`` / ``AZURE_CLIENT_SECRET``, or ``az login``), which needs the role
    "Azure Event Hubs Data Receiver" (reading) or "... Data Sender" (publishing);
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
Transient failures (lost connection, timeouts, throttling) are retried inside the SDK, which
reopens the link at the last event it delivered.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from pipeline.errors import UsageError
from pipeline.io.azure import (
    connection_string_settings,
    default_credential,
    import_extra,
    is_credential_error,
)
from pipeline.io.hub import PartitionProperties
from pipeline.schema import HubEvent, datetime_to_micros

CONNECTION_STRING_ENV = "EVENTHUB_CONNECTION_STRING"
DEFAULT_CONSUMER_GROUP = "$Default"
URL_SCHEME = "eventhubs://"

CREDENTIAL_HINT = (
    f"set {CONNECTION_STRING_ENV} to a namespace connection string, or give DefaultAzureCredential "
    "an identity (az login, a managed identity, or AZURE_CLIENT_ID/AZURE_TENANT_ID/"
    "AZURE_CLIENT_SECRET) with an 'Azure Event Hubs Data Receiver/Sender' role"
)


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
            "credential": default_credential(),
        }


def _endpoint_host(connection_string: str) -> str | None:
    """The namespace host a connection string's Endpoint names."""
    endpoint = connection_string_settings(connection_string).get("endpoint", "")
    return urlsplit(endpoint).hostname


def _sdk():
    return import_extra("azure.eventhub", "azure")


def consumer_client(address: EventHubsAddress, hub: str) -> Any:
    """An ``EventHubConsumerClient`` for one hub (the SDK's own retries: exponential backoff)."""
    sdk = _sdk()
    arguments = address.client_arguments(hub)
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


def to_hub_event(hub: str, partition: str, event: Any) -> HubEvent:
    """An ``azure.eventhub.EventData`` received from the service as a ``HubEvent``."""
    partition_key = event.partition_key
    if isinstance(partition_key, bytes):
        partition_key = partition_key.decode("utf-8")
    return HubEvent(
        hub,
        partition,
        event.sequence_number,
        datetime_to_micros(event.enqueued_time),
        partition_key,
        event_body(event),
    )


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
    """``receive_batch`` arguments that start at sequence_number.

    The service rejects a sequence-number filter beyond the last event it has, so reading on from
    the end of a partition asks for the events after the last one instead (or for the start of
    the stream, offset "-1", when the partition never held any).
    """
    if sequence_number <= last_known:
        return {"starting_position": sequence_number, "starting_position_inclusive": True}
    if last_known < 0:
        return {"starting_position": "-1", "starting_position_inclusive": False}
    return {"starting_position": last_known, "starting_position_inclusive": False}


class HubReadError(RuntimeError):
    """Reading a partition failed in a way the SDK's own retries did not overcome."""


class _PartitionReader:
    """Receives one partition from a sequence number on a thread, into a bounded queue."""

    def __init__(
        self,
        client: Any,
        hub: str,
        partition: str,
        start: int,
        last_known: int,
        *,
        max_batch_size: int,
        queue_batches: int,
        prefetch: int,
    ):
        self.hub = hub
        self.partition = partition
        self.next_sequence_number = start
        self._client = client
        self._batches: queue.Queue[list[HubEvent]] = queue.Queue(maxsize=queue_batches)
        self._carry: list[HubEvent] = []
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._receive,
            kwargs={
                **starting_position(start, last_known),
                "max_batch_size": max_batch_size,
                "prefetch": prefetch,
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

    def _on_batch(self, _context: Any, events: list[Any]) -> None:
        if not events:
            return
        batch = [to_hub_event(self.hub, self.partition, event) for event in events]
        while not self._stopping.is_set():
            try:
                self._batches.put(batch, timeout=0.2)
                return
            except queue.Full:
                continue

    def _on_error(self, _context: Any, error: BaseException) -> None:
        # The SDK calls this for each failure, then retries; remember it to explain a timeout.
        self._error = error

    def take(self, max_events: int, wait: float) -> list[HubEvent]:
        """Up to max_events events, waiting up to ``wait`` seconds for the first one."""
        events = self._carry
        self._carry = []
        if not events:
            deadline = time.monotonic() + wait
            while not events:
                if not self._thread.is_alive():
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
      client_factory: makes an ``EventHubConsumerClient`` for a hub (tests pass a fake).
      receive_timeout: seconds to wait for events known to be in a partition before failing.
      idle_wait: seconds to wait for new events when a partition has been read to its end.
      max_batch_size, queue_batches, prefetch: receiving batch size, batches buffered per
        partition, and events the SDK prefetches per partition.
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
    ):
        self.address = address
        self._client_factory = client_factory or (lambda hub: consumer_client(address, hub))
        self._receive_timeout = receive_timeout
        self._idle_wait = idle_wait
        self._reader_options = {
            "max_batch_size": max_batch_size,
            "queue_batches": queue_batches,
            "prefetch": prefetch,
        }
        self._management: dict[str, Any] = {}  # hub -> client for metadata calls
        self._readers: dict[tuple[str, str], _PartitionReader] = {}
        self._known_last: dict[tuple[str, str], tuple[int, float]] = {}  # -> (last seq, when)

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
        try:
            return call(self._metadata_client(hub))
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

    def _events_known_from(self, hub: str, partition: str, sequence_number: int) -> bool:
        """Whether the partition is known to hold an event at sequence_number or later; asks the
        service at most once a second so a caught-up reader does not flood it with calls."""
        last, asked_at = self._known_last.get((hub, partition), (-1, -1e9))
        if sequence_number <= last:
            return True
        if time.monotonic() - asked_at >= 1.0:
            last = self.partition_properties(hub, partition).last_sequence_number
        return sequence_number <= last

    def read(
        self, hub: str, partition: str, from_sequence_number: int, max_events: int
    ) -> Sequence[HubEvent]:
        key = (hub, partition)
        known = self._events_known_from(hub, partition, from_sequence_number)
        reader = self._readers.get(key)
        if reader is None or reader.next_sequence_number != from_sequence_number:
            if reader is not None:
                reader.close()
            reader = _PartitionReader(
                self._client_factory(hub),
                hub,
                partition,
                from_sequence_number,
                self._known_last[key][0],
                **self._reader_options,
            )
            self._readers[key] = reader
        events = reader.take(max_events, self._receive_timeout if known else self._idle_wait)
        if not events and known:
            error = reader.last_error()
            if error is not None and is_credential_error(error):
                raise UsageError(f"Event Hubs refused to receive: {error}; {CREDENTIAL_HINT}")
            raise HubReadError(
                f"no events from {hub} partition {partition} at sequence number "
                f"{from_sequence_number} within {self._receive_timeout:g} s although the "
                f"partition holds them (last error: {error!r})"
            )
        return events

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        for client in self._management.values():
            client.close()
        self._readers.clear()
        self._management.clear()
