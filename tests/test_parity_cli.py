"""``bms parity``: finds planted differences between fact tables and passes on equal ones."""

from __future__ import annotations

import datetime as dt
import re

import pytest
import sqlalchemy as sa

from pipeline.cli import main
from pipeline.commands import parity as parity_command
from pipeline.io.warehouses import write_rows
from pipeline.parity.compare import compare
from tests.conftest import produce_into

T = dt.datetime(2026, 2, 8, 10, 30)


def fact(order_id, seat="A1", payment_id="p1", amount=75.0, booked=T):
    return (
        order_id, T, "c1", "Ana", "ana@example.com", "e1", "Rock Concert", "1 Main St", seat,
        75.0, "Music", "Sunday", 10, payment_id, T, amount, "PayPal", "Online", booked,
        booked + dt.timedelta(seconds=30),
    )  # fmt: skip


ROWS = [fact("o1"), fact("o1", seat="A2"), fact("o2", booked=T + dt.timedelta(hours=1)), fact("o3")]


def warehouses(tmp_path, left_rows, right_rows):
    left, right = f"sqlite:///{tmp_path / 'left.db'}", f"sqlite:///{tmp_path / 'right.db'}"
    write_rows(left, left_rows)
    write_rows(right, right_rows)
    return left, right


def test_equal_tables_pass(tmp_path, capsys):
    left, right = warehouses(tmp_path, ROWS, list(reversed(ROWS)))
    assert main(["parity", left, right]) == 0
    assert "equal: every row matches" in capsys.readouterr().out


def test_a_missing_an_extra_and_a_changed_row_are_each_found(tmp_path, capsys):
    changed = fact("o2", amount=80.0, booked=T + dt.timedelta(hours=1))
    right_rows = [ROWS[0], changed, ROWS[3], fact("o9"), ROWS[3]]  # drops A2, duplicates o3
    left, right = warehouses(tmp_path, ROWS, right_rows)
    assert main(["parity", left, right, "--show", "5"]) == 1
    out = capsys.readouterr().out
    assert f"missing from {right} bookings_fact: 1" in out and "'A2'" in out
    assert f"extra in {right} bookings_fact: 2" in out and "'o9'" in out
    assert "rows with changed values: 1\n  amount: 1" in out and "amount: 75.0 -> 80.0" in out


def test_a_time_range_limits_the_comparison(tmp_path):
    left, right = warehouses(tmp_path, ROWS, ROWS[:2] + ROWS[3:])  # o2 is an hour later
    assert main(["parity", left, right]) == 1
    assert main(["parity", left, right, "--to", "2026-02-08T11:00:00Z"]) == 0
    assert main(["parity", left, right, "--from", "2026-02-08T11:00:00"]) == 1


def test_events_mode_compares_the_warehouse_with_the_asa_query(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(parity_command, "READ_PAGE", 7)  # many pages per partition
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'w.db'}"
    produce_into(hub, "--count", "300", "--seed", "3", "--simulate",
          "2026-02-08T10:00:00Z", "--malformed-share", "0.05")  # fmt: skip
    assert main(["run", "--bounded", "--hub", str(hub), "--warehouse", warehouse]) == 0
    capsys.readouterr()
    assert main(["parity", "--events", "--hub", str(hub), "--warehouse", warehouse]) == 0
    out = capsys.readouterr().out
    assert "equal" in out
    dropped = int(re.search(r"events ASA would drop: (\d+); dead letters: \1\n", out).group(1))
    assert dropped > 0

    write_rows(warehouse, [fact("planted")])
    assert main(["parity", "--events", "--hub", str(hub), "--warehouse", warehouse]) == 1
    assert "'planted'" in capsys.readouterr().out


def test_events_mode_finds_a_lost_dead_letter(tmp_path, capsys):
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'w.db'}"
    produce_into(hub, "--count", "100", "--seed", "4", "--simulate",
          "2026-02-08T10:00:00Z", "--malformed-share", "0.1")  # fmt: skip
    assert main(["run", "--bounded", "--hub", str(hub), "--warehouse", warehouse]) == 0
    with sa.create_engine(warehouse).begin() as connection:
        hub_name, partition, sequence = connection.exec_driver_sql(
            "SELECT hub, partition, sequence_number FROM dead_letters LIMIT 1"
        ).one()
        connection.exec_driver_sql(
            "DELETE FROM dead_letters WHERE hub = ? AND partition = ? AND sequence_number = ?",
            (hub_name, partition, sequence),
        )
    capsys.readouterr()
    assert main(["parity", "--events", "--hub", str(hub), "--warehouse", warehouse]) == 1
    out = capsys.readouterr().out
    assert "equal: every row matches" in out  # the facts still match
    assert f"dropped by ASA, not dead-lettered: 1\n  {hub_name} partition {partition} " in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give two warehouse URLs"),
        (["sqlite:///a.db", "--events"], "not both"),
        (["sqlite:///{tmp}/l.db", "sqlite:///{tmp}/l.db", "--left-table", "nope"], "no table nope"),
        (
            ["sqlite:///{tmp}/l.db", "sqlite:///{tmp}/l.db", "--from", "noon"],
            "not an ISO 8601 time",
        ),
    ],
)
def test_bad_parity_arguments_give_one_line(tmp_path, capsys, args, message):
    write_rows(f"sqlite:///{tmp_path / 'l.db'}", ROWS)
    assert main(["parity", *(a.format(tmp=tmp_path) for a in args)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_table_without_the_fact_columns_is_refused(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with sa.create_engine(url).begin() as connection:
        connection.exec_driver_sql("CREATE TABLE bookings_fact (order_id TEXT)")
    assert main(["parity", url, url]) == 2
    assert "has no column(s) booking_time" in capsys.readouterr().err


def test_compare_pairs_rows_by_natural_key():
    result = compare([fact("o1")], [fact("o1", amount=1.0)])
    assert not result.missing and not result.extra
    assert result.mismatches[0].differences == (("amount", 75.0, 1.0),)
