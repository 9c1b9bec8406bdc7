"""``bms report``: its numbers against the same questions asked in plain SQL written here, on
SQLite and PostgreSQL (``scripts/setup-services``); its SQL as Synapse would get it; the output
formats; and the HTML page opened in a real headless Chromium (Debian's ``chromium``, installed by
``scripts/setup-services``): no console errors, every chart drawn with a size, a screenshot kept
in ``.bms/artifacts/report.png`` (or ``$BMS_ARTIFACTS``)."""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
import os
import random
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import sqlglot
from sqlalchemy.dialects import mssql

from pipeline.cli import main
from pipeline.commands import report as report_command
from pipeline.io.warehouses import write_rows
from pipeline.report.queries import QUERIES, fact_table
from pipeline.schema import FACT_SCHEMA
from tests.conftest import POSTGRES_URL, missing, postgres_or_skip

ARTIFACTS = Path(os.environ.get("BMS_ARTIFACTS") or Path(__file__).parents[1] / ".bms/artifacts")
START = dt.datetime(2026, 2, 2)  # a Monday

EVENTS = {
    "Rock Concert": "Music",
    "Jazz Night Concert": "Music",
    "Hamlet Play": "Theater",
    "Movie Premiere": "Cinema",
    "Football Match": "Other",
}
METHODS = {"Credit Card": "Card", "Debit Card": "Card", "PayPal": "Online", "UPI": "Cash"}
DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def fact_rows(orders: int = 120, seed: int = 7) -> list[tuple]:
    """Fact rows (the 20 columns) as the pipeline makes them: one per (seat, payment); orders of
    1-4 seats over two weeks, a quarter paid twice (a retry), some with an unreadable
    booking_time (no hour, no day), one with no payment_id; every order's time on the second."""
    rand = random.Random(seed)
    rows = []
    for n in range(orders):
        booked_at = START + dt.timedelta(seconds=rand.randrange(14 * 86400))
        event = rand.choice(list(EVENTS))
        price = rand.choice((50.0, 75.0, 100.0, 150.25))
        seats = [f"{rand.choice('ABCD')}{i}" for i in range(rand.randint(1, 4))]
        unreadable = n % 17 == 5
        booking_time = None if unreadable else booked_at
        payments = 2 if rand.random() < 0.25 else 1
        for p in range(payments):
            method = rand.choice(list(METHODS))
            paid_at = booked_at + dt.timedelta(seconds=30 + 40 * p)
            payment_id = None if n == 11 else f"p{n}_{p}"
            for seat in seats:
                rows.append(
                    (
                        f"o{n}", booking_time, f"c{n % 9}", f"Customer {n % 9}",
                        f"c{n % 9}@example.com", f"e{n % 5}", event, "1 Main St", seat, price,
                        EVENTS[event], None if unreadable else DAY_NAMES[booked_at.weekday()],
                        None if unreadable else booked_at.hour, payment_id, paid_at,
                        price * len(seats), method, METHODS[method], booked_at, paid_at,
                    )
                )  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def rows() -> list[tuple]:
    return fact_rows()


@pytest.fixture(params=["sqlite", "postgresql"])
def warehouse(request, tmp_path, rows):
    """(url, table name, engine) of a fresh fact table holding ``rows``: a SQLite file, or a
    table of a fresh name in schema bookymyshow of the PostgreSQL test database (dropped
    afterwards)."""
    table = f"report_{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'warehouse.db'}"
        write_rows(url, rows, fact_table=table)
        engine = sa.create_engine(url)
        yield url, table, engine
        engine.dispose()
        return
    engine = postgres_or_skip()
    write_rows(POSTGRES_URL, rows, fact_table=table)
    yield POSTGRES_URL, table, engine
    with engine.begin() as connection:
        connection.execute(sa.text(f'DROP TABLE IF EXISTS {FACT_SCHEMA}."{table}"'))
    engine.dispose()


