"""The report's queries, written once as SQLAlchemy Core expressions.

The first four are the original project's ("Verify Data Pipeline": recent bookings; bookings and
revenue by event_category; count and average amount by payment_type and payment_method; bookings
by booking_hour); bms adds bookings by day of week and payments per order (retries). SQLAlchemy
compiles each for the warehouse's dialect (``LIMIT`` on SQLite and PostgreSQL, ``TOP`` on Synapse
/ SQL Server); nothing here is dialect text. Results are sorted in Python, so NULLs and ties come
out in the same order whatever the database's collation and NULL ordering.

Every query filters on ``booking_event_time`` in ``[start, end)`` when given, as ``bms parity``
does, and counts both rows (``COUNT(*)``, as the original) and orders (``COUNT(DISTINCT
order_id)``); see the package docstring.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from pipeline.errors import RuntimeFailure, UsageError
from pipeline.io.warehouses import create_engine, masked_url, synapse
from pipeline.io.warehouses.base import describe_error
from pipeline.schema import FACT_COLUMNS, FACT_SCHEMA, FACT_TABLE

__all__ = [
    "DAYS",
    "QUERIES",
    "QUERY_NAMES",
    "Column",
    "Report",
    "Section",
    "Summary",
    "fact_table",
    "open_engine",
    "run_report",
]

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
DEFAULT_RECENT = 20

_TYPES: dict[str, Callable[[], sa.types.TypeEngine]] = {
    "FLOAT": sa.Float,
    "INT": sa.Integer,
    "DATETIME2": sa.DateTime,
}


@dataclass(frozen=True)
class Column:
    """A column of a report table: its key in JSON/CSV, its heading, and how to show values:
    ``text``, ``count``, ``money`` (two decimals), ``share`` (0..1, shown as a percentage) or
    ``time``."""

    key: str
    heading: str
    kind: str = "text"


@dataclass
class Section:
    """One query's result: ``rows`` are tuples in ``columns`` order."""

    name: str
    title: str
    note: str
    columns: tuple[Column, ...]
    rows: list[tuple] = field(default_factory=list)

    def records(self) -> list[dict]:
        return [dict(zip((c.key for c in self.columns), row, strict=True)) for row in self.rows]


@dataclass
class Summary:
    rows: int
    orders: int
    payments: int
    seat_price_sum: float | None
    first_booking_event_time: dt.datetime | None
    last_booking_event_time: dt.datetime | None


@dataclass
class Report:
    warehouse: str  # fit to print: no password
    table: str
    start: dt.datetime | None
    end: dt.datetime | None
    generated_at: dt.datetime  # naive UTC
    summary: Summary
    sections: list[Section]

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)


# ---- the table ----


def fact_table(dialect: str, name: str = FACT_TABLE) -> sa.Table:
    """The 20 fact columns of table ``name`` (``SCHEMA.NAME`` or ``NAME``: schema
    ``bookymyshow`` except on SQLite, as the writers lay it out). Only the original 20 columns:
    a table ASA wrote, without bms's ``row_key``, reports as well."""
    schema, _, table = name.rpartition(".")
    if not schema and dialect != "sqlite":
        schema = FACT_SCHEMA
    types = {
        c.name: _TYPES.get(c.sql_type, sa.Unicode)() for c in FACT_COLUMNS
    }  # NVARCHAR(n) -> Unicode
    return sa.Table(
        table,
        sa.MetaData(),
        *(sa.Column(column, type_) for column, type_ in types.items()),
        schema=schema or None,
    )


# ---- the queries ----

Where = Sequence[sa.ColumnElement[bool]]


def _rows() -> sa.ColumnElement:
    return sa.func.count()


def _orders(facts: sa.Table) -> sa.ColumnElement:
    return sa.func.count(sa.distinct(facts.c.order_id))


def summary_query(facts: sa.Table, where: Where) -> sa.Select:
    c = facts.c
    return sa.select(
        _rows().label("row_count"),
        _orders(facts).label("order_count"),
        sa.func.count(sa.distinct(c.payment_id)).label("payment_count"),
        sa.func.sum(c.seat_price).label("seat_price_sum"),
        sa.func.min(c.booking_event_time).label("first_time"),
        sa.func.max(c.booking_event_time).label("last_time"),
    ).where(*where)


