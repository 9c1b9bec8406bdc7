"""The reference evaluator: runs the kept ASA query over events, offline, as ASA would.

Azure Stream Analytics cannot run here, so parity needs a stand-in that reads the job's own query
file (``sql/stream_analytics_job_query.sql``) rather than a second hand-written copy of its logic.
The query is parsed with sqlglot's T-SQL dialect, each step (CTE) is translated to DuckDB SQL with
explicit rules for the ASA-only parts, and DuckDB executes it over the events:

- inputs (``FROM [bookings]``) are tables of the events' JSON documents, and ``System.Timestamp``
  is each event's enqueued time (no TIMESTAMP BY);
- record property access (``b.customer.name``) is JSON extraction; a value keeps its JSON type
  until it meets a typed context, where a type that does not fit reads as NULL;
- ``CROSS APPLY GetArrayElements(x) AS s`` unnests a JSON array, ``s.ArrayValue`` is an element;
- ``TRY_CAST(x AS datetime)`` reads ISO 8601 text as UTC (offsets converted), else NULL;
- ``DATENAME(weekday, t)`` is the English weekday, ``DATEPART(hour, t)`` the hour;
- ``DATEDIFF(unit, b, p) BETWEEN lo AND hi`` between two step aliases in a JOIN is an inclusive
  bound on elapsed time between the two events' timestamps (not T-SQL boundary counting);
- the final ``SELECT ... INTO`` converts each column to the fact table's type.

Anything else raises ``UnsupportedConstruct`` naming it: never a silent guess. It is deliberately
independent of ``pipeline.rules`` (that is what parity checks), reading only the assumption
switches, which the SQL cannot express.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import sqlglot
from sqlglot import exp

from pipeline import rules
from pipeline.schema import BOOKING_HUB, FACT_COLUMNS, PAYMENT_HUB, HubEvent

DEFAULT_QUERY = Path(__file__).resolve().parents[2] / "sql" / "stream_analytics_job_query.sql"
#: The job's input aliases and the hubs behind them.
INPUTS = {"bookings": BOOKING_HUB, "payments": PAYMENT_HUB}

_TIMESTAMP = "__ts"  # every step carries its events' System.Timestamp in this column
_DOCUMENT = "__doc"
_UNITS_MICROS = {
    "MICROSECOND": 1,
    "MILLISECOND": 1_000,
    "SECOND": 1_000_000,
    "MINUTE": 60_000_000,
    "HOUR": 3_600_000_000,
    "DAY": 86_400_000_000,
}
# TRY_CAST(... AS datetime): the ISO 8601 forms ASA reads (offsets up to 14:00).
_ISO_8601 = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,7})?)?"
    r"(Z|[+-](((0[0-9]|1[0-3]):?[0-5][0-9])|14:?00))?)?"
)
_MACROS = f"""
CREATE MACRO asa_text(j) AS CASE WHEN json_type(j) = 'VARCHAR' THEN json_extract_string(j, '$') END;
CREATE MACRO asa_float(j) AS
    CASE WHEN json_type(j) IN ('BIGINT', 'UBIGINT', 'DOUBLE') THEN CAST(j AS DOUBLE) END;
CREATE MACRO asa_datetime(j) AS CASE
    WHEN regexp_full_match(trim(asa_text(j)), '{_ISO_8601}')
    THEN timezone('UTC', TRY_CAST(trim(asa_text(j)) AS TIMESTAMPTZ)) END;
CREATE MACRO asa_array(j) AS
    CASE WHEN json_type(j) = 'ARRAY' THEN CAST(j AS JSON[]) ELSE CAST([] AS JSON[]) END;