def report_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["report", "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


# ---- the numbers, against plain SQL written here ----


class Plain:
    """The report's questions as plain SQL text, written independently of pipeline.report."""

    def __init__(self, engine: sa.Engine, table: str, start=None, end=None):
        self.engine = engine
        sqlite = engine.dialect.name == "sqlite"
        self.table = f'"{table}"' if sqlite else f'{FACT_SCHEMA}."{table}"'
        # SQLAlchemy keeps SQLite DATETIME as 'YYYY-MM-DD HH:MM:SS.ffffff' text: compare as such.
        shown = (lambda t: t.strftime("%Y-%m-%d %H:%M:%S.%f")) if sqlite else (lambda t: t)
        conditions, self.params = [], {}
        if start is not None:
            conditions.append("booking_event_time >= :start")
            self.params["start"] = shown(start)
        if end is not None:
            conditions.append("booking_event_time < :end")
            self.params["end"] = shown(end)
        self.where = f"WHERE {' AND '.join(conditions)}" if conditions else ""

    def all(self, sql: str) -> list[tuple]:
        with self.engine.connect() as connection:
            text = sql.format(t=self.table, where=self.where)
            return [tuple(row) for row in connection.execute(sa.text(text), self.params)]


def as_time(value) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value.removesuffix("Z"))
    return value


@pytest.mark.parametrize(
    "time_range",
    [(None, None), (START + dt.timedelta(days=3), START + dt.timedelta(days=10, hours=5))],
    ids=["all", "range"],
)
def test_the_report_gives_the_numbers_plain_sql_gives(warehouse, rows, time_range, capsys):
    url, table, engine = warehouse
    start, end = time_range
    args = ["--warehouse", url, "--table", table, "--recent", "7"]
    if start:
        args += ["--from", start.isoformat() + "Z", "--to", end.isoformat() + "Z"]
    got = report_json(capsys, *args)
    sql = Plain(engine, table, start, end)
    queries = got["queries"]

    (total,) = sql.all(
        "SELECT COUNT(*), COUNT(DISTINCT order_id), COUNT(DISTINCT payment_id), SUM(seat_price),"
        " MIN(booking_event_time), MAX(booking_event_time) FROM {t} {where}"
    )
    summary = got["summary"]
    assert (summary["rows"], summary["orders"], summary["payments"]) == total[:3]
    assert summary["seat_price_sum"] == pytest.approx(total[3])
    assert as_time(summary["first_booking_event_time"]) == as_time(total[4])
    assert as_time(summary["last_booking_event_time"]) == as_time(total[5])
    assert total[0] > 0 and (start is not None or total[0] == len(rows))
    assert got["from"] == (start.isoformat() + "Z" if start else None)

    categories = {
        r[0]: (r[1], r[2], pytest.approx(r[3]))
        for r in sql.all(
            "SELECT event_category, COUNT(DISTINCT order_id), COUNT(*), SUM(seat_price) "
            "FROM {t} {where} GROUP BY event_category"
        )
    }
    assert {
        r["event_category"]: (r["orders"], r["rows"], r["seat_price_sum"])
        for r in queries["categories"]["rows"]
    } == categories
    row_counts = [r["rows"] for r in queries["categories"]["rows"]]
    assert row_counts == sorted(row_counts, reverse=True)

    per_payment = dict(
        ((r[0], r[1]), r[2])
        for r in sql.all(
            "SELECT payment_type, payment_method, AVG(amount) FROM (SELECT DISTINCT "
            "payment_type, payment_method, payment_id, amount FROM {t} {where}) d "
            "GROUP BY payment_type, payment_method"
        )
    )
    payments = {
        (r[0], r[1]): (r[2], r[3], pytest.approx(per_payment[r[0], r[1]]), pytest.approx(r[4]))
        for r in sql.all(
            "SELECT payment_type, payment_method, COUNT(DISTINCT payment_id), COUNT(*), "
            "AVG(amount) FROM {t} {where} GROUP BY payment_type, payment_method"
        )
    }
    assert {
        (r["payment_type"], r["payment_method"]): (
            r["payments"],
            r["rows"],
            r["avg_amount_per_payment"],
            r["avg_amount_per_row"],
        )
        for r in queries["payments"]["rows"]
    } == payments

    hours = sql.all(
        "SELECT booking_hour, COUNT(DISTINCT order_id), COUNT(*) FROM {t} {where} "
        "GROUP BY booking_hour"
    )
    assert [(r["booking_hour"], r["orders"], r["rows"]) for r in queries["hours"]["rows"]] == (
        sorted(hours, key=lambda r: (r[0] is None, r[0] or 0))
    )
    assert queries["hours"]["rows"][-1]["booking_hour"] is None  # unreadable times, last

    days = dict(
        (r[0], (r[1], r[2]))
        for r in sql.all(
            "SELECT booking_day_of_week, COUNT(DISTINCT order_id), COUNT(*) FROM {t} {where} "
            "GROUP BY booking_day_of_week"
        )
    )
    got_days = [r["booking_day_of_week"] for r in queries["days"]["rows"]]
    assert got_days == [d for d in (*DAY_NAMES, None) if d in days]
    assert {
        r["booking_day_of_week"]: (r["orders"], r["rows"]) for r in queries["days"]["rows"]
    } == days

    retries = sql.all(
        "SELECT n, COUNT(*) FROM (SELECT order_id, COUNT(DISTINCT payment_id) AS n FROM {t} "
        "{where} GROUP BY order_id) per_order GROUP BY n ORDER BY n"
    )
    orders = sum(count for _, count in retries)
    assert [(r["payments"], r["orders"], r["share"]) for r in queries["retries"]["rows"]] == [
        (n, count, pytest.approx(count / orders)) for n, count in retries
    ]
    assert {n for n, _ in retries} >= {1, 2}
    retried = sum(count for n, count in retries if n > 1)
    assert f"{retried:,} of {orders:,}" in queries["retries"]["note"]

    recent = sql.all(
        "SELECT booking_time, order_id, customer_name, event_name, event_category, seat_number,"
        " seat_price, payment_id, payment_method, amount FROM {t} {where} "
        "ORDER BY booking_time IS NULL, booking_time DESC, order_id, seat_number, payment_id "
        "LIMIT 7"
    )
    assert [
        (as_time(r["booking_time"]), *list(r.values())[1:]) for r in queries["recent"]["rows"]
    ] == [(as_time(r[0]), *r[1:]) for r in recent]