RECENT_COLUMNS = (
    Column("booking_time", "booking_time", "time"),
    Column("order_id", "order_id"),
    Column("customer_name", "customer"),
    Column("event_name", "event"),
    Column("event_category", "category"),
    Column("seat_number", "seat"),
    Column("seat_price", "seat_price", "money"),
    Column("payment_id", "payment_id"),
    Column("payment_method", "payment_method"),
    Column("amount", "amount", "money"),
)


def recent_query(facts: sa.Table, where: Where, limit: int) -> sa.Select:
    """``SELECT TOP n ... ORDER BY booking_time DESC``, NULL times last on every database (SQL
    Server has no ``NULLS LAST``), ties broken by order, seat and payment."""
    c = facts.c
    null_last = sa.case(
        (c.booking_time.is_(None), sa.literal_column("1")), else_=sa.literal_column("0")
    )
    return (
        sa.select(*(c[column.key] for column in RECENT_COLUMNS))
        .where(*where)
        .order_by(null_last, c.booking_time.desc(), c.order_id, c.seat_number, c.payment_id)
        .limit(limit)
    )


def categories_query(facts: sa.Table, where: Where) -> sa.Select:
    c = facts.c
    return (
        sa.select(
            c.event_category,
            _orders(facts).label("order_count"),
            _rows().label("row_count"),
            sa.func.sum(c.seat_price).label("seat_price_sum"),
        )
        .where(*where)
        .group_by(c.event_category)
    )


def payments_query(facts: sa.Table, where: Where) -> sa.Select:
    c = facts.c
    return (
        sa.select(
            c.payment_type,
            c.payment_method,
            sa.func.count(sa.distinct(c.payment_id)).label("payment_count"),
            _rows().label("row_count"),
            sa.func.avg(c.amount).label("avg_amount_per_row"),
        )
        .where(*where)
        .group_by(c.payment_type, c.payment_method)
    )


def payment_averages_query(facts: sa.Table, where: Where) -> sa.Select:
    """The average amount per payment (each payment once, however many seats it paid)."""
    c = facts.c
    payments = (
        sa.select(c.payment_type, c.payment_method, c.payment_id, c.amount)
        .distinct()
        .where(*where)
        .subquery("payments")
    )
    p = payments.c
    return sa.select(
        p.payment_type, p.payment_method, sa.func.avg(p.amount).label("avg_amount")
    ).group_by(p.payment_type, p.payment_method)


def hours_query(facts: sa.Table, where: Where) -> sa.Select:
    c = facts.c
    return (
        sa.select(c.booking_hour, _orders(facts).label("order_count"), _rows().label("row_count"))
        .where(*where)
        .group_by(c.booking_hour)
    )


def days_query(facts: sa.Table, where: Where) -> sa.Select:
    c = facts.c
    return (
        sa.select(
            c.booking_day_of_week, _orders(facts).label("order_count"), _rows().label("row_count")
        )
        .where(*where)
        .group_by(c.booking_day_of_week)
    )


def retries_query(facts: sa.Table, where: Where) -> sa.Select:
    """How many orders have 0, 1, 2... distinct payments in the table."""
    c = facts.c
    per_order = (
        sa.select(c.order_id, sa.func.count(sa.distinct(c.payment_id)).label("payment_count"))
        .where(*where)
        .group_by(c.order_id)
        .subquery("per_order")
    )
    return sa.select(per_order.c.payment_count, sa.func.count().label("order_count")).group_by(
        per_order.c.payment_count
    )


# ---- sections: run a query, shape its rows ----


def _none_last(value) -> tuple:
    return (value is None, value if value is not None else 0)


def _text_key(value) -> tuple:
    return (value is None, "" if value is None else str(value))


def _recent(conn, facts, where, limit) -> Section:
    rows = [tuple(row) for row in conn.execute(recent_query(facts, where, limit))]
    return Section(
        "recent",
        f"Recent bookings: the latest {limit} rows by booking_time",
        "One row per (seat, payment) pair, newest booking_time first (the original's SELECT TOP "
        "100 * ... ORDER BY booking_time DESC; --recent sets how many).",
        RECENT_COLUMNS,
        rows,
    )


