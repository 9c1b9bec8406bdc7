"""Publishing to Azure Event Hubs (``bms produce --to eventhubs``).

Events go out through the SDK's buffered producer (``EventHubProducerClient(buffered_mode=True)``):
``send`` only hands them over. The SDK maps each partition key to its partition with the service's
own hash (so every event of an order lands in one partition, in the order sent), gathers the
events of each partition into batches up to the service's message size, and sends a partition's
batch once it is full or ``max_wait_time`` has passed, on a thread per partition. So events are
batched per partition whatever order their keys come in: one round trip carries the events of
many orders, where a batch per run of equal keys carried one event (order ids are unique).

Outcomes come back by callback: what the service accepted is counted (``sent``, per hub), and a
batch that failed after the SDK's own retries (``retry_total``, exponential backoff) is sent again
from the caller's thread (at its next ``send``, or in ``close``) if the failure is transient:
  - the service is busy, recognised by its AMQP condition ``com.microsoft:server-busy`` whatever
    the SDK raised it as (a ``ConnectError`` on a link detach, an ``EventDataSendError`` on a
    rejected transfer): again after 4 s, doubling up to a minute, for up to ``busy_timeout``;
  - a lost connection, a timeout or another failed send: ``attempts`` times in all, with backoff.
Anything else (refused credentials, a malformed event) is permanent: ``PublishError`` (or the
credential hint) at the next ``send`` or at ``close``. A send again after a timeout can
duplicate events (Event Hubs is at-least-once); the warehouse's row keys absorb that.

``close`` sends what is still buffered, then reports what the service accepted and at what rate
(``summary``, and a line on ``report`` if given): on Ctrl-C that is the count of what was sent.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple, TextIO

import tenacity

from pipeline.errors import UsageError
from pipeline.io.azure import import_extra, is_credential_error
from pipeline.io.hubs import OutgoingEvent
from pipeline.io.hubs.eventhubs import (
    BUSY_BACKOFF,
    CREDENTIAL_HINT,
    EventHubsAddress,
    is_server_busy,
)
from producers.publish import random_run_id

#: Makes a buffered ``EventHubProducerClient`` for a hub: ``factory(hub, on_success=, on_error=)``.
ProducerFactory = Callable[..., Any]


def producer_client(
    address: EventHubsAddress,
    hub: str,
    *,
    on_success: Callable[[list, str | None], None],
    on_error: Callable[[list, str | None, Exception], None],
    **options: Any,
) -> Any:
    """A buffered ``EventHubProducerClient`` for one hub of the namespace; ``options`` go to the
    SDK client as they are (``retry_total``, ``max_wait_time``, ``max_buffer_length``, ...)."""
    sdk = import_extra("azure.eventhub", "azure")
    arguments = {
        **address.client_arguments(hub),
        "buffered_mode": True,
        "on_success": on_success,
        "on_error": on_error,
        **options,
    }
    if "conn_str" in arguments:
        return sdk.EventHubProducerClient.from_connection_string(**arguments)
    return sdk.EventHubProducerClient(**arguments)


def _is_transient(error: BaseException) -> bool:
    exceptions = import_extra("azure.eventhub.exceptions", "azure")
    if isinstance(error, exceptions.AuthenticationError | exceptions.ClientClosedError):
        return False
    if is_server_busy(error):
        return True
    return isinstance(
        error,
        exceptions.ConnectionLostError
        | exceptions.OperationTimeoutError
        | exceptions.EventDataSendError,
    )


class PublishError(RuntimeError):
    """Events could not be published even after retrying."""


class SendRetries:
    """How the publisher retries a transient failure, as tenacity strategies: a busy service
    (``com.microsoft:server-busy``) is waited out longer, from ``busy_backoff[0]`` doubling up to
    ``busy_backoff[1]``, for up to ``busy_timeout`` seconds; any other transient failure is tried
    ``attempts`` times in all, ``backoff`` seconds apart at first, doubling.

    ``Retrying`` drives it around a hand-over on the caller's thread; ``after`` applies it to a
    batch the SDK reports failed from its own thread, where there is no call to wrap.
    """

    def __init__(
        self,
        attempts: int,
        backoff: float,
        busy_backoff: tuple[float, float],
        busy_timeout: float,
    ):
        self._busy_wait = tenacity.wait_exponential(multiplier=busy_backoff[0], max=busy_backoff[1])
        self._busy_stop = tenacity.stop_before_delay(busy_timeout)
        self._wait = tenacity.wait_exponential(multiplier=backoff)
        self._stop = tenacity.stop_after_attempt(attempts)

    @staticmethod
    def _busy(state: tenacity.RetryCallState) -> bool:
        return is_server_busy(state.outcome.exception())

    def wait(self, state: tenacity.RetryCallState) -> float:
        return (self._busy_wait if self._busy(state) else self._wait)(state)

    def stop(self, state: tenacity.RetryCallState) -> bool:
        return (self._busy_stop if self._busy(state) else self._stop)(state)

    def retrying(self, sleep: Callable[[float], None]) -> tenacity.Retrying:
        """Retries of a call while its failures are transient; the last failure is raised."""
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_transient),
            wait=self.wait,
            stop=self.stop,
            sleep=sleep,
            reraise=True,
        )

    def after(self, attempt: int, error: BaseException, since: float, now: float) -> float | None:
        """Seconds to wait before trying again after the ``attempt``-th try failed with a
        transient ``error`` at ``now``, the failures having begun at ``since`` (clock seconds);
        None to give up."""
        state = tenacity.RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        state.set_exception((type(error), error, error.__traceback__))
        state.start_time, state.outcome_timestamp = since, now
        state.upcoming_sleep = self.wait(state)
        return None if self.stop(state) else state.upcoming_sleep


class _Retry(NamedTuple):
    """Events of a failed batch, to send again to their partition at ``due``. Each event knows
    how often it was tried (``_bms_attempts``) and since when the service is busy for it."""

    due: float
    hub: str
    partition: str | None
    events: list


class EventHubsPublisher:
    """Publishes ``OutgoingEvent``s to the event hubs of one namespace (a ``Publisher``).

    Args:
      address: the namespace (and how to sign in).
      producer_factory: makes a buffered ``EventHubProducerClient`` for a hub (tests pass their
        own, with the callbacks given as ``on_success`` and ``on_error``).
      attempts: tries per batch for transient failures other than a busy service, on top of the
        SDK's own retries.
      backoff: seconds before the first of those retries; doubled each time.
      busy_backoff: the first and the longest wait after the service answered busy.
      busy_timeout: seconds a batch may keep finding the service busy before it is given up.
      report: where ``close`` writes ``summary()`` (``bms produce`` passes stderr).
    """

    def __init__(
        self,
        address: EventHubsAddress,
        producer_factory: ProducerFactory | None = None,
        *,
        attempts: int = 4,
        backoff: float = 1.0,
        busy_backoff: tuple[float, float] = BUSY_BACKOFF,
        busy_timeout: float = 600.0,
        report: TextIO | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self._factory = producer_factory or partial(producer_client, address)
        self._retries = SendRetries(attempts, backoff, busy_backoff, busy_timeout)
        self._report = report
        self._sleep = sleep
        self._clock = clock
        self._producers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._failed_batches: list[_Retry] = []
        self._failure: BaseException | None = None
        self._started: float | None = None
        self._last_accepted: float | None = None
        self._interrupted = False
        self.sent: Counter = Counter()  # events accepted by the service, per hub
        self.handed: Counter = Counter()  # events handed to the SDK, per hub
        self.failed: Counter = Counter()  # events given up, per hub

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EventHubsPublisher:
        import_extra("azure.eventhub", "azure")
        return cls(EventHubsAddress.parse(url), **options)

    def _producer(self, hub: str) -> Any:
        if hub not in self._producers:
            self._producers[hub] = self._factory(
                hub,
                on_success=partial(self._on_success, hub),
                on_error=partial(self._on_error, hub),
            )
        return self._producers[hub]

    # ---- callbacks, on the SDK's threads ------------------------------------------------------

    def _on_success(self, hub: str, events: list, _partition: str | None) -> None:
        with self._lock:
            self.sent[hub] += len(events)
            self._last_accepted = self._clock()

    def _on_error(self, hub: str, events: list, partition: str | None, error: Exception) -> None:
        now = self._clock()
        # A batch may hold events sent again and new ones: it counts as its most tried event.
        attempt = 1 + max((getattr(event, "_bms_attempts", 0) for event in events), default=0)
        busy = is_server_busy(error)
        since = [getattr(event, "_bms_busy_since", None) for event in events]
        busy_since = min((t for t in since if t is not None), default=now) if busy else None
        with self._lock:
            if is_credential_error(error):
                self._give_up(hub, events, UsageError(self._refused(hub, error)))
                return
            delay = None
            if _is_transient(error):
                delay = self._retries.after(
                    attempt, error, now if busy_since is None else busy_since, now
                )
            if delay is None:
                self._give_up(hub, events, self._error(hub, attempt, error))
                return
            for event in events:
                event._bms_attempts = attempt
                event._bms_busy_since = busy_since
            self._failed_batches.append(_Retry(now + delay, hub, partition, list(events)))

    def _give_up(self, hub: str, events: list, error: BaseException) -> None:
        self.failed[hub] += len(events)
        if self._failure is None:
            self._failure = error

    @staticmethod
    def _refused(hub: str, error: BaseException) -> str:
        return f"Event Hubs refused to publish to {hub}: {_first_line(error)}; {CREDENTIAL_HINT}"

    @staticmethod
    def _error(hub: str, attempt: int, error: BaseException) -> PublishError:
        failure = PublishError(
            f"publishing to {hub} failed after {attempt} attempt(s): "
            f"{type(error).__name__}: {_first_line(error)}"
        )
        failure.__cause__ = error
        return failure

    # ---- the caller's thread ------------------------------------------------------------------

    def new_run_id(self) -> str:
        """Event Hubs keeps no count of producer runs: five random letters and digits."""
        return random_run_id()

    def _check(self) -> None:
        with self._lock:
            failure = self._failure
        if failure is not None:
            raise failure

    def _resend_due(self, now: float | None = None) -> None:
        """Hands the failed batches whose backoff has passed to the SDK again (never from its
        callbacks: those run under the buffered producer's locks)."""
        now = self._clock() if now is None else now
        with self._lock:
            due = [retry for retry in self._failed_batches if retry.due <= now]
            self._failed_batches = [retry for retry in self._failed_batches if retry.due > now]
        for retry in due:
            producer = self._producer(retry.hub)
            where = {"partition_id": retry.partition} if retry.partition is not None else {}
            for event in retry.events:
                send = partial(producer.send_event, event, **where)
                self._enqueue(retry.hub, send)

    def _enqueue(self, hub: str, action: Callable[[], Any]) -> None:
        """Hands events to the SDK. The first hand-over of a hub opens a link (partition ids, the
        message size limit) and can fail like a send: retried the same way (``SendRetries``),
        here. A ValueError (an event too large for a message) is raised as it is."""
        retrying = self._retries.retrying(lambda seconds: self._sleep(seconds))
        try:
            retrying(action)
        except ValueError:
            raise
        except Exception as error:
            if is_credential_error(error):
                raise UsageError(self._refused(hub, error)) from None
            raise self._error(hub, retrying.statistics["attempt_number"], error) from error

    def send(self, hub: str, events: Sequence[OutgoingEvent]) -> None:
        """Hands the events to the SDK's buffer (it sends them in the background); raises
        ``PublishError`` if events handed over earlier could not be sent."""
        self._check()
        self._resend_due()
        sdk = import_extra("azure.eventhub", "azure")
        producer = self._producer(hub)
        if self._started is None:
            self._started = self._clock()
        for event in events:
            data = sdk.EventData(event.body)
            try:
                self._enqueue(
                    hub,
                    lambda d=data, k=event.partition_key: producer.send_event(d, partition_key=k),
                )
            except ValueError:
                raise PublishError(
                    f"an event of {len(event.body)} bytes is larger than Event Hubs accepts in "
                    "one message"
                ) from None
            self.handed[hub] += 1

    def flush(self) -> None:
        """Sends everything handed over, the failed batches again after their backoff, until all
        is accepted or given up; then raises ``PublishError`` if anything was given up."""
        while True:
            for producer in list(self._producers.values()):
                producer.flush()
            with self._lock:
                due = min((retry.due for retry in self._failed_batches), default=None)
            if due is None:
                break
            wait = due - self._clock()
            if wait > 0:
                self._sleep(wait)
            self._resend_due(max(due, self._clock()))
        self._check()

    def summary(self) -> str:
        """What the service accepted, per hub, and at what rate; what was not sent."""
        with self._lock:
            accepted = sum(self.sent.values())
            hubs = ", ".join(f"{hub} {count}" for hub, count in sorted(self.sent.items()))
            end = self._last_accepted or self._clock()
        seconds = max(end - (self._started or end), 0.0)
        rate = f"{accepted / seconds:.1f} events/s" if seconds > 0 else "- events/s"
        line = (
            f"Event Hubs accepted {accepted} events ({hubs or 'none'}) in {seconds:.1f} s, {rate}"
        )
        unsent = sum(self.handed.values()) - accepted
        if unsent > 0:
            why = "interrupted" if self._interrupted else "failed"
            line += f"; {unsent} handed over were not sent ({why})"
        return line

    def close(self) -> None:
        """Sends what is buffered (a second Ctrl-C drops it), closes the clients, and reports."""
        try:
            self.flush()
        except KeyboardInterrupt:
            self._interrupted = True
            raise
        finally:
            for producer in self._producers.values():
                try:
                    producer.close(flush=not self._interrupted and self._failure is None)
                except Exception:  # closing after a failure: the failure is what to report
                    if self._failure is None:
                        raise
            self._producers.clear()
            if self._report is not None:
                print(self.summary(), file=self._report, flush=True)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""
