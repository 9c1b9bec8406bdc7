"""The two non-streaming references, each run by the harness as a process of its own:

    python -m bench.reference python BOOKINGS.jsonl PAYMENTS.jsonl
    python -m bench.reference duckdb BOOKINGS.jsonl PAYMENTS.jsonl [--threads 2]

Both read ``bms hub export`` files and print ``{"rows": N}``, the fact rows the ASA query gives.

- ``python``: the floor that per-event Python sets: orjson and ``pipeline.rules`` (the very
  functions the pipeline calls) with a dict join by order_id, every fact row built, none
  written.
- ``duckdb``: the project's reference evaluator (``pipeline.parity.evaluator``) on DuckDB's own
  JSON reader: the ASA query file translated as ``bms parity --events`` translates it, over input
  tables that DuckDB loads from the files itself (the evaluator proper loads them through Python,
  to check every body against ASA's strict JSON rules; the generated events need no such care).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import duckdb
import orjson

from bench.events import enqueued_micros
from pipeline import rules
from pipeline.parity import evaluator
from pipeline.schema import BOOKING_HUB, PAYMENT_HUB


def _events(path: Path):
    """(enqueued micros, body) of each line of an export file."""
    with path.open("rb") as file:
        for line in file:
            record = orjson.loads(line)
            yield enqueued_micros(record["enqueued_time"]), record["body"]


def python_rows(bookings: Path, payments: Path) -> int:
    """Fact rows by plain Python: seats by order_id, then each payment against its order's."""
    seats = defaultdict(list)
    for micros, body in _events(bookings):
        try:
            for row in rules.booking_rows(body):
                if row[0] is not None:
                    seats[row[0]].append((micros, row))
        except rules.MalformedEvent:
            pass
    rows = 0
    for payment_micros, body in _events(payments):
        try:
            payment = rules.payment_row(body)
        except rules.MalformedEvent:
            continue
        for booking_micros, booking in seats.get(payment[0], ()):
            if rules.joins(booking_micros, payment_micros):
                rules.fact_row(booking, booking_micros, payment, payment_micros)
                rows += 1
    return rows


def _json_path(path: tuple[str, ...]) -> str:
    return "'$" + "".join('."' + part.replace('"', '\\"') + '"' for part in path) + "'"


def _load_sql(table: str, file: Path, columns: tuple[evaluator.InputColumn, ...]) -> str:
    """An input table as the evaluator's translation reads it, loaded by DuckDB from an export
    file: a row per event whose body is a JSON object (with arrays where the query unnests),
    its enqueued time, and the JSON at each property path the query reads."""
    selected = [
        f"CAST(CAST(enqueued_time AS TIMESTAMPTZ) AS TIMESTAMP) AS {evaluator.TIMESTAMP_COLUMN}"
    ]
    readable = ["json_valid(body)", "json_type(body) = 'OBJECT'"]
    for column in columns:
        path = _json_path(column.path)
        if column.elements:
            elements = path[:-1] + "[*]'"
            selected.append(
                f"CASE WHEN json_type(body, {path}) = 'ARRAY' "
                f"THEN CAST(json_extract(body, {elements}) AS VARCHAR[]) ELSE [] END "
                f"AS {column.name}"
            )
            readable.append(f"coalesce(json_type(body, {path}) IN ('ARRAY', 'NULL'), true)")
        else:
            selected.append(f"json_extract(body, {path}) AS {column.name}")
    source = (
        f"read_json('{file}', format = 'newline_delimited', "
        "columns = {'enqueued_time': 'VARCHAR', 'body': 'VARCHAR'})"
    )
    return (
        f'CREATE TABLE "{table}" AS SELECT {", ".join(selected)} FROM {source} '
        f"WHERE {' AND '.join(readable)}"
    )


def duckdb_rows(bookings: Path, payments: Path, threads: int = 2) -> int:
    """Fact rows by the evaluator's translation of the ASA query, all in DuckDB."""
    translation = evaluator.translate(evaluator.DEFAULT_QUERY.read_text())
    files = {BOOKING_HUB: bookings, PAYMENT_HUB: payments}
    database = duckdb.connect(config={"threads": threads, "preserve_insertion_order": False})
    try:
        evaluator.prepare(database)
        for table, hub in evaluator.INPUTS.items():
            database.execute(_load_sql(table, files[hub], translation.inputs[table]))
        database.execute(f"CREATE TABLE facts AS {translation.sql}")
        return database.execute("SELECT COUNT(*) FROM facts").fetchone()[0]
    finally:
        database.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engine", choices=("python", "duckdb"))
    parser.add_argument("bookings", type=Path)
    parser.add_argument("payments", type=Path)
    parser.add_argument("--threads", type=int, default=2, help="DuckDB's threads (default: 2)")
    args = parser.parse_args()
    if args.engine == "python":
        rows = python_rows(args.bookings, args.payments)
    else:
        rows = duckdb_rows(args.bookings, args.payments, args.threads)
    print(orjson.dumps({"rows": rows}).decode())


if __name__ == "__main__":
    main()