def test_every_query_compiles_for_synapse_as_t_sql():
    """Synapse gets the same statements through SQLAlchemy's mssql dialect: TOP, not LIMIT; no
    NULLS LAST; no alias T-SQL reserves; each parses as T-SQL."""
    facts = fact_table("mssql")
    where = [facts.c.booking_event_time >= START, facts.c.booking_event_time < START]
    for name, build in QUERIES.items():
        text = str(
            build(facts, where).compile(
                dialect=mssql.dialect(), compile_kwargs={"literal_binds": True}
            )
        )
        sqlglot.parse_one(text, read="tsql")
        assert "bookymyshow.bookings_fact" in text, name
        assert "LIMIT" not in text and "NULLS" not in text, name
        assert not re.search(r"\bAS (rows|first|last|order|percent)\b", text, re.I), name
        assert ("TOP 20" in text) == (name == "recent"), name


def test_a_table_asa_wrote_without_row_key_reports_too(tmp_path, rows, capsys):
    url = f"sqlite:///{tmp_path / 'asa.db'}"
    engine = sa.create_engine(url)
    table = fact_table("sqlite", "asa_facts")
    table.create(engine)
    with engine.begin() as connection:
        connection.execute(
            table.insert(), [dict(zip(table.c.keys(), row, strict=True)) for row in rows]
        )
    engine.dispose()
    got = report_json(capsys, "--warehouse", url, "--table", "asa_facts", "--query", "days")
    assert got["summary"]["rows"] == len(rows)
    assert list(got["queries"]) == ["days"]


# ---- output formats ----


