"""Publishing to Azure Event Hubs (``bms produce --to eventhubs``).

Events go out in the SDK's ``EventDataBatch``es, which know the service's message size limit:
``add`` raises ValueError when an event does not fit, and a new batch is started. A batch has one
partition key, so consecutive events that share an order_id share a batch; the service hashes the
key to the partition, exactly as it does for every other client, so ordering per order holds.

Failures: the SDK retries each send itself (``retry_total`` attempts, exponential backoff). On
top of that a transient failure that outlives those retries (lost connection, timeout, a busy
service) is retried a bounded number of times with backoff before giving up. A resend after a
timeout can duplicate events (Event Hubs is at-least-once); the warehouse's idempotent mode and
the join's natural key absorb that.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from itertools import groupby
from typing import Any

from pipeline.errors import UsageError
from pipeline.io.azure import import_extra, is_credential_error
from pipeline.io.eventhubs import CREDENTIAL_HINT, EventHubsAddress
from pipeline.io.hub import OutgoingEvent

ProducerFactory = Callable[[str], Any]


def producer_client(address: EventHubsAddress, hub: str) -> Any:
    """An ``EventHubProducerClient`` for one hub of the namespace."""
    sdk = import_extra("azure.eventhub", "azure")
    arguments = address.client_arguments(hub)
    if "conn_str" in arguments:
        return sdk.EventHubProducerClient.from_connection_string(**arguments)
    return sdk.EventHubProducerClient(**arguments)


def _is_transient(error: BaseException) -> bool:
    exceptions = import_extra("azure.eventhub.exceptions", "azure")
    if isinstance(error, exceptions.AuthenticationError | exceptions.ClientClosedError):
        return False
    return isinstance(
        error,
        exceptions.ConnectionLostError
        | exceptions.OperationTimeoutError
        | exceptions.EventDataSendError,
    )


class PublishError(RuntimeError):
    """Events could not be published even after retrying."""


class EventHubsPublisher:
    """Publishes ``OutgoingEvent``s to the event hubs of one namespace (a ``Publisher``).

    Args:
      address: the namespace (and how to sign in).
      producer_factory: makes an ``EventHubProducerClient`` for a hub (tests pass a fake).
      attempts: tries per batch for transient failures, on top of the SDK's own retries.
      backoff: seconds before the first retry; doubled each time.
    """

    def __init__(
        self,
        address: EventHubsAddress,
        producer_factory: ProducerFactory | None = None,
        *,
        attempts: int = 4,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self._factory = producer_factory or (lambda hub: producer_client(address, hub))
        self._attempts = attempts
        self._backoff = backoff
        self._sleep = sleep
        self._producers: dict[str, Any] = {}
        self.sent: Counter = Counter()  # events accepted by the service, per hub

    @classmethod
    def from_url(cls, url: str) -> EventHubsPublisher:
        import_extra("azure.eventhub", "azure")
        return cls(EventHubsAddress.parse(url))

    def _producer(self, hub: str) -> Any:
        if hub not in self._producers:
            self._producers[hub] = self._factory(hub)
        return self._producers[hub]

    def send(self, hub: str, events: Sequence[OutgoingEvent]) -> None:
        producer = self._producer(hub)

        def new_batch(partition_key: str | None) -> Any:
            # Creating the first batch opens the link to learn the size limit: it can fail too.
            return self._with_retry(hub, lambda: producer.create_batch(partition_key=partition_key))

        for batch in _batches(new_batch, events):
            self._with_retry(hub, lambda batch=batch: producer.send_batch(batch))
            self.sent[hub] += len(batch)

    def _with_retry(self, hub: str, action: Callable[[], Any]) -> Any:
        delay = self._backoff
        for attempt in range(1, self._attempts + 1):
            try:
                return action()
            except Exception as error:
                if is_credential_error(error):
                    raise UsageError(
                        f"Event Hubs refused to publish to {hub}: {error}; {CREDENTIAL_HINT}"
                    ) from None
                if not _is_transient(error) or attempt == self._attempts:
                    raise PublishError(
                        f"publishing to {hub} failed after {attempt} attempt(s): "
                        f"{type(error).__name__}: {_first_line(error)}"
                    ) from error
                self._sleep(delay)
                delay *= 2

    def new_run_id(self) -> str:
        """Event Hubs keeps no counter for us: a random five-character id."""
        from producers.publish import random_run_id

        return random_run_id()

    def close(self) -> None:
        for producer in self._producers.values():
            producer.close()
        self._producers.clear()


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def _batches(
    new_batch: Callable[[str | None], Any], events: Sequence[OutgoingEvent]
) -> Iterator[Any]:
    """``EventDataBatch``es holding the events in order: one per run of equal partition keys,
    split wherever the service's size limit is reached."""
    sdk = import_extra("azure.eventhub", "azure")
    for partition_key, run in groupby(events, key=lambda event: event.partition_key):
        batch = new_batch(partition_key)
        for event in run:
            data = sdk.EventData(event.body)
            try:
                batch.add(data)
            except ValueError:
                if len(batch) == 0:
                    raise PublishError(
                        f"an event of {len(event.body)} bytes is larger than Event Hubs accepts "
                        f"({batch.max_size_in_bytes} bytes per message)"
                    ) from None
                yield batch
                batch = new_batch(partition_key)
                batch.add(data)
        if len(batch):
            yield batch