"""


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

    input_alias: str | None = None  # alias of the input table (JSON documents)
    apply_alias: str | None = None  # alias of CROSS APPLY GetArrayElements
    steps: dict[str, dict[str, bool]] = field(default_factory=dict)  # alias -> column -> variant


@dataclass(frozen=True)
class Evaluation:
    """The rows ASA would write, their column names, and the events ASA could not read."""

    columns: tuple[str, ...]
    rows: list[tuple]
    unreadable: list[HubEvent]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _json_path(parts: list[str]) -> str:
    return "'$" + "".join("." + _quote(part).replace("'", "''") for part in parts) + "'"


class _Translator:
    def __init__(self, tree: exp.Expression):
        self._tree = tree
        self._steps: dict[str, dict[str, bool]] = {}  # step name -> column -> variant

    def translate(self) -> tuple[str, tuple[str, ...]]:
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
        return prefix + sql, tuple(columns)

    def _step(self, select: exp.Select, *, final: bool):
        for key in ("where", "group", "having", "order", "limit", "distinct"):
            if select.args.get(key):
                raise UnsupportedConstruct(f"{key.upper()} in a step")
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
            projections.append(f"{timestamp} AS {_TIMESTAMP}")
        sql = f"SELECT {', '.join(projections)} FROM {from_sql} {' '.join(joins_sql)}"
        return sql, (columns if not final else list(columns))

    def _source(self, table: exp.Expression, scope: _Scope) -> tuple[str, str | None]:
        if not isinstance(table, exp.Table) or table.args.get("db"):
            raise UnsupportedConstruct(f"FROM {table.sql('tsql')}")
        name = table.name.lower()
        alias = table.alias or table.name
        if name in INPUTS:
            scope.input_alias = alias.lower()
            return f"{_quote(name)} AS {_quote(alias)}", f"{_quote(alias)}.{_TIMESTAMP}"
        if name in self._steps:
            scope.steps[alias.lower()] = self._steps[name]
            return f"{_quote(name)} AS {_quote(alias)}", f"{_quote(alias)}.{_TIMESTAMP}"
        raise UnsupportedConstruct(f"unknown input or step {table.name!r}")

    def _join(self, join: exp.Join, scope: _Scope) -> str:
        target = join.this
        if isinstance(target, exp.Lateral) and target.args.get("cross_apply"):
            call = target.this
            if not (isinstance(call, exp.Anonymous) and call.name.lower() == "getarrayelements"):
                raise UnsupportedConstruct(f"CROSS APPLY {call.sql('tsql')}")
            if scope.input_alias is None or scope.apply_alias is not None:
                raise UnsupportedConstruct("CROSS APPLY outside a single-input step")
            array = self._value(call.expressions[0], scope, None)
            scope.apply_alias = target.alias.lower()
            return (
                f"CROSS JOIN LATERAL (SELECT unnest(asa_array({array.sql})) AS value) "
                f"AS {_quote(target.alias)}"
            )
        if join.side or join.kind not in ("", "INNER", None):
            raise UnsupportedConstruct(f"{join.side or ''} {join.kind or ''} JOIN".strip())
        alias = target.alias or target.name
        name = target.name.lower()
        if not isinstance(target, exp.Table) or name not in self._steps:
            raise UnsupportedConstruct(f"JOIN {target.sql('tsql')}: only steps can be joined")
        scope.steps[alias.lower()] = self._steps[name]
        condition = self._condition(join.args["on"], scope)
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
        elapsed = f"epoch_us({later}.{_TIMESTAMP}) - epoch_us({earlier}.{_TIMESTAMP})"
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
        if scope.input_alias is not None:
            path = parts[1:] if head == scope.input_alias else parts
            document = f"{_quote(scope.input_alias)}.{_DOCUMENT}"
            return _Value(f"json_extract({document}, {_json_path(path)})", variant=True)
        raise UnsupportedConstruct(f"column {'.'.join(parts)}")

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


def translate(query: str) -> tuple[str, tuple[str, ...]]:
    """The DuckDB SQL of an ASA query, and its output column names."""
    statements = [s for s in sqlglot.parse(query, read="tsql") if s is not None]
    if len(statements) != 1:
        raise UnsupportedConstruct(f"expected one statement, found {len(statements)}")
    return _Translator(statements[0]).translate()


def _readable_document(body: bytes) -> str | None:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def evaluate(events: Iterable[HubEvent], query_path: str | Path = DEFAULT_QUERY) -> Evaluation:
    """Runs the ASA query file over events (with their enqueued times) in DuckDB."""
    sql, columns = translate(Path(query_path).read_text())
    database = duckdb.connect()
    try:
        database.execute("SET TimeZone = 'UTC'")
        database.execute(_MACROS)
        for input_name in INPUTS:
            database.execute(
                f"CREATE TABLE {_quote(input_name)} ({_DOCUMENT} JSON, {_TIMESTAMP} TIMESTAMP, "
                "position INTEGER)"
            )
        by_hub = {hub: name for name, hub in INPUTS.items()}
        staged: dict[str, list[tuple]] = {name: [] for name in INPUTS}
        events = list(events)
        for position, event in enumerate(events):
            if event.hub in by_hub:
                document = _readable_document(event.body)
                staged[by_hub[event.hub]].append((document, event.enqueued_time, position))
        unreadable = []
        for name, rows in staged.items():
            database.execute(
                f"CREATE TEMP TABLE staged ({_DOCUMENT} VARCHAR, micros BIGINT, position INTEGER)"
            )
            if rows:
                database.executemany("INSERT INTO staged VALUES (?, ?, ?)", rows)
            # ASA drops what it cannot deserialize: not JSON, or not a JSON object.
            bad = database.execute(
                f"SELECT position FROM staged WHERE {_DOCUMENT} IS NULL "
                f"OR NOT json_valid({_DOCUMENT}) OR json_type({_DOCUMENT}) <> 'OBJECT'"
            ).fetchall()
            unreadable += [events[position] for (position,) in bad]
            database.execute(
                f"INSERT INTO {_quote(name)} SELECT {_DOCUMENT}::JSON, make_timestamp(micros), "
                f"position FROM staged WHERE {_DOCUMENT} IS NOT NULL AND json_valid({_DOCUMENT}) "
                f"AND json_type({_DOCUMENT}) = 'OBJECT'"
            )
            database.execute("DROP TABLE staged")
        rows = [tuple(row) for row in database.execute(sql).fetchall()]
    finally:
        database.close()
    return Evaluation(columns, rows, unreadable)
