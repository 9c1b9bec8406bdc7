"""Parity: the Beam pipeline writes exactly the rows the ASA query gives on the same events.

The ASA side is the reference evaluator running ``sql/stream_analytics_job_query.sql``; the Beam
side is ``ComputeFacts`` written through the real warehouse sink into SQLite and read back. Rows
are compared as multisets of 20-tuples: timestamps to the microsecond, floats exactly, NULLs.
"""

from __future__ import annotations

from collections import Counter

import apache_beam as beam
import orjson
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import TimestampedValue
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.io.warehouse import WriteToWarehouse, read_facts
from pipeline.parity.evaluator import evaluate
from pipeline.pipeline import ComputeFacts
from pipeline.schema import BOOKING_HUB, PAYMENT_HUB, HubEvent
from tests.conftest import booking_document as booking
from tests.conftest import payment_document as payment

SECOND = 1_000_000
T0 = 1_770_000_000 * SECOND  # on a window start for every period that divides 30 s


def beam_facts(events: list[HubEvent], directory) -> list[tuple]:
    warehouse = f"sqlite:///{directory / 'beam.db'}"
    options = PipelineOptions(runner="DirectRunner", direct_running_mode="in_memory")
    with beam.Pipeline(options=options) as p:
        streams = tuple(
            p
            | f"Create {hub}"
            >> beam.Create(
                [TimestampedValue(e, e.enqueued_time / SECOND) for e in events if e.hub == hub]
                or [None]
            )
            | f"Drop placeholder {hub}" >> beam.Filter(lambda e: e is not None)
            for hub in (BOOKING_HUB, PAYMENT_HUB)
        )
        result = streams | ComputeFacts()
        result["facts"] | WriteToWarehouse(warehouse)
    return read_facts(warehouse)


def differences(expected: Counter, actual: Counter) -> str:
    missing = expected - actual
    extra = actual - expected
    lines = [f"missing from Beam ({sum(missing.values())}):"] + [f"  {r}" for r in missing]
    return "\n".join(
        lines + [f"extra in Beam ({sum(extra.values())}):"] + [f"  {r}" for r in extra]
    )


def assert_parity(events, directory):
    expected = Counter(evaluate(events).rows)
    actual = Counter(beam_facts(events, directory))
    assert actual == expected, differences(expected, actual)
    return expected


def event(hub, micros, document, sequence=0, partition="0"):
    body = document if isinstance(document, bytes) else orjson.dumps(document)
    return HubEvent(hub, partition, sequence, micros, None, body)


