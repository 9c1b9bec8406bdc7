"""Which time an event is joined at: its enqueued time (the ASA job's), or a time in its payload.

The ASA job has no ``TIMESTAMP BY``, so event time is the enqueued time, and that is the default.
A job written ``TIMESTAMP BY booking_time`` / ``payment_time`` instead is modelled by the
``payload`` policy, with ASA's late-arrival policy "adjust": a payload time more than
``late_arrival_tolerance`` before the enqueued time is moved up to ``enqueued - tolerance``.
A payload time after the enqueued time (a producer clock ahead of the hub's) is taken as the
enqueued time: that keeps every event's time within ``[enqueued - tolerance, enqueued]``, so a
watermark ``tolerance`` behind the enqueued times never declares an event late, and no event is
dropped. An event with no readable payload time cannot be placed: it becomes a dead letter.
"""

from __future__ import annotations

import datetime as dt

from pipeline.schema import datetime_to_micros

ENQUEUED = "enqueued"
PAYLOAD = "payload"
POLICIES = (ENQUEUED, PAYLOAD)
#: ASA's default late-arrival tolerance.
DEFAULT_LATE_ARRIVAL_TOLERANCE_SECONDS = 5.0


def payload_event_time(
    payload_time: dt.datetime | None, enqueued_micros: int, tolerance_micros: int
) -> int | None:
    """The event time (µs) of an event whose payload says ``payload_time`` (None: unreadable)."""
    if payload_time is None:
        return None
    micros = datetime_to_micros(payload_time)
    return min(max(micros, enqueued_micros - tolerance_micros), enqueued_micros)