def test_terminal_tables_and_csv(tmp_path, rows, capsys):
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    write_rows(url, rows)
    capsys.readouterr()
    assert main(["report", "--warehouse", url]) == 0
    out = capsys.readouterr().out
    for title in (
        "Recent bookings: the latest 20 rows by booking_time",
        "Bookings and revenue by event category",
        "Payments by payment type and method",
        "Bookings by hour of booking_time (UTC)",
        "Bookings by day of week of booking_time (UTC)",
        "Payments per order (retries)",
    ):
        assert title in out
    assert f"rows ((seat, payment) pairs): {len(rows):,}" in out
    assert "orders (distinct)" in out and "range: all rows" in out
    table_lines = [line for line in out.splitlines() if line.startswith("│ Music ")]
    assert table_lines and "\x1b[" not in out  # no colour codes when not a terminal

    got = report_json(capsys, "--warehouse", url)
    assert main(["report", "--warehouse", url, "--format", "csv", "--query", "categories"]) == 0
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["event_category"] for r in records] == [
        r["event_category"] for r in got["queries"]["categories"]["rows"]
    ]
    assert [int(r["orders"]) for r in records] == [
        r["orders"] for r in got["queries"]["categories"]["rows"]
    ]
    assert main(["report", "--warehouse", url, "--format", "csv"]) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == [
        "# recent", "# categories", "# payments", "# hours", "# days", "# retries",
    ]  # fmt: skip
    assert blocks[3].splitlines()[1] == "booking_hour,orders,rows"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--warehouse", "sqlite:///{tmp}/nowhere.db"], 2, "no warehouse at"),
        (["--warehouse", "sqlite:///{tmp}/w.db", "--table", "nope"], 2, "no table nope in"),
        (["--warehouse", "sqlite:///{tmp}/w.db", "--from", "yesterday"], 2, "--from 'yesterday'"),
        (["--warehouse", "sqlite:///{tmp}/w.db", "--refresh", "5"], 2, "give --html FILE too"),
        (["--warehouse", "sqlite:///{tmp}/w.db", "--html", "{tmp}/no/r.html"], 2, "no folder"),
        (["--warehouse", "not a url"], 2, "is not a database URL"),
        (
            ["--warehouse", "postgresql+psycopg://bms:secret@127.0.0.1:1/x"],
            3,
            "cannot read bookymyshow.bookings_fact in postgresql+psycopg://bms:***@127.0.0.1:1/x",
        ),
    ],
)
def test_bad_report_arguments_give_one_line(tmp_path, capsys, args, code, message):
    write_rows(f"sqlite:///{tmp_path / 'w.db'}", fact_rows(3))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["report", *argv]) == code
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1 and "secret" not in error
    assert not (tmp_path / "nowhere.db").exists()