def test_edge_cases_of_every_rule(tmp_path):
    b, p = BOOKING_HUB, PAYMENT_HUB
    cases = [
        # 1. event time is the enqueued time, not the payload's times
        (
            event(b, T0, booking("time-1")),
            event(p, T0 + 30 * SECOND, payment("time-1", payment_time="2030-01-01T00:00:00Z")),
        ),
        (
            event(b, T0, booking("time-2")),
            event(p, T0 + 150 * SECOND, payment("time-2", payment_time="2026-02-08T10:30:05Z")),
        ),
        # 2. the bound: 0, exactly 120 s, 1 µs past, 1 ms early
        (event(b, T0 + 7, booking("bound-0")), event(p, T0 + 7, payment("bound-0"))),
        (
            event(b, T0 + 7, booking("bound-120")),
            event(p, T0 + 7 + 120 * SECOND, payment("bound-120")),
        ),
        (
            event(b, T0, booking("bound-over")),
            event(p, T0 + 120 * SECOND + 1, payment("bound-over")),
        ),
        (event(b, T0 + 1000, booking("bound-early")), event(p, T0, payment("bound-early"))),
        # 3. many-to-many: a failed payment and its retry, a booking sent twice, two seats
        (
            event(
                b,
                T0,
                booking(
                    "many",
                    seats=({"seat_number": "A1", "price": 5}, {"seat_number": "A2", "price": 5}),
                ),
            ),
            event(
                b,
                T0 + SECOND,
                booking(
                    "many",
                    seats=({"seat_number": "A1", "price": 5}, {"seat_number": "A2", "price": 5}),
                ),
            ),
            event(p, T0 + 9 * SECOND, payment("many", "failed", payment_status="Failed")),
            event(p, T0 + 29 * SECOND, payment("many", "retry")),
        ),
        # 4. NULL and missing order ids never join
        (event(b, T0, booking(None)), event(p, T0 + SECOND, payment(None))),
        (
            event(b, T0, {k: v for k, v in booking("x").items() if k != "order_id"}),
            event(p, T0, payment("x")),
        ),
        # 5. TRY_CAST: offsets, no offset, 7 digits, date only, unparsable, not a string
        (
            event(b, T0, booking("cast-1", booking_time="2026-02-08T23:30:00-08:00")),
            event(p, T0, payment("cast-1", payment_time="2026-02-08 10:30:00.1234567")),
        ),
        (
            event(b, T0, booking("cast-2", booking_time="2026-02-08")),
            event(p, T0, payment("cast-2", payment_time="soon")),
        ),
        (
            event(b, T0, booking("cast-3", booking_time=1770000000)),
            event(p, T0, payment("cast-3", payment_time=None)),
        ),
        (
            event(b, T0, booking("cast-4", booking_time="2026-02-30T10:00:00Z")),
            event(p, T0, payment("cast-4", payment_time="2026-02-08T10:30:00+0530")),
        ),
        # 6. comparisons: NULL and other types fall to ELSE; matching is case-sensitive
        (
            event(b, T0, booking("cmp-1", event_name=None)),
            event(p, T0, payment("cmp-1", payment_method=None)),
        ),
        (
            event(b, T0, booking("cmp-2", event_name="concert")),
            event(p, T0, payment("cmp-2", payment_method="paypal")),
        ),
        (
            event(b, T0, booking("cmp-3", event_name="A Play about a Movie")),
            event(p, T0, payment("cmp-3", payment_method="PayPal")),
        ),
        (
            event(b, T0, booking("cmp-4", event_name=7)),
            event(p, T0, payment("cmp-4", payment_method="Debit Card")),
        ),
        # 7. seats: missing, null, empty (no rows), not an array (unreadable), odd elements
        (event(b, T0, booking("seats-1", seats=None)), event(p, T0, payment("seats-1"))),
        (event(b, T0, booking("seats-2", seats=[])), event(p, T0, payment("seats-2"))),
        (event(b, T0, booking("seats-3", seats="A1")), event(p, T0, payment("seats-3"))),
        (
            event(
                b, T0, booking("seats-4", seats=[1, None, {"seat_number": 5, "price": "75"}, {}])
            ),
            event(p, T0, payment("seats-4")),
        ),
        # 8. malformed bodies; integers and fractions
        (event(b, T0, b"{oops"), event(p, T0, b"[]"), event(p, T0, b"\xff\xfe")),
        (
            event(b, T0, booking("num", seats=({"seat_number": "A1", "price": 75.25},))),
            event(p, T0, payment("num", amount=True)),
        ),
        # 9. wrong types read as NULL; nested records that are not records
        (
            event(b, T0, booking("types", customer="Ana", event_id=42)),
            event(p, T0, payment("types", payment_id={"id": 1}, amount="75")),
        ),
        # 10. unicode
        (
            event(b, T0, booking("ünï-😀", event_name="Concierto Concert ♫")),
            event(p, T0, payment("ünï-😀", payment_method="PayPal")),
        ),
    ]
    events = [e for case in cases for e in case]
    rows = assert_parity(events, tmp_path)
    joined = {row[0] for row in rows}
    assert {"time-1", "bound-0", "bound-120", "many", "ünï-😀", "seats-4"} <= joined
    assert not {"time-2", "bound-over", "bound-early", "seats-1", "seats-2", "seats-3"} & joined
    assert sum(count for row, count in rows.items() if row[0] == "many") == 8


# --- randomized event sets --------------------------------------------------------------------