def _categories(conn, facts, where, _limit) -> Section:
    rows = sorted(
        (tuple(row) for row in conn.execute(categories_query(facts, where))),
        key=lambda row: (-row[2], _text_key(row[0])),
    )
    return Section(
        "categories",
        "Bookings and revenue by event category",
        "orders: distinct order_id; rows: (seat, payment) pairs, the original's COUNT(*); "
        "seat_price sum: SUM(seat_price) over rows, as the original's total_revenue (a seat paid "
        "twice counts twice).",
        (
            Column("event_category", "event_category"),
            Column("orders", "orders (distinct)", "count"),
            Column("rows", "rows", "count"),
            Column("seat_price_sum", "seat_price sum (rows)", "money"),
        ),
        rows,
    )


def _payments(conn, facts, where, _limit) -> Section:
    per_payment = {
        (row.payment_type, row.payment_method): row.avg_amount
        for row in conn.execute(payment_averages_query(facts, where))
    }
    rows = sorted(
        (
            (
                row.payment_type,
                row.payment_method,
                row.payment_count,
                row.row_count,
                per_payment.get((row.payment_type, row.payment_method)),
                row.avg_amount_per_row,
            )
            for row in conn.execute(payments_query(facts, where))
        ),
        key=lambda row: (-row[3], _text_key(row[0]), _text_key(row[1])),
    )
    return Section(
        "payments",
        "Payments by payment type and method",
        "payments: distinct payment_id; rows: (seat, payment) pairs, the original's "
        "transaction_count; avg amount per row is the original's AVG(amount) (a payment counts "
        "once per seat it paid), per payment counts each payment once.",
        (
            Column("payment_type", "payment_type"),
            Column("payment_method", "payment_method"),
            Column("payments", "payments (distinct)", "count"),
            Column("rows", "rows", "count"),
            Column("avg_amount_per_payment", "avg amount per payment", "money"),
            Column("avg_amount_per_row", "avg amount per row", "money"),
        ),
        rows,
    )


def _hours(conn, facts, where, _limit) -> Section:
    rows = sorted(
        (tuple(row) for row in conn.execute(hours_query(facts, where))),
        key=lambda row: _none_last(row[0]),
    )
    return Section(
        "hours",
        "Bookings by hour of booking_time (UTC)",
        "booking_hour 0-23 from booking_time; empty when booking_time was unreadable. orders: "
        "distinct order_id; rows: (seat, payment) pairs, the original's booking_count.",
        (
            Column("booking_hour", "booking_hour"),
            Column("orders", "orders (distinct)", "count"),
            Column("rows", "rows", "count"),
        ),
        rows,
    )


def _days(conn, facts, where, _limit) -> Section:
    order = {day: index for index, day in enumerate(DAYS)}
    rows = sorted(
        (tuple(row) for row in conn.execute(days_query(facts, where))),
        key=lambda row: (order.get(row[0], len(DAYS)), _text_key(row[0])),
    )
    return Section(
        "days",
        "Bookings by day of week of booking_time (UTC)",
        "orders: distinct order_id; rows: (seat, payment) pairs.",
        (
            Column("booking_day_of_week", "booking_day_of_week"),
            Column("orders", "orders (distinct)", "count"),
            Column("rows", "rows", "count"),
        ),
        rows,
    )


def _retries(conn, facts, where, _limit) -> Section:
    counts = sorted(
        ((row.payment_count, row.order_count) for row in conn.execute(retries_query(facts, where))),
    )
    total = sum(orders for _, orders in counts)
    rows = [(payments, orders, orders / total) for payments, orders in counts]
    retried = sum(orders for payments, orders in counts if payments > 1)
    share = f"{retried / total:.1%}" if total else "none"
    return Section(
        "retries",
        "Payments per order (retries)",
        f"Orders with more than one payment: {retried:,} of {total:,} ({share}). A failed "
        "payment and its retry, both within 2 minutes of the booking, give the order two "
        "payments (and each of its seats two rows).",
        (
            Column("payments", "payments per order"),
            Column("orders", "orders", "count"),
            Column("share", "share of orders", "share"),
        ),
        rows,
    )


