"""Parity: the Beam pipeline writes exactly the rows the ASA query gives on the same events.

The ASA side is the reference evaluator running ``sql/stream_analytics_job_query.sql``; the Beam
side is ``ComputeFacts`` over timestamped events, written through the real warehouse sink into
SQLite and read back. Rows are compared as multisets of 20-tuples of typed values: timestamps to
the microsecond, floats exactly (75.0 is not 75), NULLs as NULLs. The events ASA would drop must
be exactly the pipeline's dead letters.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import apache_beam as beam
import orjson
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import TimestampedValue
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.io.warehouses import WriteToWarehouse, read_dead_letters, read_facts
from pipeline.options import JOIN_MODES
from pipeline.parity.evaluator import evaluate
from pipeline.pipeline import ComputeFacts
from pipeline.schema import BOOKING_HUB, PAYMENT_HUB, HubEvent, decode_fact_row
from tests.conftest import booking_document as booking
from tests.conftest import one_row_batches
from tests.conftest import payment_document as payment

SECOND = 1_000_000
T0 = 1_770_000_000 * SECOND  # on a window start for every period that divides 30 s


class BeamRun:
    """One ComputeFacts run over many events, with one of the join modes (``--join``): its fact
    rows and dead-letter positions."""

    def __init__(self, events: list[HubEvent], directory, join: str):
        warehouse = f"sqlite:///{directory / 'beam.db'}"
        options = PipelineOptions([], runner="DirectRunner", direct_running_mode="in_memory")
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
            result = streams | ComputeFacts(join=join)
            unstorable = result["facts"] | "Write facts" >> WriteToWarehouse(warehouse)
            (
                (result["dead_letters"], unstorable)
                | beam.Flatten()
                | one_row_batches()
                | WriteToWarehouse(warehouse, target="dead_letters")
            )
        letters = read_dead_letters(warehouse)
        # A row the warehouse cannot store is still a row ASA computes: it waits in dead letters.
        self.rows = read_facts(warehouse) + [
            decode_fact_row(letter.body)[:20] for letter in letters if letter.is_fact_row
        ]
        self.dead_letters = [position(letter) for letter in letters if not letter.is_fact_row]


def position(event) -> tuple[str, str, int]:
    return (event.hub, event.partition, event.sequence_number)


def typed(rows) -> Counter:
    """Rows as a multiset of (type, value) tuples, so 75 and 75.0 (or True and 1) differ."""
    return Counter(tuple((type(v).__name__, v) for v in row) for row in rows)


def differences(expected: Counter, actual: Counter) -> str:
    """The typed rows one side lacks, printed as plain rows (reprs show 75 against 75.0)."""
    lines = []
    for title, rows in (
        ("missing from Beam", expected - actual),
        ("extra in Beam", actual - expected),
    ):
        lines.append(f"{title} ({sum(rows.values())}):")
        lines += [f"  {n} x {tuple(value for _, value in row)}" for row, n in rows.items()]
    return "\n".join(lines)


def event(hub, micros, document, sequence=0, partition="0"):
    body = document if isinstance(document, bytes) else orjson.dumps(document)
    return HubEvent(hub, partition, sequence, micros, None, body)


# --- every rule of asa-semantics.md on hand-written cases --------------------------------------

B, P = BOOKING_HUB, PAYMENT_HUB
TWO_SEATS = ({"seat_number": "A1", "price": 5}, {"seat_number": "A2", "price": 5.5})
CASES = {
    # 1. event time is the enqueued time, not the payload's times; each seat row carries it
    "time-1": [
        (B, 0, booking("time-1", seats=TWO_SEATS)),
        (P, 30 * SECOND, payment("time-1", payment_time="2030-01-01T00:00:00Z")),
    ],
    "time-2": [(B, 0, booking("time-2")), (P, 150 * SECOND, payment("time-2"))],
    # 2. the bound is inclusive elapsed time: 0, exactly 120 s, 1 µs past, 1 µs and 1 ms early,
    # and across the sliding windows' edges (T0 is a window start)
    "bound-0": [(B, 7, booking("bound-0")), (P, 7, payment("bound-0"))],
    "bound-120": [(B, 7, booking("bound-120")), (P, 7 + 120 * SECOND, payment("bound-120"))],
    "bound-over": [(B, 0, booking("bound-over")), (P, 120 * SECOND + 1, payment("bound-over"))],
    "bound-early": [(B, 1000, booking("bound-early")), (P, 0, payment("bound-early"))],
    "bound-1us": [(B, 1, booking("bound-1us")), (P, 0, payment("bound-1us"))],
    "bound-edge": [(B, -1, booking("bound-edge")), (P, 120 * SECOND - 1, payment("bound-edge"))],
    # 3. many-to-many: a failed payment and its retry, a booking sent twice, a payment sent twice
    "many": [
        (B, 0, booking("many", seats=TWO_SEATS)),
        (B, SECOND, booking("many", seats=TWO_SEATS)),
        (P, 9 * SECOND, payment("many", "failed", payment_status="Failed")),
        (P, 29 * SECOND, payment("many", "retry")),
    ],
    "twice": [(B, 0, booking("twice")), (P, SECOND, payment("twice"))] * 2,
    # 3. NULL, missing or non-string order ids never join
    "null-id": [(B, 0, booking(None)), (P, SECOND, payment(None))],
    "no-id": [
        (B, 0, {k: v for k, v in booking("x").items() if k != "order_id"}),
        (P, 0, {k: v for k, v in payment("x").items() if k != "order_id"}),
    ],
    "number-id": [(B, 0, booking(7)), (P, 0, payment(7))],
    # 5. TRY_CAST: offsets, no offset, 7 digits truncated, date only, unparsable, not a string,
    # impossible dates and times, whitespace, years leaving 0001-9999 through the offset
    "cast-1": [
        (B, 0, booking("cast-1", booking_time="2026-02-08T23:30:00-08:00")),
        (P, 0, payment("cast-1", payment_time="2026-02-08 10:30:00.9999999")),
    ],
    "cast-2": [
        (B, 0, booking("cast-2", booking_time="2026-02-08")),
        (P, 0, payment("cast-2", payment_time="soon")),
    ],
    "cast-3": [
        (B, 0, booking("cast-3", booking_time=1770000000)),
        (P, 0, payment("cast-3", payment_time=None)),
    ],
    "cast-4": [
        (B, 0, booking("cast-4", booking_time="2026-02-30T10:00:00Z")),
        (P, 0, payment("cast-4", payment_time="2026-02-08T10:30:00+0530")),
    ],
    "cast-5": [
        (B, 0, booking("cast-5", booking_time="2026-02-08T24:00:00")),
        (P, 0, payment("cast-5", payment_time="2026-02-08T23:59:60Z")),
    ],
    "cast-6": [
        (B, 0, booking("cast-6", booking_time=" 2026-02-08T10:30:00+14:00\n")),
        (P, 0, payment("cast-6", payment_time="2026-02-08T10:30:00+14:30")),
    ],
    "cast-7": [
        (B, 0, booking("cast-7", booking_time="0001-01-01T00:30:00+01:00")),
        (P, 0, payment("cast-7", payment_time="9999-12-31T23:30:00-01:00")),
    ],
    # 6. comparisons: NULL and other types fall to ELSE; matching is case-sensitive; first wins
    "cmp-1": [
        (B, 0, booking("cmp-1", event_name=None)),
        (P, 0, payment("cmp-1", payment_method=None)),
    ],
    "cmp-2": [
        (B, 0, booking("cmp-2", event_name="concert")),
        (P, 0, payment("cmp-2", payment_method="paypal")),
    ],
    "cmp-3": [
        (B, 0, booking("cmp-3", event_name="A Play about a Movie")),
        (P, 0, payment("cmp-3", payment_method="PayPal")),
    ],
    "cmp-4": [
        (B, 0, booking("cmp-4", event_name=7)),
        (P, 0, payment("cmp-4", payment_method="Debit Card")),
    ],
    "cmp-5": [
        (B, 0, booking("cmp-5", event_name="The Movie")),
        (P, 0, payment("cmp-5", payment_method=" Credit Card")),
    ],
    # 7. seats missing, null, empty (no rows), not an array (dead letter), odd elements
    "seats-1": [(B, 0, booking("seats-1", seats=None)), (P, 0, payment("seats-1"))],
    "seats-2": [(B, 0, booking("seats-2", seats=[])), (P, 0, payment("seats-2"))],
    "seats-3": [(B, 0, booking("seats-3", seats="A1")), (P, 0, payment("seats-3"))],
    "seats-4": [
        (B, 0, booking("seats-4", seats=[1, None, {"seat_number": 5, "price": "75"}, {}])),
        (P, 0, payment("seats-4")),
    ],
    "seats-5": [(B, 0, booking("seats-5", seats={"A1": 5})), (P, 0, payment("seats-5"))],
    "seats-6": [
        (B, 0, {**booking("seats-6"), "event_details": "Rock Concert"}),
        (P, 0, payment("seats-6")),
    ],
    # 7. missing fields read as NULL
    "missing": [
        (B, 0, {k: v for k, v in booking("missing").items() if k != "customer"}),
        (P, 0, {k: v for k, v in payment("missing").items() if k != "amount"}),
    ],
    # 8. malformed bodies (dead letters); integers and fractions
    "malformed": [
        (B, 0, b"{oops"),
        (P, 0, b"[]"),
        (P, 0, b"\xff\xfe"),
        (P, 0, b'{"order_id": "malformed", "amount": NaN}'),
        (B, 0, b'{"order_id": "malformed",}'),
        (P, 0, b'{"order_id": "malformed", "amount": 1e999}'),
        (P, 0, b'{"order_id": "malformed\\ud800"}'),
        (B, 0, b"null"),
    ],
    "num": [
        (B, 0, booking("num", seats=({"seat_number": "A1", "price": 75.25},))),
        (P, 0, payment("num", amount=True)),
    ],
    "big": [  # past int64 reads as a float; orjson cannot write 2**64, so splice it in
        (
            B,
            0,
            orjson.dumps(booking("big")).replace(b'"price":75', b'"price":18446744073709551616'),
        ),
        (P, 0, payment("big", amount=-(2**63))),
    ],
    # 8. a repeated key keeps its last value
    "dup-key": [
        (B, 0, orjson.dumps(booking("dup-key")).replace(b"{", b'{"order_id":"zz",', 1)),
        (P, 0, payment("dup-key")),
    ],
    # 9. wrong types read as NULL; nested records that are not records
    "types": [
        (B, 0, booking("types", customer="Ana", event_id=42)),
        (P, 0, payment("types", payment_id={"id": 1}, amount="75")),
    ],
    # unicode everywhere
    "ünï-😀": [
        (B, 0, booking("ünï-😀", event_name="Concierto Concert ♫")),
        (P, 0, payment("ünï-😀", payment_method="PayPal")),
    ],
}


@pytest.mark.parametrize("join", JOIN_MODES)
def test_edge_cases_of_every_rule(tmp_path, join):
    events = [
        event(hub, T0 + offset, document, sequence=n)
        for n, (hub, offset, document) in enumerate(e for case in CASES.values() for e in case)
    ]
    expected = evaluate(events)
    beam_run = BeamRun(events, tmp_path, join)
    assert typed(beam_run.rows) == typed(expected.rows), differences(
        typed(expected.rows), typed(beam_run.rows)
    )
    assert sorted(beam_run.dead_letters) == sorted(position(e) for e in expected.dropped)

    rows = Counter(row[0] for row in expected.rows)
    joined = {"time-1", "bound-0", "bound-120", "bound-edge", "many", "twice", "ünï-😀"}
    assert joined | {"seats-4", "missing", "dup-key", "big"} <= set(rows)
    assert not {"time-2", "bound-over", "bound-early", "bound-1us", "zz"} & set(rows)
    assert not {"seats-1", "seats-2", "seats-3", "seats-5", "seats-6", "malformed"} & set(rows)
    assert (rows["time-1"], rows["many"], rows["twice"], rows["seats-4"]) == (2, 8, 4, 4)
    assert len(expected.dropped) == 10  # eight malformed bodies, seats "A1" and {"A1": 5}


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


@st.composite
def iso_texts(draw) -> str:
    """ISO 8601-like text from parts, edge values included (hour 24, second 60, +14:30...)."""
    date = draw(st.sampled_from(["2026-02-08", "2024-02-29", "2026-02-29", "0001-01-01"]))
    clock = draw(
        st.sampled_from(["", "T10:30", " 00:00:00", "T23:59:59", "T24:00:00", "T23:59:60"])
    )
    fraction = (
        draw(st.sampled_from(["", ".5", ".123456", ".9999999", ".12345678"])) if clock else ""
    )
    offset = draw(st.sampled_from(["", "Z", "+05:30", "-0800", "+14:00", "-14:30", "+01:00"]))
    space = draw(st.sampled_from(["", " ", "\t", "\u3000"]))
    return space + date + clock + fraction + (offset if clock else "") + space


times = st.sampled_from(["2026-02-08T10:30:00Z", "x"]) | iso_texts() | odd
prices = st.integers(-1, 500) | st.floats(allow_nan=False, allow_infinity=False) | odd
seat = st.fixed_dictionaries({}, optional={"seat_number": texts, "price": prices}) | odd
seat_lists = st.lists(seat, max_size=4) | st.sampled_from([None, "A1", 3, {"A1": 5}])
# enqueued offsets: anywhere, or on the join's and the windows' edges
offsets = st.integers(0, 300 * SECOND) | st.sampled_from(
    [0, 1, 1000, 30 * SECOND - 1, 30 * SECOND, 120 * SECOND, 120 * SECOND + 1, 150 * SECOND]
)
delays = st.integers(-5 * SECOND, 200 * SECOND) | st.sampled_from(
    [-1000, -1, 0, 1, 120 * SECOND - 1, 120 * SECOND, 120 * SECOND + 1]
)
# what can go wrong with a whole body, applied after the order ids are namespaced
MANGLES: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda body: body,
    "truncated": lambda body: body[:-1],
    "trailing comma": lambda body: body[:-1] + b",}",
    "NaN": lambda body: body[:-1] + b',"amount":NaN}',
    "repeated key": lambda body: body.replace(b'"order_id":"', b'"order_id":"x","order_id":"', 1),
    "array": lambda body: b"[" + body + b"]",
}
mangles = st.sampled_from(["none"] * 6 + list(MANGLES))


def without_some_fields(draw, document: dict) -> dict:
    """The document with a few fields (top level or nested) removed."""
    for key in draw(st.lists(st.sampled_from(sorted(document)), max_size=2, unique=True)):
        if isinstance(document[key], dict) and document[key] and draw(st.booleans()):
            nested = dict(document[key])
            nested.pop(draw(st.sampled_from(sorted(nested))))
            document = {**document, key: nested}
        elif key != "order_id" or draw(st.integers(0, 5)) == 0:
            document = {k: v for k, v in document.items() if k != key}
    return document


@st.composite
def event_sets(draw):
    """A few orders with their bookings and payments, plus noise, for one order-id namespace.

    Each event is ``(hub, enqueued offset, document or bytes, mangle)``.
    """
    orders = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3))
    events = []
    for order in orders:
        booked = draw(offsets)
        document = booking(
            order, seats=draw(seat_lists), event_name=draw(names), booking_time=draw(times)
        )
        if draw(st.integers(0, 3)) == 0:
            document = without_some_fields(draw, document)
        copies = draw(st.integers(1, 2))  # a booking sent twice
        events += [(BOOKING_HUB, booked, document, draw(mangles))] * copies
        for n in range(draw(st.integers(0, 2))):
            document = payment(
                order,
                f"p{n}",
                payment_method=draw(methods),
                amount=draw(prices),
                payment_time=draw(times),
            )
            if draw(st.integers(0, 3)) == 0:
                document = without_some_fields(draw, document)
            copies = draw(st.integers(1, 2))  # a payment sent twice
            events += [(PAYMENT_HUB, booked + draw(delays), document, draw(mangles))] * copies
    if draw(st.booleans()):
        hub = draw(st.sampled_from([BOOKING_HUB, PAYMENT_HUB]))
        events.append((hub, draw(offsets), draw(st.sampled_from([b"{", b"1", b'"s"'])), "none"))
    return events


def hub_events(sets: list[list]) -> list[HubEvent]:
    """The event sets as hub events: set i in partition i, its order ids prefixed with s{i}-."""
    events = []
    for index, documents in enumerate(sets):
        for sequence, (hub, offset, document, mangle) in enumerate(documents):
            if isinstance(document, dict):
                if isinstance(document.get("order_id"), str):
                    document = dict(document, order_id=f"s{index}-{document['order_id']}")
                document = MANGLES[mangle](orjson.dumps(document))
            events.append(event(hub, T0 + max(offset, 0), document, sequence, str(index)))
    return events


@pytest.mark.parametrize("join", JOIN_MODES)
@settings(max_examples=30, deadline=None)  # each example: 15 to 40 event sets, one Beam run
@given(st.lists(event_sets(), min_size=15, max_size=40))
def test_randomized_event_sets(tmp_path_factory, join, sets):
    events = hub_events(sets)
    evaluation = evaluate(events)
    beam_run = BeamRun(events, tmp_path_factory.mktemp("parity"), join)
    expected, actual = typed(evaluation.rows), typed(beam_run.rows)
    dropped = Counter(position(e) for e in evaluation.dropped)
    dead_letters = Counter(beam_run.dead_letters)
    if actual == expected and dropped == dead_letters:
        return
    # report the smallest differing set (hypothesis then shrinks the whole example)
    rows = (expected - actual) + (actual - expected)
    positions = (dropped - dead_letters) + (dead_letters - dropped)
    differing = {set_of(row[0][1]) for row in rows} | {int(p[1]) for p in positions}
    if None in differing:  # a row outside every set's namespace: show everything
        raise AssertionError(differences(expected, actual))
    smallest = min(differing, key=lambda index: len(sets[index]))

    def of_set(rows: Counter) -> Counter:
        return Counter({row: n for row, n in rows.items() if set_of(row[0][1]) == smallest})

    raise AssertionError(
        f"event set {smallest} differs:\n{sets[smallest]}\n"
        + differences(of_set(expected), of_set(actual))
        + f"\nASA would drop: {sorted(p for p in dropped if p[1] == str(smallest))}"
        + f"\nBeam dead letters: {sorted(p for p in dead_letters if p[1] == str(smallest))}"
    )


def set_of(order_id: str) -> int | None:
    """The event set an order id belongs to (see hub_events)."""
    match = re.match(r"s(\d+)-", order_id)
    return int(match.group(1)) if match else None
