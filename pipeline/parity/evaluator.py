"""The reference evaluator: runs the kept ASA query over events, offline, as ASA would.

Azure Stream Analytics cannot run here, so parity needs a stand-in that reads the job's own query
file (``sql/stream_analytics_job_query.sql``) rather than a second hand-written copy of its logic.
The query is parsed with sqlglot's T-SQL dialect, each step (CTE) is translated to DuckDB SQL with
explicit rules for the ASA-only parts, and DuckDB executes it over the events:

- inputs (``FROM [bookings]``) are tables with one row per event, and ``System.Timestamp`` is
  each event's enqueued time (no TIMESTAMP BY). A body that is not strict JSON (RFC 8259: no
  NaN, no trailing commas, finite numbers, valid UTF-8) or not a JSON object is dropped, as ASA
  drops what it cannot deserialize; a repeated key keeps its last value;
- record property access (``b.customer.name``) is JSON extraction: each property path the query
  reads is a JSON column of its input, extracted once per event while the events are loaded
  (missing: NULL; present: the value's JSON). A value keeps its JSON type until it meets a typed
  context, where a type that does not fit reads as NULL;
- ``CROSS APPLY GetArrayElements(x) AS s`` unnests a JSON array, ``s.ArrayValue`` is an element
  (``x``, a property path, is loaded as the list of its elements' JSON); a missing or null ``x``
  gives no rows, any other non-array ``x`` is an error that drops the event;
- ``TRY_CAST(x AS datetime)`` reads ISO 8601 text as UTC (offsets converted, digits past the
  microsecond truncated, surrounding whitespace ignored), else NULL;
- ``DATENAME(weekday, t)`` is the English weekday, ``DATEPART(hour, t)`` the hour;
- ``DATEDIFF(unit, b, p) BETWEEN lo AND hi`` between two step aliases in a JOIN is an inclusive
  bound on elapsed time between the two events' timestamps (not T-SQL boundary counting);
- the final ``SELECT ... INTO`` converts each column to the fact table's type.

Anything else (TIMESTAMP BY, WHERE, GROUP BY, a join without a time bound, another function...)
raises ``UnsupportedConstruct`` naming it: never a silent guess. It is deliberately
independent of ``pipeline.rules`` (that is what parity checks), reading only the assumption
switches, which the SQL cannot express.

Memory: no expression evaluated per array element ever reads a whole event. Were the documents
themselves in DuckDB, each seat row would parse its booking's document again for every path it
reads (one booking with 10,000 seats: 10,000 x the whole document, per path, gigabytes). DuckDB
runs under ``MEMORY_LIMIT`` and spills what exceeds it to a temporary folder.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import duckdb
import pyarrow
import sqlglot
from sqlglot import exp

from pipeline import rules
from pipeline.schema import BOOKING_HUB, FACT_COLUMNS, PAYMENT_HUB, DeadLetter, HubEvent

DEFAULT_QUERY = Path(__file__).resolve().parents[2] / "sql" / "stream_analytics_job_query.sql"
#: The job's input aliases and the hubs behind them.
INPUTS = {"bookings": BOOKING_HUB, "payments": PAYMENT_HUB}

#: DuckDB's memory limit while evaluating; beyond it, joins spill to a temporary folder.
MEMORY_LIMIT = "1GB"
_FETCH_ROWS = 100_000  # result rows moved from DuckDB to Python at a time
_LOAD_BATCH = 100_000  # values (array elements count one each) loaded into DuckDB at a time

#: Every input table and step carries its events' System.Timestamp (a TIMESTAMP) in this column.
TIMESTAMP_COLUMN = "__ts"
_UNITS_MICROS = {
    "MICROSECOND": 1,
    "MILLISECOND": 1_000,
    "SECOND": 1_000_000,
    "MINUTE": 60_000_000,
    "HOUR": 3_600_000_000,
    "DAY": 86_400_000_000,
}
# TRY_CAST(... AS datetime): the ISO 8601 forms ASA reads. Field ranges are spelled out (year
# 0001-9999, hour 00-23, no leap second, offsets up to 14:00); DuckDB's cast checks the calendar.
_ISO_8601 = (
    r"(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-[0-9]{2}-[0-9]{2}"
    r"([T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,7})?)?"
    r"(Z|[+-](((0[0-9]|1[0-3]):?[0-5][0-9])|14:?00))?)?"
)
# Leading and trailing whitespace is ignored: Unicode's, as str.isspace defines it (all of it
# lies below U+3001), as an RE2 character class.
_SPACE = "[" + "".join(f"\\x{{{code:x}}}" for code in range(0x3001) if chr(code).isspace()) + "]"
_MACROS = f"""
CREATE MACRO asa_text(j) AS CASE WHEN json_type(j) = 'VARCHAR' THEN json_extract_string(j, '$') END;
CREATE MACRO asa_float(j) AS
    CASE WHEN json_type(j) IN ('BIGINT', 'UBIGINT', 'DOUBLE') THEN CAST(j AS DOUBLE) END;
