"""``bms parity``: finds planted differences between fact tables and passes on equal ones."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.cli import main
from pipeline.commands import parity as parity_command
from pipeline.io.hubs import OutgoingEvent
from pipeline.io.hubs.local import LocalHub
from pipeline.io.warehouses import masked_url, write_rows
from pipeline.parity.compare import compare
from pipeline.schema import BOOKING_HUB, DEAD_LETTER_TABLE, PAYMENT_HUB, datetime_to_micros
from tests.conftest import booking_body, payment_body, produce_into
from tests.pgcluster import HOST, free_port, throwaway_postgres_fixture

postgres = throwaway_postgres_fixture(scope="module")

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


# ---- exit codes: 2 for what the command line can fix, 3 for what it cannot; one line each ----


def one_line(error: str) -> bool:
    return error.count("\n") == 1 and "Traceback" not in error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{db}", "sqlite:///{tmp}/none.db"], "RIGHT_URL: no SQLite database at {tmp}/none.db"),
        (["{db}", "nope://u@h/db"], "SQLAlchemy has no dialect 'nope'"),
        (["{db}", "not a url"], "RIGHT_URL is not a database URL"),
        (["sqlite:///{tmp}/bad.db", "{db}"], "LEFT_URL: {tmp}/bad.db is not a SQLite database"),
        (["{db}", "{db}", "--right-table", "x.nope"], "no table x.nope in RIGHT_URL sqlite:///"),
        (["--events", "--hub", "{tmp}/none.db", "--warehouse", "{db}"], "no hub at {tmp}/none.db"),
        (["--events", "--hub", "{hub}", "--warehouse", "{facts}"], "no table dead_letters in"),
        (["--events", "--hub", "{hub}", "--warehouse", "{db}", "--query", "{tmp}/q.sql"], "WHERE"),
        (["--events", "--warehouse", "sqlite:///{tmp}/none.db"], "no SQLite database"),
    ],
)
def test_usage_errors_exit_2_in_one_line(tmp_path, capsys, args, message):
    db, facts = f"sqlite:///{tmp_path / 'w.db'}", f"sqlite:///{tmp_path / 'facts.db'}"
    write_rows(db, ROWS)
    write_rows(facts, ROWS)
    with sa.create_engine(facts).begin() as connection:
        connection.exec_driver_sql(f"DROP TABLE {DEAD_LETTER_TABLE}")
    (tmp_path / "bad.db").write_bytes(b"not a database at all" * 100)
    hub = tmp_path / "hub.db"
    LocalHub(hub).close()
    query = parity_command.DEFAULT_QUERY.read_text().replace(
        "FROM [payments] p", "FROM [payments] p WHERE p.amount > 0"
    )
    (tmp_path / "q.sql").write_text(query)
    names = {"tmp": tmp_path, "db": db, "facts": facts, "hub": hub}
    before = set(tmp_path.iterdir())
    assert main(["parity", *(a.format(**names) for a in args)]) == 2
    error = capsys.readouterr().err
    assert message.format(**names) in error and one_line(error), error
    assert set(tmp_path.iterdir()) == before  # no database or hub file created by a typo


def test_an_unreachable_database_exits_3_in_one_line_without_its_password(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'w.db'}"
    write_rows(db, ROWS)
    nowhere = f"postgresql+psycopg://bms:Zq8-hunter2@{HOST}:{free_port()}/nowhere"
    for args in ([db, nowhere], ["--events", "--hub", str(tmp_path), "--warehouse", nowhere]):
        assert main(["parity", *args]) == 3
        error = capsys.readouterr().err
        assert one_line(error) and "Zq8-hunter2" not in error, error
        assert f"cannot read {'RIGHT_URL' if args[0] == db else '--warehouse'} " in error
        assert f"postgresql+psycopg://bms:***@{HOST}:" in error and "Connection refused" in error


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://bms:Zq8-hunter2@h/db",
        "postgresql+psycopg://bms@h/db?password=Zq8-hunter2&sslmode=require",
        "mssql+pyodbc:///?odbc_connect=Driver%3D%7BODBC+Driver+18%7D%3BServer%3Dh%3BPWD%3DZq8-hunter2",
        "Driver={ODBC Driver 18 for SQL Server};Server=h;Database=d;Uid=u;Pwd={Zq8-hunter2;x}",
        "Driver={ODBC Driver 18 for SQL Server};Server=h;Database=d;Uid=u;Password=Zq8-hunter2",
    ],
)
def test_urls_are_shown_without_secrets(url, capsys):
    shown = masked_url(url)
    assert "Zq8-hunter2" not in shown and "pwd=" not in shown.lower(), shown
    assert "h" in shown
    assert main(["parity", "sqlite://", url]) in (2, 3)  # whatever fails, says it safely
    error = capsys.readouterr().err
    assert one_line(error) and "Zq8-hunter2" not in error and "pwd=" not in error.lower(), error
    assert "Zq8-hunter2" not in parity_command._scrub(f"driver said {url}", url)


@pytest.fixture(scope="module")
def secret_postgres(postgres):
    """A database on the throwaway cluster reached with a password nothing else contains."""
    postgres.psql(
        "CREATE ROLE reader LOGIN PASSWORD 'Zq8-hunter2'", "CREATE DATABASE parity OWNER reader"
    )
    return f"postgresql+psycopg://reader:Zq8-hunter2@{HOST}:{postgres.port}/parity"


def test_no_password_in_any_parity_output(tmp_path, capsys, secret_postgres):
    url, masked = secret_postgres, secret_postgres.replace("Zq8-hunter2", "***")
    hub, sqlite = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'w.db'}"
    produce_into(hub, "--count", "60", "--seed", "8", "--simulate", "2026-02-08T10:00:00Z",
                 "--malformed-share", "0.05")  # fmt: skip
    assert main(["run", "--bounded", "--hub", str(hub), "--warehouse", url]) == 0
    assert main(["run", "--bounded", "--hub", str(hub), "--warehouse", sqlite]) == 0
    write_rows(sqlite, [fact("extra")])
    wrong = url.replace("Zq8-hunter2", "Wrong-pw9")
    runs = [
        (["--events", "--hub", str(hub), "--warehouse", url], 0, f"{masked}: "),
        ([url, sqlite], 1, f"extra in {sqlite} bookings_fact: 1"),
        ([sqlite, url, "--show", "3"], 1, f"missing from {masked} bookings_fact: 1"),
        ([url, url], 0, "equal"),
        ([url, sqlite, "--left-table", "nope"], 2, f"no table nope in LEFT_URL {masked}"),
        ([sqlite, wrong], 3, "password authentication failed"),
    ]
    for args, status, expected in runs:
        assert main(["parity", *args]) == status, args
        out, error = capsys.readouterr()
        assert expected in out + error, (args, out, error)
        for secret in ("Zq8-hunter2", "Wrong-pw9"):
            assert secret not in out + error, (args, out, error)


# ---- memory: one booking with 10,000 seats ----

MEASURED_PARITY = """
import resource, sys
from pipeline.cli import main
status = main(sys.argv[1:])
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB", file=sys.stderr)
sys.exit(status)
"""


def test_a_10000_seat_booking_is_compared_in_bounded_memory(tmp_path, report):
    """The evaluator once parsed the whole booking again for each seat and each field it read
    (10,000 x 10,000 seats: 15 GB). Now the booking is read once, whatever its size."""
    hub, warehouse = tmp_path / "hub.db", f"sqlite:///{tmp_path / 'w.db'}"
    booked = datetime_to_micros(dt.datetime(2026, 2, 8, 10, 0))
    seats = [{"seat_number": f"R{n // 100}-{n % 100}", "price": 75.5} for n in range(10_000)]
    with LocalHub(hub) as client:
        bookings = [OutgoingEvent("big", booking_body("big", seats=seats), booked)]
        bookings += [  # other bookings beside it: the unnested rows stopped being constant
            OutgoingEvent(f"o{n}", booking_body(f"o{n}"), booked + n) for n in range(20)
        ]
        client.append(BOOKING_HUB, bookings)
        payments = [
            OutgoingEvent("big", payment_body("big", f"p{n}"), booked + (10 + n) * 1_000_000)
            for n in range(3)
        ]
        payments += [
            OutgoingEvent(f"o{n}", payment_body(f"o{n}", f"q{n}"), booked + 1_000_000)
            for n in range(20)
        ]
        client.append(PAYMENT_HUB, payments)
    assert main(["run", "--bounded", "--hub", str(hub), "--warehouse", warehouse]) == 0
    result = subprocess.run(
        [sys.executable, "-c", MEASURED_PARITY, "parity", "--events", "--hub", str(hub),
         "--warehouse", warehouse],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ASA query over" in result.stdout and ": 30020 rows" in result.stdout
    peak = int(re.search(r"peak RSS (\d+) MB", result.stderr).group(1))
    report(f"bms parity --events, a 10,000-seat booking (30,020 rows): peak RSS {peak} MB")
    assert peak < 1500


def test_parity_reports_as_json_for_scripts(tmp_path, capsys):
    left, right = f"sqlite:///{tmp_path / 'l.db'}", f"sqlite:///{tmp_path / 'r.db'}"
    write_rows(left, ROWS)
    write_rows(right, ROWS[:-1])
    assert main(["parity", left, right, "--output", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["equal"] is False and report["missing_from_right"] == 1
    assert report["left"]["rows"] == len(ROWS) and report["right"]["rows"] == len(ROWS) - 1