def test_refresh_rewrites_the_page_until_ctrl_c(tmp_path, rows, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    write_rows(url, rows[:10])
    page = tmp_path / "live.html"
    pauses = []

    def sleep(seconds):
        pauses.append(seconds)
        if len(pauses) == 1:  # the stream writes more rows while the page is up
            assert f"{10:,}</b>rows" in page.read_text()
            write_rows(url, rows[10:25])
            return
        raise KeyboardInterrupt

    monkeypatch.setattr(report_command.time, "sleep", sleep)
    assert main(["report", "--warehouse", url, "--html", str(page), "--refresh", "2.5"]) == 0
    text = page.read_text()
    assert pauses == [2.5, 2.5]
    assert '<meta http-equiv="refresh" content="2.5">' in text
    assert f"{25:,}</b>rows" in text
    assert capsys.readouterr().out == ""  # with --html, the page is the output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- the page in a real browser ----

SIZES_SCRIPT = """<script>
(() => {
  const size = (e) => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
  const all = (selector) => [...document.querySelectorAll(selector)];
  const found = {
    charts: all("svg.chart").map((e) => [e.dataset.chart, ...size(e)]),
    bars: all("svg.chart rect.bar").map(
      (e) => [e.closest("svg").dataset.chart, e.dataset.label, +e.dataset.value, ...size(e)]),
    tables: all("table.data").map((e) => [e.dataset.table, ...size(e)]),
    height: document.documentElement.scrollHeight,
  };
  const out = document.createElement("pre");
  out.id = "bms-sizes";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
})();
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    missing("no Chromium: scripts/setup-services installs Debian's chromium package")


def run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with its own profile, console messages logged to stderr, and no
    network: any request for another address fails (and logs a console error)."""
    command = [
        browser,
        "--headless",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    # Chromium's sandbox refuses root and needs user namespaces some CI containers lack; the
    # pages opened here are the test's own files.
    command.insert(1, "--no-sandbox")
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_the_html_report_renders_in_headless_chromium(tmp_path, rows, capsys):
    browser = chromium()
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    write_rows(url, rows)
    page = tmp_path / "report.html"
    assert main(["report", "--warehouse", url, "--html", str(page)]) == 0
    text = page.read_text()
    # Self-contained: nothing to fetch (the SVG namespace is a name, not a request).
    assert not re.search(r"\b(src|href)=|@import|url\(|<link|<script", text)
    assert re.findall(r"https?://[^\s\"'<]+", text) == ["http://www.w3.org/2000/svg"] * 7
    got = report_json(capsys, "--warehouse", url)
    assert f"<b>{len(rows):,}</b>rows" in text and "all rows" in text

    # A control: a page with a console error must be caught, or the check below proves nothing.
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><p>x</p><script>console.error('control')</script>")
    logged = run_chromium(browser, tmp_path / "profile", "--dump-dom", control.as_uri())
    assert any("control" in line for line in console_messages(logged.stderr))

    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", SIZES_SCRIPT + "</body>"))
    shown = run_chromium(browser, tmp_path / "profile", "--dump-dom", probe.as_uri())
    assert console_messages(shown.stderr) == []
    match = re.search(r'<pre id="bms-sizes">(.*?)</pre>', shown.stdout, re.S)
    assert match, shown.stdout[-2000:]
    sizes = json.loads(html.unescape(match.group(1)))

    charts = {name: (width, height) for name, width, height in sizes["charts"]}
    assert set(charts) == {
        "categories-orders", "categories-revenue", "payments-count", "payments-average",
        "hours", "days", "retries",
    }  # fmt: skip
    assert all(width > 100 and height > 100 for width, height in charts.values()), charts
    drawn = [bar for bar in sizes["bars"] if bar[2] > 0]
    assert all(width > 0 and height > 0 for *_, width, height in drawn), drawn
    categories = got["queries"]["categories"]["rows"]
    assert sorted(label for chart, label, *_ in drawn if chart == "categories-orders") == sorted(
        r["event_category"] for r in categories
    )
    hours = {r["booking_hour"] for r in got["queries"]["hours"]["rows"]}
    assert len([b for b in sizes["bars"] if b[0] == "hours"]) == 24 + (None in hours)
    assert len([b for b in drawn if b[0] == "days"]) == len(got["queries"]["days"]["rows"])
    assert [name for name, width, height in sizes["tables"] if width > 0 and height > 0] == [
        "recent", "categories", "payments", "hours", "days", "retries",
    ]  # fmt: skip

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    shutil.copy(page, ARTIFACTS / "report.html")
    taken = run_chromium(
        browser,
        tmp_path / "profile",
        "--hide-scrollbars",
        f"--window-size=1280,{min(int(sizes['height']) + 20, 16000)}",
        f"--screenshot={screenshot}",
        page.as_uri(),
    )
    assert console_messages(taken.stderr) == []
    image = screenshot.read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and len(image) > 50_000


def test_synapse_is_read_through_the_mssql_dialect_and_the_writer_s_sign_in():
    from pipeline.errors import UsageError
    from pipeline.report.queries import open_engine

    try:
        import pyodbc  # noqa: F401
    except ImportError:
        missing("no pyodbc: pip install -e '.[synapse]'")
    engine = open_engine("mssql+pyodbc://bms@ws.sql.azuresynapse.net/pool")  # connects lazily
    assert engine.dialect.name == "mssql"
    assert fact_table(engine.dialect.name).fullname == "bookymyshow.bookings_fact"
    with pytest.raises(UsageError, match="postgresql\\+psycopg://"):
        open_engine("Driver={PostgreSQL Unicode};Server=127.0.0.1;Database=bms_test")


def test_the_warehouse_comes_from_the_environment_and_help_hides_its_password(
    tmp_path, rows, monkeypatch, capsys
):
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    write_rows(url, rows)
    monkeypatch.setenv("BMS_WAREHOUSE", url)
    assert report_json(capsys, "--query", "hours")["summary"]["rows"] == len(rows)
    monkeypatch.setenv("BMS_WAREHOUSE", "postgresql+psycopg://bms:s3cret@db.example/bms")
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "postgresql+psycopg://bms:***@db.example/bms" in text and "s3cret" not in text