CREATE MACRO asa_utc(t) AS CASE
    WHEN t BETWEEN TIMESTAMP '0001-01-01' AND TIMESTAMP '9999-12-31 23:59:59.999999' THEN t END;
CREATE MACRO asa_trim(s) AS regexp_replace(s, '^{_SPACE}+|{_SPACE}+$', '', 'g');
CREATE MACRO asa_datetime(j) AS CASE
    WHEN regexp_full_match(asa_trim(asa_text(j)), '{_ISO_8601}')
    THEN asa_utc(timezone('UTC', TRY_CAST(asa_trim(asa_text(j)) AS TIMESTAMPTZ))) END;
"""


#: The parts of a SELECT the evaluator has rules for; anything else (WHERE, GROUP BY, TOP, ...)
#: is refused by name.
_STEP_PARTS = {"expressions", "from_", "joins"}
_CLAUSES = {
    "group": "GROUP BY",
    "order": "ORDER BY",
    "limit": "TOP",
    "with_": "WITH",
    "into": "INTO",
}


class UnsupportedConstruct(ValueError):
    """The query uses something the evaluator has no explicit rule for."""


@dataclass
class _Value:
    """A translated expression: DuckDB SQL, and whether it is still an untyped JSON value."""

    sql: str
    variant: bool


@dataclass
class _Scope:
    """What names mean inside one step."""

    input_name: str | None = None  # the input table (JSON documents) read by this step
    input_alias: str | None = None
    apply_alias: str | None = None  # alias of CROSS APPLY GetArrayElements
    time_bounded: bool = False  # the join condition holds a DATEDIFF bound
    steps: dict[str, dict[str, bool]] = field(default_factory=dict)  # alias -> column -> variant


class InputColumn(NamedTuple):
    """A column of an input table: the JSON at a property path of each event's document
    (``path`` empty: the whole document), or with ``elements`` the list of the JSON of the
    elements of the array there (a CROSS APPLY GetArrayElements argument; the event is dropped
    when the value is neither an array, missing nor null)."""

    name: str
    path: tuple[str, ...]
    elements: bool = False
    label: str = ""  # the argument as written in the query (elements only)


class Translation(NamedTuple):
    """An ASA query in DuckDB SQL, its output columns, and the columns of each input it reads."""

    sql: str
    columns: tuple[str, ...]
    inputs: dict[str, tuple[InputColumn, ...]]


@dataclass(frozen=True)
class Evaluation:
    """The rows ASA would write, their column names, and the events ASA dropped (with reasons)."""

    columns: tuple[str, ...]
    rows: list[tuple]
    dropped: list[DeadLetter]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _json_path(parts: list[str]) -> str:
    return "'$" + "".join("." + _quote(part).replace("'", "''") for part in parts) + "'"


class _Translator:
    def __init__(self, tree: exp.Expression):
        self._tree = tree
        self._steps: dict[str, dict[str, bool]] = {}  # step name -> column -> variant
        # input name -> (path, elements) -> its column
        self._inputs: dict[str, dict[tuple[tuple[str, ...], bool], InputColumn]] = {
            name: {} for name in INPUTS
        }

    def translate(self) -> Translation:
        select = self._tree
        if not isinstance(select, exp.Select) or select.args.get("into") is None:
            raise UnsupportedConstruct("the query must be one SELECT ... INTO [output] statement")
        ctes = []
        for cte in select.args["with_"].expressions if select.args.get("with_") else []:
            name = cte.alias
            sql, columns = self._step(cte.this, final=False)
            self._steps[name.lower()] = columns
            ctes.append(f"{_quote(name)} AS ({sql})")
        sql, columns = self._step(select, final=True)
        prefix = f"WITH {', '.join(ctes)} " if ctes else ""
        inputs = {name: tuple(columns.values()) for name, columns in self._inputs.items()}
        return Translation(prefix + sql, tuple(columns), inputs)

    def _input_column(self, input_name: str, path: list[str], label: str = "") -> str:
        """The input table column holding a property path (or with ``label``, the elements of
        the array there), added at its first use."""
        columns = self._inputs[input_name]
        key = (tuple(path), bool(label))
        if key not in columns:
            name = f"__{'a' if label else 'p'}{len(columns)}"
            columns[key] = InputColumn(name, tuple(path), bool(label), label)
        return columns[key].name

    def _step(self, select: exp.Select, *, final: bool):
        if not isinstance(select, exp.Select):
            raise UnsupportedConstruct(f"a step that is not a SELECT: {select.sql('tsql')}")
        understood = {"expressions", "from_", "joins", "with_", "into"} if final else _STEP_PARTS
        for key, value in select.args.items():
            if value and key not in understood:
                raise UnsupportedConstruct(f"{_CLAUSES.get(key, key.upper())} in a step")
        if not select.args.get("from_"):
            raise UnsupportedConstruct("a step without FROM")
        scope = _Scope()
        source = select.args["from_"].this
        from_sql, timestamp = self._source(source, scope)
        joins_sql = [self._join(join, scope) for join in select.args.get("joins") or []]
        if scope.steps and len(scope.steps) == 2:
            timestamp = None  # a join of two steps has no single System.Timestamp
        columns: dict[str, bool] = {}
        projections = []
        fact_types = {column.name: column.sql_type for column in FACT_COLUMNS}
        for expression in select.expressions:
            name = expression.alias_or_name
            if isinstance(expression, exp.Star):
                raise UnsupportedConstruct("SELECT *")
            value = self._value(expression.unalias(), scope, timestamp)
            if final:
                value = self._typed(value, fact_types.get(name), name)
            columns[name] = value.variant
            projections.append(f"{value.sql} AS {_quote(name)}")
        if not final:
            if timestamp is None:
                raise UnsupportedConstruct("a step without a single System.Timestamp")
            projections.append(f"{timestamp} AS {TIMESTAMP_COLUMN}")
        sql = f"SELECT {', '.join(projections)} FROM {from_sql} {' '.join(joins_sql)}"
        return sql, (columns if not final else list(columns))

    def _source(self, table: exp.Expression, scope: _Scope) -> tuple[str, str | None]:
        if not isinstance(table, exp.Table) or table.args.get("db"):
            raise UnsupportedConstruct(f"FROM {table.sql('tsql')}")
        name = table.name.lower()
        alias = table.alias or table.name
        if name in INPUTS:
            scope.input_name, scope.input_alias = name, alias.lower()
            return f"{_quote(name)} AS {_quote(alias)}", f"{_quote(alias)}.{TIMESTAMP_COLUMN}"
        if name in self._steps:
            scope.steps[alias.lower()] = self._steps[name]
            return f"{_quote(name)} AS {_quote(alias)}", f"{_quote(alias)}.{TIMESTAMP_COLUMN}"
        raise UnsupportedConstruct(f"unknown input or step {table.name!r}")

    def _join(self, join: exp.Join, scope: _Scope) -> str:
        target = join.this
        if isinstance(target, exp.Lateral) and target.args.get("cross_apply"):
            call = target.this
            if not (isinstance(call, exp.Anonymous) and call.name.lower() == "getarrayelements"):
                raise UnsupportedConstruct(f"CROSS APPLY {call.sql('tsql')}")
            if scope.input_alias is None or scope.apply_alias is not None:
                raise UnsupportedConstruct("CROSS APPLY outside a single-input step")
            if len(call.expressions) != 1:
                raise UnsupportedConstruct(f"CROSS APPLY {call.sql('tsql')}: one argument expected")
            argument = call.expressions[0]
            path = self._input_path(argument, scope)
            if path is None:
                raise UnsupportedConstruct(
                    f"GetArrayElements of a computed value: {call.sql('tsql')}"
                )
            column = self._input_column(scope.input_name, path, argument.sql("tsql"))
            scope.apply_alias = target.alias.lower()
            elements = f"{_quote(scope.input_alias)}.{column}"
            return (
                f"CROSS JOIN LATERAL (SELECT CAST(unnest({elements}) AS JSON) AS value) "
                f"AS {_quote(target.alias)}"
            )
        if join.side or join.kind not in ("", "INNER", None):
            raise UnsupportedConstruct(f"{join.side or ''} {join.kind or ''} JOIN".strip())
        alias = target.alias or target.name
        name = target.name.lower()
        if not isinstance(target, exp.Table) or name not in self._steps:
            raise UnsupportedConstruct(f"JOIN {target.sql('tsql')}: only steps can be joined")
        scope.steps[alias.lower()] = self._steps[name]
        if join.args.get("using") or not join.args.get("on"):
            raise UnsupportedConstruct(f"JOIN {target.sql('tsql')} without ON")
        condition = self._condition(join.args["on"], scope)
        if not scope.time_bounded:
            # ASA refuses a join of two streams without a time bound; so does the evaluator.
            raise UnsupportedConstruct(f"JOIN {target.sql('tsql')} without a DATEDIFF time bound")
        return f"JOIN {_quote(name)} AS {_quote(alias)} ON {condition}"

    def _condition(self, node: exp.Expression, scope: _Scope) -> str:
        if isinstance(node, exp.And):
            left = self._condition(node.this, scope)
            return f"({left}) AND ({self._condition(node.expression, scope)})"
        if isinstance(node, exp.Between) and isinstance(node.this, exp.DateDiff):
            return self._elapsed_between(node, scope)
        return self._value(node, scope, None).sql

    def _elapsed_between(self, node: exp.Between, scope: _Scope) -> str:
        diff = node.this
        unit = diff.args["unit"].name.upper()
        if unit not in _UNITS_MICROS:
            raise UnsupportedConstruct(f"DATEDIFF unit {unit}")
        later, earlier = (self._step_alias(side, scope) for side in (diff.this, diff.expression))
        bounds = []
        for bound in (node.args["low"], node.args["high"]):
            if not (isinstance(bound, exp.Literal) and not bound.is_string):
                raise UnsupportedConstruct(f"DATEDIFF bound {bound.sql('tsql')}")
            bounds.append(int(bound.this) * _UNITS_MICROS[unit])
        scope.time_bounded = True
        elapsed = f"epoch_us({later}.{TIMESTAMP_COLUMN}) - epoch_us({earlier}.{TIMESTAMP_COLUMN})"
        if not rules.JOIN_UPPER_BOUND_INCLUSIVE:
            return f"{elapsed} >= {bounds[0]} AND {elapsed} < {bounds[1]}"
        return f"{elapsed} BETWEEN {bounds[0]} AND {bounds[1]}"

    def _step_alias(self, node: exp.Expression, scope: _Scope) -> str:
        if isinstance(node, exp.TimeStrToTime):
            node = node.this
        if isinstance(node, exp.Column) and not node.table and node.name.lower() in scope.steps:
            return _quote(node.name)
        raise UnsupportedConstruct(f"DATEDIFF over {node.sql('tsql')}: expected step aliases")

    def _value(self, node: exp.Expression, scope: _Scope, timestamp: str | None) -> _Value:
        if isinstance(node, exp.Column):
            return self._column(node, scope, timestamp)
        if isinstance(node, exp.Literal):
            return _Value(node.sql("duckdb"), variant=False)
        if isinstance(node, exp.Null):
            return _Value("NULL", variant=False)
        if isinstance(node, exp.Paren):
            inner = self._value(node.this, scope, timestamp)
            return _Value(f"({inner.sql})", inner.variant)
        if isinstance(node, exp.TryCast):
            if node.to.this not in (exp.DataType.Type.DATETIME, exp.DataType.Type.DATETIME2):
                raise UnsupportedConstruct(f"TRY_CAST to {node.to.sql('tsql')}")
            inner = self._value(node.this, scope, timestamp)
            if not inner.variant:
                raise UnsupportedConstruct("TRY_CAST of a computed value")
            return _Value(f"asa_datetime({inner.sql})", variant=False)
        if isinstance(node, exp.TimeToStr):
            if node.args["format"].this != "%A":
                raise UnsupportedConstruct(f"DATENAME format {node.args['format'].this}")
            inner = node.this.this if isinstance(node.this, exp.Cast) else node.this
            return _Value(f"dayname({self._temporal(inner, scope, timestamp)})", variant=False)
        if isinstance(node, exp.Extract):
            part = node.this.name.lower()
            if part != "hour":
                raise UnsupportedConstruct(f"DATEPART({part}, ...)")
            value = self._temporal(node.expression, scope, timestamp)
            return _Value(f"CAST(hour({value}) AS INTEGER)", variant=False)
        if isinstance(node, exp.Case):
            return self._case(node, scope, timestamp)
        if isinstance(node, exp.Like | exp.EQ | exp.NEQ):
            left, right = (
                self._text(side, scope, timestamp) for side in (node.this, node.expression)
            )
            operator = {exp.Like: "LIKE", exp.EQ: "=", exp.NEQ: "<>"}[type(node)]
            if not rules.CASE_SENSITIVE_MATCHING:
                raise UnsupportedConstruct("case-insensitive matching")
            return _Value(f"({left} {operator} {right})", variant=False)
        if isinstance(node, exp.In):
            left = self._text(node.this, scope, timestamp)
            options = ", ".join(self._text(option, scope, timestamp) for option in node.expressions)
            return _Value(f"({left} IN ({options}))", variant=False)
        if isinstance(node, exp.Not):
            return _Value(f"(NOT {self._value(node.this, scope, timestamp).sql})", variant=False)
        if isinstance(node, exp.And | exp.Or):
            operator = "AND" if isinstance(node, exp.And) else "OR"
            left, right = (
                self._value(s, scope, timestamp).sql for s in (node.this, node.expression)
            )
            return _Value(f"({left} {operator} {right})", variant=False)
        if isinstance(node, exp.Is) and isinstance(node.expression, exp.Null):
            return _Value(f"({self._value(node.this, scope, timestamp).sql} IS NULL)", False)
        raise UnsupportedConstruct(f"{type(node).__name__}: {node.sql('tsql')}")

    def _text(self, node: exp.Expression, scope: _Scope, timestamp: str | None) -> str:
        value = self._value(node, scope, timestamp)
        return f"asa_text({value.sql})" if value.variant else value.sql

    def _temporal(self, node: exp.Expression, scope: _Scope, timestamp: str | None) -> str:
        value = self._value(node, scope, timestamp)
        if value.variant:
            raise UnsupportedConstruct(f"a date part of an uncast value: {node.sql('tsql')}")
        return value.sql

    def _case(self, node: exp.Case, scope: _Scope, timestamp: str | None) -> _Value:
        if node.this is not None:
            raise UnsupportedConstruct("CASE x WHEN ... (simple CASE)")
        branches = []
        results = []
        for branch in node.args["ifs"]:
            condition = self._value(branch.this, scope, timestamp)
            result = self._value(branch.args["true"], scope, timestamp)
            results.append(result)
            branches.append(f"WHEN {condition.sql} THEN {result.sql}")
        default = node.args.get("default")
        if default is not None:
            results.append(self._value(default, scope, timestamp))
            branches.append(f"ELSE {results[-1].sql}")
        if any(result.variant for result in results):
            raise UnsupportedConstruct("CASE returning an input field")
        return _Value(f"CASE {' '.join(branches)} END", variant=False)

    def _column(self, node: exp.Column, scope: _Scope, timestamp: str | None) -> _Value:
        parts = [part.name for part in node.parts]
        if [p.lower() for p in parts] == ["system", "timestamp"]:
            if timestamp is None:
                raise UnsupportedConstruct("System.Timestamp here")
            return _Value(timestamp, variant=False)
        head = parts[0].lower()
        if scope.steps and head in scope.steps and len(parts) == 2:
            columns = {name.lower(): variant for name, variant in scope.steps[head].items()}
            if parts[1].lower() not in columns and parts[1].lower() != "event_time":
                raise UnsupportedConstruct(f"unknown column {'.'.join(parts)}")
            return _Value(
                f"{_quote(parts[0])}.{_quote(parts[1])}", columns.get(parts[1].lower(), False)
            )
        if scope.apply_alias is not None and head == scope.apply_alias:
            if len(parts) < 2 or parts[1] != "ArrayValue":
                raise UnsupportedConstruct(f"{'.'.join(parts)} (only ArrayValue is supported)")
            element = f"{_quote(parts[0])}.value"
            if len(parts) == 2:
                return _Value(element, variant=True)
            return _Value(f"json_extract({element}, {_json_path(parts[2:])})", variant=True)
        path = self._input_path(node, scope)
        if path is not None:
            column = self._input_column(scope.input_name, path)
            return _Value(f"{_quote(scope.input_alias)}.{column}", variant=True)
        raise UnsupportedConstruct(f"column {'.'.join(parts)}")

    @staticmethod
    def _input_path(node: exp.Expression, scope: _Scope) -> list[str] | None:
        """The property path a column reads in the step's input (``b.customer.name`` or
        ``customer.name``: customer, name), or None if it reads no input property."""
        if not isinstance(node, exp.Column) or scope.input_alias is None:
            return None
        parts = [part.name for part in node.parts]
        head = parts[0].lower()
        if [p.lower() for p in parts] == ["system", "timestamp"]:
            return None
        if head == scope.apply_alias or (head in scope.steps and len(parts) > 1):
            return None
        return parts[1:] if head == scope.input_alias else parts

    @staticmethod
    def _typed(value: _Value, sql_type: str | None, name: str) -> _Value:
        if not value.variant:
            return value
        if sql_type is None:
            raise UnsupportedConstruct(f"output column {name!r} is not a fact table column")
        if sql_type.startswith("NVARCHAR"):
            return _Value(f"asa_text({value.sql})", variant=False)
        if sql_type == "FLOAT":
            return _Value(f"asa_float({value.sql})", variant=False)
        raise UnsupportedConstruct(f"output column {name!r}: an input field as {sql_type}")


def translate(query: str) -> Translation:
    """The DuckDB SQL of an ASA query, its output column names and its array checks."""
    try:
        statements = [s for s in sqlglot.parse(query, read="tsql") if s is not None]
    except sqlglot.errors.ParseError as error:
        code = re.sub(r"--[^\n]*|/\*.*?\*/", " ", query, flags=re.DOTALL)
        if re.search(r"\bTIMESTAMP\s+BY\b", code, re.IGNORECASE):  # T-SQL has no such clause
            raise UnsupportedConstruct(
                "TIMESTAMP BY: the evaluator models the job without it"
            ) from None
        raise UnsupportedConstruct(f"not readable as T-SQL: {error}") from None
    if len(statements) != 1:
        raise UnsupportedConstruct(f"expected one statement, found {len(statements)}")
    return _Translator(statements[0]).translate()


class _Unreadable(ValueError):
    """A body ASA's JSON deserializer rejects; the message is the reason."""


