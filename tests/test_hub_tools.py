"""``bms hub ls`` and ``bms hub export``: exporting a hub and replaying the file into an empty hub
gives the same events byte for byte (bodies, partition keys, enqueued times, and partitions and
sequence numbers), the listing's counts and times, the clock-ahead warning, and the same code
over a client that is not the local hub (Event Hubs' shape: partitions that start after 0)."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter

import orjson
import pytest

from pipeline.cli import main
from pipeline.commands import hub as hub_command
from pipeline.io.hubs import OutgoingEvent, PartitionProperties
from pipeline.io.hubs.local import LocalHub
from pipeline.schema import BOOKING_HUB, HUBS, PAYMENT_HUB, HubEvent, datetime_to_micros
from tests.conftest import booking_body, payment_body

BASE = datetime_to_micros(dt.datetime(2026, 2, 8, 10, 0, 0))


def replay(hub_path, hub_name: str, file) -> int:
    """``bms replay`` of FILE into one event hub of the local hub at hub_path."""
    return main(["replay", "--hub-name", hub_name, "--hub", str(hub_path), str(file)])


def hub_contents(path) -> dict[str, list[tuple]]:
    """Every event of every hub in a local hub file, as stored: partition, sequence number,
    enqueued time, partition key, body bytes."""
    with LocalHub(path) as hub:
        return {
            name: [
                (e.partition, e.sequence_number, e.enqueued_time, e.partition_key, e.body)
                for partition in hub.partition_ids(name)
                for e in hub.read(name, partition, 0, 2**62)
            ]
            for name in hub.hubs()
        }


def awkward_events() -> dict[str, list[OutgoingEvent]]:
    """Bookings and payments with what a byte-for-byte copy can get wrong: microsecond times,
    ties across partitions, times clamped to their partition's latest, unicode (beyond the BMP too),
    escapes, a NUL, bodies that are not JSON or are JSON with odd spacing, an empty body, keys
    with spaces and quotes, and more than one read page (hub export reads 1000 at a time)."""
    bookings, payments = [], []
    for n in range(1200):
        key = f"order_{n}"
        moment = BASE + n * 1_000_003  # microseconds apart, not whole seconds
        bookings.append(OutgoingEvent(key, booking_body(key), moment))
        payments.append(OutgoingEvent(key, payment_body(key, f"pay_{n}"), moment + 30_000_000))
    odd = [
        OutgoingEvent("order_1", '{"order_id": "order_1",  "name": "Zoë 🎟 ✓"}'.encode(), BASE),
        OutgoingEvent("order_2", b'{"note": "tab\\t quote\\" nul\\u0000"}', BASE),
        OutgoingEvent("order_3", b"not json at all {", BASE - 5_000_000),  # clamped: never back
        OutgoingEvent('key "quoted" with spaces', b"", BASE + 1),
        OutgoingEvent("order_4", b"raw \x00 nul and \xc3\xa9", BASE + 7),
    ]
    return {BOOKING_HUB: bookings + odd, PAYMENT_HUB: payments + odd[:2]}


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.db"
    with LocalHub(path) as hub:
        for name, events in awkward_events().items():
            hub.append(name, events[:700])  # in two appends, as a producer would
            hub.append(name, events[700:])
    return path


def test_export_then_replay_into_a_fresh_hub_round_trips_byte_for_byte(source, tmp_path, capsys):
    fresh = tmp_path / "fresh.db"
    for name in HUBS:
        exported = tmp_path / f"{name}.jsonl"
        assert main(["hub", "export", "--hub", str(source), "--hub-name", name, str(exported)]) == 0
        assert f"exported {len(awkward_events()[name])} events of {name}" in (
            capsys.readouterr().err
        )
        assert replay(fresh, name, exported) == 0
        # The replayed hub exports to the very same bytes.
        again = tmp_path / f"{name}.again.jsonl"
        assert main(["hub", "export", "--hub", str(fresh), "--hub-name", name, str(again)]) == 0
        assert again.read_bytes() == exported.read_bytes()
    assert hub_contents(fresh) == hub_contents(source)

    lines = (tmp_path / f"{BOOKING_HUB}.jsonl").read_bytes().splitlines()
    first = orjson.loads(lines[0])
    assert list(first) == ["enqueued_time", "partition_key", "body"]
    assert first["enqueued_time"] == "2026-02-08T10:00:00Z"
    assert any(orjson.loads(line)["enqueued_time"].endswith(".000003Z") for line in lines)


def test_events_without_a_partition_key_keep_body_and_time(tmp_path):
    source, fresh = tmp_path / "source.db", tmp_path / "fresh.db"
    events = [OutgoingEvent(None, f'{{"n": {n}}}'.encode(), BASE + n) for n in range(9)]
    with LocalHub(source) as hub:
        hub.append(BOOKING_HUB, events)
    exported = tmp_path / "b.jsonl"
    assert (
        main(["hub", "export", "--hub", str(source), "--hub-name", BOOKING_HUB, str(exported)]) == 0
    )
    assert replay(fresh, BOOKING_HUB, exported) == 0
    # The hub places keyless events round robin itself; what they are is kept.
    assert Counter(e[2:] for e in hub_contents(fresh)[BOOKING_HUB]) == Counter(
        (BASE + n, None, f'{{"n": {n}}}'.encode()) for n in range(9)
    )


def test_export_to_standard_output_writes_the_same_lines(source, tmp_path, capfdbinary):
    exported = tmp_path / "p.jsonl"
    assert (
        main(["hub", "export", "--hub", str(source), "--hub-name", PAYMENT_HUB, str(exported)]) == 0
    )
    capfdbinary.readouterr()
    assert main(["hub", "export", "--hub", str(source), "--hub-name", PAYMENT_HUB, "-"]) == 0
    assert capfdbinary.readouterr().out == exported.read_bytes()


def test_a_body_that_is_not_utf8_fails_the_export_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "source.db"
    with LocalHub(source) as hub:
        hub.append(
            BOOKING_HUB, [OutgoingEvent("k", b"ok", BASE), OutgoingEvent("k", b"\xff", BASE)]
        )
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"kept\n")
    assert (
        main(["hub", "export", "--hub", str(source), "--hub-name", BOOKING_HUB, str(target)]) == 3
    )
    error = capsys.readouterr().err
    assert "partition" in error and "sequence 1" in error and "not UTF-8" in error
    assert target.read_bytes() == b"kept\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.jsonl")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ls", "--hub", "{tmp}/missing.db"], "no hub at {tmp}/missing.db: publish events first"),
        (
            ["export", "--hub", "bookingtopic", "{tmp}/x.jsonl"],
            "--hub is the hub file or eventhubs:// URL: name the event hub with --hub-name "
            "bookingtopic",
        ),
        (["export", "--hub", "{tmp}/source.db", "{tmp}/x.jsonl"], "name the event hub to export"),
        (
            ["ls", "--hub", "{tmp}/source.db", "--hub-name", "nope"],
            "no event hub 'nope' in {tmp}/source.db (it has: bookingtopic, paymentstopic)",
        ),
    ],
)
def test_bad_hub_arguments_give_one_line(source, tmp_path, capsys, args, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["hub", *argv]) == 2
    error = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "x.jsonl").exists()
    with LocalHub(source) as hub:
        assert hub.hubs() == list(HUBS)  # looking created no hub


def test_hub_ls_lists_partitions_counts_and_times(source, capsys):
    assert main(["hub", "ls", "--hub", str(source)]) == 0
    out = capsys.readouterr().out
    contents = hub_contents(source)
    for name in HUBS:
        per_partition = Counter(event[0] for event in contents[name])
        for partition, count in per_partition.items():
            line = next(
                line
                for line in out.splitlines()
                if line.startswith(f"│ {name} ") and f"│ {partition:>9} │" in line
            )
            assert f"│ {count:>6,} │" in line and f"0–{count - 1}" in line
        assert f"{len(contents[name]):,}" in out
    assert "│ 2026-02-08T10:00:00Z " in out
    assert "ahead of now" not in out


def test_a_partition_ahead_of_now_is_flagged(tmp_path, capsys, caplog):
    path = tmp_path / "hub.db"
    now = datetime_to_micros(dt.datetime.now(dt.UTC))
    with LocalHub(path) as hub:
        hub.append(BOOKING_HUB, [OutgoingEvent("order_1", b"{}", now - 60_000_000)])
        hub.append(PAYMENT_HUB, [OutgoingEvent("order_1", b"{}", now + 3 * 3600 * 1_000_000)])
    with LocalHub(path) as hub:
        listing = hub_command.list_partitions(hub, hub.hubs(), now_micros=now)
    assert [(i.hub, i.events, i.ahead_by) for i in listing if i.events] == [
        (BOOKING_HUB, 1, None),
        (PAYMENT_HUB, 1, pytest.approx(3 * 3600)),
    ]
    with caplog.at_level(logging.WARNING):
        assert main(["hub", "ls", "--hub", str(path)]) == 0
    assert "clock 3 hours ahead of now" in capsys.readouterr().out
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"of {PAYMENT_HUB} is 3 hours ahead of now" in warning


class FakeEventHubs:
    """A ``HubClient`` shaped like Event Hubs: fixed partitions, events already expired from
    the start of a partition (its first sequence number is not 0), reads capped per call."""

    def __init__(self, events: dict[str, dict[str, list[HubEvent]]]):
        self.events = events

    def partition_ids(self, hub):
        return list(self.events[hub])

    def partition_properties(self, hub, partition):
        held = self.events[hub][partition]
        if not held:
            return PartitionProperties(partition, 0, -1, None)
        return PartitionProperties(
            partition, held[0].sequence_number, held[-1].sequence_number, held[-1].enqueued_time
        )

    def read(self, hub, partition, from_sequence_number, max_events):
        held = [e for e in self.events[hub][partition] if e.sequence_number >= from_sequence_number]
        return held[: min(max_events, 7)]

    def close(self):
        pass


def test_the_same_code_lists_and_exports_a_hub_that_is_not_local(tmp_path):
    events = {
        BOOKING_HUB: {
            "0": [
                HubEvent(BOOKING_HUB, "0", s, BASE + s * 10, f"k{s}", b"{}") for s in range(40, 60)
            ],
            "1": [],
        },
        PAYMENT_HUB: {"0": [], "1": []},
    }
    client = FakeEventHubs(events)
    assert hub_command.hub_names(client, "eventhubs://ns") == list(HUBS)
    listing = hub_command.list_partitions(client, [BOOKING_HUB], now_micros=BASE)
    assert [
        (i.partition, i.events, i.first_sequence_number, i.first_enqueued) for i in listing
    ] == [
        ("0", 20, 40, BASE + 400),
        ("1", 0, None, None),
    ]
    lines = []
    totals = hub_command.export(client, BOOKING_HUB, lines.append)
    assert totals.events == 20 == len(lines)
    assert [orjson.loads(line)["partition_key"] for line in lines] == [
        f"k{s}" for s in range(40, 60)
    ]


def test_the_hub_comes_from_the_environment(source, monkeypatch, capsys):
    monkeypatch.setenv("BMS_HUB", str(source))
    assert main(["hub", "ls", "--hub-name", PAYMENT_HUB]) == 0
    out = capsys.readouterr().out
    assert f"event hubs in {source}" in out and BOOKING_HUB not in out


def test_a_typo_in_an_action_s_option_gets_a_suggestion(source, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["hub", "ls", "--hub", str(source), "--hubname", PAYMENT_HUB])
    assert raised.value.code == 2
    assert "unknown option --hubname; did you mean --hub-name?" in capsys.readouterr().err


def test_hub_grow_adds_partitions_to_a_local_hub_and_never_removes_any(source, capsys):
    grow = ["hub", "grow", "--hub", str(source), "--hub-name", BOOKING_HUB]
    assert main([*grow, "--partition-count", "6"]) == 0
    assert capsys.readouterr().out == f"{BOOKING_HUB} in {source}: 4 partitions, now 6\n"
    with LocalHub(source) as hub:
        assert hub.partition_ids(BOOKING_HUB) == ["0", "1", "2", "3", "4", "5"]
        assert len(hub.partition_ids(PAYMENT_HUB)) == 4
    assert main([*grow, "--partition-count", "2"]) == 2
    assert "has 6 partitions: none can be removed" in capsys.readouterr().err
    assert main(grow) == 2
    assert "--partition-count" in capsys.readouterr().err
    assert main(["hub", "grow", "--hub", "eventhubs://ns", "--hub-name", BOOKING_HUB,
                 "--partition-count", "8"]) == 2  # fmt: skip
    assert "az eventhubs eventhub update --partition-count" in capsys.readouterr().err