odd = st.sampled_from([None, 7, 1.5, True, [], {}, "", "ß"])
texts = st.text(max_size=8) | odd
names = (
    st.sampled_from(
        ["Rock Concert", "Broadway Play", "Movie Night", "concert", "Play Movie", "Comedy"]
    )
    | texts
)
methods = st.sampled_from(["Credit Card", "Debit Card", "PayPal", "paypal", "Cash"]) | odd
times = (
    st.sampled_from(
        [
            "2026-02-08T10:30:00Z",
            "2026-02-08 10:30:00",
            "2026-02-08T10:30:00.1234567+05:30",
            "2026-02-08",
            "x",
        ]
    )
    | odd
)
prices = st.integers(0, 500) | st.floats(0, 500, allow_nan=False) | odd
seat = st.fixed_dictionaries({}, optional={"seat_number": texts, "price": prices}) | odd
seat_lists = st.lists(seat, max_size=4) | st.sampled_from([None, "A1", 3])
# enqueued offsets: anywhere, or on the join's and the windows' edges
offsets = st.integers(0, 300 * SECOND) | st.sampled_from(
    [0, 1, 1000, 30 * SECOND - 1, 30 * SECOND, 120 * SECOND, 120 * SECOND + 1, 150 * SECOND]
)
delays = st.integers(-5 * SECOND, 200 * SECOND) | st.sampled_from(
    [-1000, -1, 0, 1, 120 * SECOND - 1, 120 * SECOND, 120 * SECOND + 1]
)


@st.composite
def event_sets(draw):
    """A few orders with their bookings and payments, plus noise, for one order-id namespace."""
    orders = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3))
    documents = []
    for order in orders:
        booked = draw(offsets)
        document = booking(
            order,
            seats=draw(seat_lists),
            event_name=draw(names),
            booking_time=draw(times),
        )
        if draw(st.booleans()):
            del document["customer"]["email"]
        copies = draw(st.integers(1, 2))  # a booking sent twice
        documents += [(BOOKING_HUB, booked, document)] * copies
        for n in range(draw(st.integers(0, 2))):
            documents.append(
                (
                    PAYMENT_HUB,
                    booked + draw(delays),
                    payment(
                        order,
                        f"p{n}",
                        payment_method=draw(methods),
                        amount=draw(prices),
                        payment_time=draw(times),
                    ),
                )
            )
    if draw(st.booleans()):
        documents.append(
            (
                draw(st.sampled_from([BOOKING_HUB, PAYMENT_HUB])),
                draw(offsets),
                draw(st.sampled_from([b"{", b"1", b'"s"'])),
            )
        )
    return documents


@settings(max_examples=25, deadline=None)  # each example: up to 40 event sets, one Beam run
@given(st.lists(event_sets(), min_size=1, max_size=40))
def test_randomized_event_sets(tmp_path_factory, sets):
    directory = tmp_path_factory.mktemp("parity")
    events = []
    for index, documents in enumerate(sets):
        for sequence, (hub, offset, document) in enumerate(documents):
            if isinstance(document, dict):  # a namespace of order ids per set
                document = dict(document, order_id=f"s{index}-{document['order_id']}")
            events.append(event(hub, T0 + max(offset, 0), document, sequence, partition=str(index)))
    expected = Counter(evaluate(events).rows)
    actual = Counter(beam_facts(events, directory))
    if actual != expected:
        # report the smallest differing set (hypothesis then shrinks the whole example)
        by_set = {}
        for row in (expected - actual) + (actual - expected):
            by_set.setdefault(row[0].split("-")[0], []).append(row)
        smallest = min(by_set, key=lambda key: len(sets[int(key[1:])]))
        raise AssertionError(
            f"event set {smallest} differs:\n{sets[int(smallest[1:])]}\n"
            + differences(
                Counter({r: c for r, c in expected.items() if r[0].startswith(smallest + "-")}),
                Counter({r: c for r, c in actual.items() if r[0].startswith(smallest + "-")}),
            )
        )