_JSON_TYPES = {list: "array", str: "string", bool: "boolean", type(None): "null"}


def _no_constant(name: str):
    raise _Unreadable(f"malformed JSON: {name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Unreadable(f"malformed JSON: {text} is out of a double's range")
    return value


def _document(body: bytes) -> dict:
    """The body as one JSON object (a repeated key keeps its last value), or raises _Unreadable:
    ASA's input deserializer reads strict JSON (RFC 8259) into records."""
    try:
        document = json.loads(
            body.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float
        )
        _json(document).encode("utf-8")  # a lone surrogate escape (\\ud800) is not a character
    except _Unreadable:
        raise
    except UnicodeDecodeError as error:
        raise _Unreadable(f"not UTF-8 text: {error}") from None
    except UnicodeEncodeError:
        raise _Unreadable("malformed JSON: an unpaired surrogate escape") from None
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deeply
        raise _Unreadable(f"malformed JSON: {error}") from None
    if not isinstance(document, dict):
        kind = _JSON_TYPES.get(type(document), "number")
        raise _Unreadable(f"not a JSON object: the body is a JSON {kind}")
    return document


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


_MISSING = object()


def _at(document: dict, path: tuple[str, ...]) -> object:
    """The value at a property path (keys of nested objects), or _MISSING."""
    value = document
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _input_values(document: dict, columns: tuple[InputColumn, ...]) -> list:
    """One event's values of its input table's columns, or raises _Unreadable when a CROSS APPLY
    GetArrayElements argument is neither an array, missing nor null (an error in ASA, a dead
    letter in the pipeline, never rows)."""
    values = []
    for column in columns:
        value = _at(document, column.path)
        if not column.elements:
            values.append(None if value is _MISSING else _json(value))
        elif isinstance(value, list):
            values.append([_json(element) for element in value])
        elif value is _MISSING or value is None:
            values.append([])
        else:
            raise _Unreadable(f"{column.label} is not an array")
    return values


class _Staged:
    """One input table being loaded: values gathered in Python, inserted into DuckDB in batches
    so that Python never holds more than a batch of them."""

    def __init__(self, database: duckdb.DuckDBPyConnection, name: str, columns):
        self._database, self._name, self._columns = database, name, columns
        self._micros: list[int] = []
        self._values: list[list] = [[] for _ in columns]
        self._size = 0
        definitions = [
            f"{TIMESTAMP_COLUMN} TIMESTAMP",
            *(f"{c.name} {'VARCHAR[]' if c.elements else 'JSON'}" for c in columns),
        ]
        database.execute(f"CREATE TABLE {_quote(name)} ({', '.join(definitions)})")

    def add(self, enqueued_time: int, values: list) -> None:
        self._micros.append(enqueued_time)
        for column, value in zip(self._values, values, strict=True):
            column.append(value)
            self._size += len(value) if isinstance(value, list) else 1
        if self._size >= _LOAD_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._micros:
            return
        arrays = {"micros": pyarrow.array(self._micros, pyarrow.int64())}
        selected = ["make_timestamp(micros)"]
        for column, values in zip(self._columns, self._values, strict=True):
            kind = pyarrow.list_(pyarrow.string()) if column.elements else pyarrow.string()
            arrays[column.name] = pyarrow.array(values, kind)
            selected.append(column.name)
        self._database.register("staged", pyarrow.table(arrays))
        self._database.execute(
            f"INSERT INTO {_quote(self._name)} SELECT {', '.join(selected)} FROM staged"
        )
        self._database.unregister("staged")
        self._micros, self._values, self._size = [], [[] for _ in self._columns], 0


def _load_inputs(
    database: duckdb.DuckDBPyConnection,
    events: Iterable[HubEvent],
    inputs: dict[str, tuple[InputColumn, ...]],
) -> list[DeadLetter]:
    """One table per input, one row per readable event: its System.Timestamp and the values of
    the property paths the query reads. Returns the events dropped, with their reasons."""
    by_hub = {hub: name for name, hub in INPUTS.items()}
    tables = {name: _Staged(database, name, inputs[name]) for name in INPUTS}
    dropped = []
    for event in events:
        name = by_hub.get(event.hub)
        if name is None:
            continue
        try:
            values = _input_values(_document(event.body), inputs[name])
        except _Unreadable as reason:
            dropped.append(DeadLetter.of(event, str(reason)))
            continue
        tables[name].add(event.enqueued_time, values)
    for table in tables.values():
        table.flush()
    return dropped


def prepare(database: duckdb.DuckDBPyConnection) -> None:
    """Readies a DuckDB connection to run a ``Translation``'s SQL: UTC and the ``asa_*`` macros.
    Its input tables (one per ``INPUTS`` name) must hold ``TIMESTAMP_COLUMN`` and the columns of
    ``Translation.inputs``, as ``evaluate`` loads them (the benchmark loads them in DuckDB)."""
    database.execute("SET TimeZone = 'UTC'")
    database.execute(_MACROS)


def evaluate(events: Iterable[HubEvent], query_path: str | Path = DEFAULT_QUERY) -> Evaluation:
    """Runs the ASA query file over events (with their enqueued times) in DuckDB: the rows ASA
    would write, and the events it would drop."""
    translation = translate(Path(query_path).read_text())
    with tempfile.TemporaryDirectory(prefix="bms-parity-") as spill:
        database = duckdb.connect(
            config={
                "memory_limit": MEMORY_LIMIT,
                "temp_directory": spill,
                "preserve_insertion_order": False,  # rows are compared as multisets
            }
        )
        try:
            prepare(database)
            dropped = _load_inputs(database, events, translation.inputs)
            result = database.execute(translation.sql)
            rows: list[tuple] = []
            while batch := result.fetchmany(_FETCH_ROWS):
                rows += batch
        finally:
            database.close()
    return Evaluation(translation.columns, rows, dropped)