_SECTIONS = {
    "recent": _recent,
    "categories": _categories,
    "payments": _payments,
    "hours": _hours,
    "days": _days,
    "retries": _retries,
}
QUERY_NAMES: tuple[str, ...] = tuple(_SECTIONS)

#: Every statement the report runs, by name, for a table and filter (the tests compile them for
#: each dialect).
QUERIES: dict[str, Callable[[sa.Table, Where], sa.Select]] = {
    "summary": summary_query,
    "recent": lambda facts, where: recent_query(facts, where, DEFAULT_RECENT),
    "categories": categories_query,
    "payments": payments_query,
    "payment_averages": payment_averages_query,
    "hours": hours_query,
    "days": days_query,
    "retries": retries_query,
}


# ---- connecting ----


def open_engine(url: str) -> sa.Engine:
    """An engine for a warehouse URL (see ``pipeline.io.warehouses``), for reading.

    Synapse / SQL Server (``mssql+pyodbc://`` or an ODBC string) connects through
    ``synapse.connect`` (SQL authentication or an Entra ID token, as the writer does) under
    SQLAlchemy's ``mssql`` dialect. A SQLite file must exist: reading never creates one.
    """
    if synapse.is_odbc_target(url):
        target = synapse.parse_target(url)
        if target.dialect == synapse.POSTGRES:
            raise UsageError(
                "bms report reads PostgreSQL through postgresql+psycopg://USER@HOST/DB, not an "
                "ODBC connection string"
            )
        synapse.require_pyodbc()
        return sa.create_engine(
            "mssql+pyodbc://", creator=lambda: synapse.connect(target), hide_parameters=True
        )
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise UsageError(
            f"--warehouse {url!r} is not a database URL; try sqlite:///path/to/warehouse.db"
        ) from None
    if (
        parsed.get_backend_name() == "sqlite"
        and parsed.query.get("uri") != "true"
        and parsed.database not in (None, "", ":memory:")
        and not Path(parsed.database).is_file()
    ):
        raise UsageError(
            f"no warehouse at {parsed.database}: run bms run first, or give --warehouse"
        )
    try:
        return create_engine(url)
    except (ImportError, sa.exc.NoSuchModuleError):
        raise UsageError(
            f"--warehouse {masked_url(url)}: its database driver is not installed (PostgreSQL: "
            "pip install -e '.[postgres]' and postgresql+psycopg://...)"
        ) from None


def run_report(
    url: str,
    table: str = FACT_TABLE,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    recent: int = DEFAULT_RECENT,
    queries: Sequence[str] = QUERY_NAMES,
    engine: sa.Engine | None = None,
) -> Report:
    """Runs the summary and the chosen queries (``QUERY_NAMES``, in that order) in one read
    transaction. Raises ``UsageError`` for a URL, driver or table that is not there, and
    ``RuntimeFailure`` when the database cannot be reached or refuses a query."""
    own_engine = engine is None
    engine = engine or open_engine(url)
    facts = fact_table(engine.dialect.name, table)
    where = []
    if start is not None:
        where.append(facts.c.booking_event_time >= start)
    if end is not None:
        where.append(facts.c.booking_event_time < end)
    shown = masked_url(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(facts.name, schema=facts.schema):
                raise UsageError(
                    f"no table {facts.fullname} in {shown}: run bms run first, or give --table"
                )
            totals = conn.execute(summary_query(facts, where)).one()
            sections = [
                _SECTIONS[name](conn, facts, where, recent)
                for name in QUERY_NAMES
                if name in queries
            ]
    except sa.exc.DBAPIError as error:
        raise RuntimeFailure(
            f"cannot read {facts.fullname} in {shown}: {describe_error(error)}"
        ) from None
    finally:
        if own_engine:
            engine.dispose()
    return Report(
        warehouse=shown,
        table=facts.fullname,
        start=start,
        end=end,
        generated_at=dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0),
        summary=Summary(
            totals.row_count,
            totals.order_count,
            totals.payment_count,
            totals.seat_price_sum,
            totals.first_time,
            totals.last_time,
        ),
        sections=sections,
    )
