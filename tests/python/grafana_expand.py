"""Grafana's query expansion, reimplemented for tests: what a dashboard's SQL becomes on the
way from the dashboard JSON to the store.

Grafana does not run here (no registry has it), so tests/python/test_dashboards.py expands
every panel query the way Grafana and its data source plugins would, then runs the result on
the real stores. Each step follows the source it names (read from the public repositories;
the code here is written anew, nothing is copied):

1. The interval (``$__interval``, ``$__interval_ms``): the panel query runner takes
   ``rangeUtil.calculateInterval(range, maxDataPoints, minInterval)``
   (grafana ``packages/grafana-data/src/datetime/rangeutil.ts``; scenes ``SceneQueryRunner``):
   ``roundInterval((to - from) / resolution)``, raised to the panel's min interval.
2. Template variables: scenes' ``sceneInterpolator`` (grafana/scenes
   ``packages/scenes/src/variables/interpolation/sceneInterpolator.ts``) with
   ``VARIABLE_REGEX`` from ``variables/constants.ts``; a multi-value variable's value is the
   list of selected values, "All" is the list of every option or the custom ``allValue``
   left unformatted (``MultiValueVariable.getValue``, ``CustomAllValue``); named formats
   (``${var:sqlstring}``) from ``interpolation/formatRegistry.ts``; otherwise the data
   source's own format function:

   * PostgreSQL (grafana ``public/app/plugins/datasource/grafana-postgresql-datasource/
     datasource.ts`` ``interpolateVariable``): a string has its ``'`` doubled and no quotes
     added, a list becomes ``'a','b'`` (``PostgresQueryModel.quoteLiteral``). The older
     generic ``SqlDatasource.interpolateVariable`` (``packages/grafana-sql``) also quoted a
     single string of a multi/includeAll variable; :func:`sql_interpolate_variable_legacy`
     keeps that so tests can check a dashboard expands the same under both.
   * ClickHouse (grafana/clickhouse-datasource ``src/data/CHDatasource.ts``):
     ``applyConditionalAll`` first (``$__conditionalAll(cond, $var)`` becomes ``1=1`` when
     the variable's current value is All or empty), then the template service with a format
     that joins a list as ``'a','b'`` and leaves a string as it is.
3. Backend macros:

   * ClickHouse: ``grafana-plugin-sdk-go`` ``data/sqlutil/macros.go`` ``Interpolate``
     (default macros merged with the plugin's, longest name first, ``\\$__name\\b`` with a
     bracketed argument list split at top-level commas and trimmed) and the plugin's
     ``pkg/macros/macros.go`` (``$__timeFilter`` → ``col >= toDateTime(s) AND col <=
     toDateTime(s)``, ``$__timeInterval`` → ``toStartOfInterval(toDateTime(col), INTERVAL n
     second)``, ``$__interval_s``, ``$__fromTime``/``$__toTime`` and their ``_ms`` forms).
   * PostgreSQL: grafana ``pkg/tsdb/grafana-postgresql-datasource/sqleng/sql_engine.go``
     ``Interpolate`` (``$__interval_ms``, ``$__interval``, ``$__unixEpochFrom()``,
     ``$__unixEpochTo()``), then ``macros.go`` (``\\$([_a-zA-Z0-9]+)\\(([^\\)]*)\\)``;
     ``$__timeFilter`` → ``col BETWEEN '<RFC3339Nano>' AND '<RFC3339Nano>'``,
     ``$__timeGroup`` → ``time_bucket('<s>.000s',col)`` with ``timescaledb: true``, else
     ``floor(extract(epoch from col)/s)*s``; ``$__timeGroupAlias`` adds ``AS "time"``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Union

ALL = "$__all"

# --------------------------------------------------------------------------- intervals


def round_interval(ms: float) -> int:
    """rangeutil.roundInterval: the 'nice' interval (ms) for a raw interval (ms)."""
    steps = [
        (10, 1), (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500),
        (1500, 1000), (3500, 2000), (7500, 5000), (12500, 10000), (17500, 15000),
        (25000, 20000), (45000, 30000), (90000, 60000), (210000, 120000),
        (450000, 300000), (750000, 600000), (1050000, 900000), (1500000, 1200000),
        (2700000, 1800000), (5400000, 3600000), (9000000, 7200000), (16200000, 10800000),
        (32400000, 21600000), (86400000, 43200000), (604800000, 86400000),
        (1814400000, 604800000), (3628800000, 2592000000),
    ]
    for limit, value in steps:
        if ms < limit:
            return value
    return 31536000000


_INTERVAL_UNITS_MS = {"y": 31536000000, "M": 2592000000, "w": 604800000, "d": 86400000,
                      "h": 3600000, "m": 60000, "s": 1000, "ms": 1}


def interval_to_ms(text: str) -> int:
    """rangeutil.intervalToMs ("1m" → 60000; a bare number is seconds)."""
    if re.fullmatch(r"\d+", text):
        return int(text) * 1000
    m = re.match(r"^(-?\d+(?:\.\d+)?)(ms|[Mwdhmsy])", text)
    if not m:
        raise ValueError(f"invalid interval {text!r}")
    return int(m.group(1).split(".")[0]) * _INTERVAL_UNITS_MS[m.group(2)]


def seconds_to_hms(seconds: float) -> str:
    """rangeutil.secondsToHms: the largest whole unit ("1m", "2m", "5s", "500ms")."""
    years = math.floor(seconds / 31536000)
    if years:
        return f"{years}y"
    days = math.floor((seconds % 31536000) / 86400)
    if days:
        return f"{days}d"
    hours = math.floor(((seconds % 31536000) % 86400) / 3600)
    if hours:
        return f"{hours}h"
    minutes = math.floor((((seconds % 31536000) % 86400) % 3600) / 60)
    if minutes:
        return f"{minutes}m"
    secs = math.floor((((seconds % 31536000) % 86400) % 3600) % 60)
    if secs:
        return f"{secs}s"
    ms = math.floor(seconds * 1000.0)
    if ms:
        return f"{ms}ms"
    return "less than a millisecond"


def calculate_interval(from_ms: int, to_ms: int, resolution: int,
                       low_limit: Optional[str]) -> tuple[int, str]:
    """rangeutil.calculateInterval → (intervalMs, interval)."""
    low = interval_to_ms(low_limit) if low_limit else 1
    interval = round_interval((to_ms - from_ms) / resolution)
    if low > interval:
        interval = low
    return interval, seconds_to_hms(interval / 1000)


# --------------------------------------------------------------------------- variables


@dataclass
class Variable:
    """A dashboard variable as scenes holds it once its options are loaded."""

    name: str
    type: str = "query"
    multi: bool = False
    include_all: bool = False
    all_value: Optional[str] = None
    value: Union[str, list] = ""
    options: list = field(default_factory=list)

    def has_all(self) -> bool:
        v = self.value
        return v == ALL or (isinstance(v, list) and len(v) > 0 and v[0] == ALL)

    def get_value(self) -> Any:
        """MultiValueVariable.getValue: All is every option, or the custom all value."""
        if self.type in ("query", "custom") and self.has_all():
            if self.all_value:
                return CustomAllValue(self.all_value)
            return list(self.options)
        return self.value

    def current_value_string(self) -> str:
        """``current.value.toString()`` as the ClickHouse plugin reads it (JS Array.toString)."""
        v = self.value
        return ",".join(str(x) for x in v) if isinstance(v, list) else str(v)


@dataclass
class CustomAllValue:
    """A custom "All" value: left unformatted (except by text/queryparam/percentencode)."""

    value: str


@dataclass
class ScopedVar:
    """A scoped variable (``__interval``, ``__interval_ms``): value as given."""

    name: str
    value: Any
    multi: bool = False
    include_all: bool = False


# scenes variables/constants.ts VARIABLE_REGEX (JS \w is ASCII: re.ASCII).
VARIABLE_REGEX = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}", re.ASCII)


def _js_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, list):
        return ",".join(_js_str(x) for x in v)
    return str(v)


def _sqlstring(value: Any) -> str:
    def one(s: str) -> str:
        return "'" + re.sub(r"['\"]", lambda m: "''" if m.group(0) == "'" else '\\"', s) + "'"
    if isinstance(value, list):
        return ",".join(one(_js_str(v)) for v in value)
    return one(_js_str(value))


def _singlequote(value: Any) -> str:
    def one(s: str) -> str:
        return "'" + s.replace("'", "\\'") + "'"
    if isinstance(value, list):
        return ",".join(one(_js_str(v)) for v in value)
    return one(_js_str(value))


def _doublequote(value: Any) -> str:
    def one(s: str) -> str:
        return '"' + s.replace('"', '\\"') + '"'
    if isinstance(value, list):
        return ",".join(one(_js_str(v)) for v in value)
    return one(_js_str(value))


def _glob(value: Any) -> str:
    if isinstance(value, list) and len(value) > 1:
        return "{" + ",".join(_js_str(v) for v in value) + "}"
    return _js_str(value)


def _csv(value: Any) -> str:
    return ",".join(_js_str(v) for v in value) if isinstance(value, list) else _js_str(value)


def _pipe(value: Any) -> str:
    return "|".join(_js_str(v) for v in value) if isinstance(value, list) else _js_str(value)


def _raw(value: Any) -> str:
    return _js_str(value)


def _queryparam(value: Any, var: Any) -> str:
    from urllib.parse import quote
    vals = value if isinstance(value, list) else [value]
    return "&".join(f"var-{var.name}={quote(_js_str(v), safe='-_.~')}" for v in vals)


FORMATS: dict[str, Callable[[Any], str]] = {
    "sqlstring": _sqlstring, "singlequote": _singlequote, "doublequote": _doublequote,
    "glob": _glob, "csv": _csv, "pipe": _pipe, "raw": _raw,
}

# The scenes macros a panel query may use (``$__from``/``$__to``: the range in ms).
MACRO_NAMES = ("__from", "__to")


@dataclass
class Context:
    """What a panel query is expanded against: time range, interval, variables."""

    from_ms: int
    to_ms: int
    interval_ms: int
    variables: dict[str, Variable]

    @property
    def interval(self) -> str:
        return seconds_to_hms(self.interval_ms / 1000)

    def scoped(self) -> dict[str, ScopedVar]:
        return {"__interval": ScopedVar("__interval", self.interval),
                "__interval_ms": ScopedVar("__interval_ms", self.interval_ms)}


def interpolate(text: str, ctx: Context, fmt: Any = None, scoped: Optional[dict] = None) -> str:
    """scenes sceneInterpolator(sceneObject, target, scopedVars, format)."""
    scoped = ctx.scoped() if scoped is None else scoped

    def lookup(name: str):
        if name in scoped:
            return scoped[name], scoped[name].value
        if name in ctx.variables:
            var = ctx.variables[name]
            return var, var.get_value()
        if name == "__from":
            return ScopedVar(name, ctx.from_ms), ctx.from_ms
        if name == "__to":
            return ScopedVar(name, ctx.to_ms), ctx.to_ms
        return None, None

    def replace(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        field_path = m.group(5)
        if field_path:
            raise ValueError(f"field paths ({m.group(0)}) are not supported here")
        var_fmt = m.group(3) or m.group(6) or fmt
        var, value = lookup(name)
        if var is None:
            return m.group(0)
        return format_value(ctx, var, value, var_fmt)

    return VARIABLE_REGEX.sub(replace, text)


def format_value(ctx: Context, var: Any, value: Any, fmt: Any) -> str:
    """scenes formatValue."""
    if value is None:
        return ""
    if isinstance(value, CustomAllValue):
        if fmt == "text":
            return "All"
        if fmt == "queryparam":
            return f"var-{var.name}=All"
        return interpolate(value.value, ctx)
    if callable(fmt):
        return _js_str(fmt(value, var))
    name, *args = (fmt or "glob").split(":")
    if name == "queryparam":
        # A variable with URL sync formats its state (['$__all'] for All), not its options.
        return _queryparam(var.value if isinstance(var, Variable) else value, var)
    if name not in FORMATS:
        raise ValueError(f"variable format {name!r} is not implemented here")
    return FORMATS[name](value)


# --------------------------------------------------------------------------- PostgreSQL


def pg_quote_literal(value: str) -> str:
    """PostgresQueryModel.quoteLiteral."""
    return "'" + str(value).replace("'", "''") + "'"


def pg_interpolate_variable(value: Any, var: Any) -> Any:
    """PostgresDatasource.interpolateVariable (Grafana 12)."""
    if isinstance(value, str):
        return value.replace("'", "''")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, list):
        return ",".join(pg_quote_literal(v) for v in value)
    return value


def sql_interpolate_variable_legacy(value: Any, var: Any) -> Any:
    """SqlDatasource.interpolateVariable (@grafana/sql, Grafana 11)."""
    if isinstance(value, str):
        if getattr(var, "multi", False) or getattr(var, "include_all", False):
            return pg_quote_literal(value)
        return value.replace("'", "''")
    return pg_interpolate_variable(value, var)


def go_format_float(x: float) -> str:
    """Go's %v of a float64: strconv 'g' with the shortest digits, in exponent form when
    the exponent is below -4 or at least 6 (the precision Go uses for that choice)."""
    from decimal import Decimal
    if x == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(float(x))).normalize().as_tuple()
    d = "".join(map(str, digits))
    dp = len(d) + exponent  # position of the decimal point
    e = dp - 1
    neg = "-" if sign else ""
    if e < -4 or e >= 6:
        mant = d[0] + ("." + d[1:] if len(d) > 1 else "")
        return f"{neg}{mant}e{'+' if e >= 0 else '-'}{abs(e):02d}"
    if dp <= 0:
        return f"{neg}0.{'0' * -dp}{d}"
    if dp >= len(d):
        return f"{neg}{d}{'0' * (dp - len(d))}"
    return f"{neg}{d[:dp]}.{d[dp:]}"


def go_rfc3339nano(ms: int) -> str:
    """time.Time.UTC().Format(time.RFC3339Nano) for a time with millisecond precision."""
    dt = datetime.fromtimestamp(ms // 1000, tz=timezone.utc)
    frac = ms % 1000
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        base += "." + f"{frac:03d}".rstrip("0")
    return base + "Z"


def go_format_interval(ms: int) -> str:
    """gtime.FormatInterval."""
    day, hour, minute, sec = 86400000, 3600000, 60000, 1000
    if ms >= day:
        return f"{ms // day}d"
    if ms >= hour:
        return f"{ms // hour}h"
    if ms >= minute:
        return f"{ms // minute}m"
    if ms >= sec:
        return f"{ms // sec}s"
    return f"{ms}ms"


def go_parse_interval(text: str) -> float:
    """gtime.ParseInterval → seconds (the units dashboards use: ms, s, m, h, d, w)."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", text)
    if not m:
        raise ValueError(f"error parsing interval {text}")
    n = int(m.group(1))
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


PG_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")


def pg_backend(sql: str, ctx: Context, timescaledb: bool) -> str:
    """sqleng.Interpolate, then the PostgreSQL macro engine."""
    sql = sql.replace("$__interval_ms", str(ctx.interval_ms))
    sql = sql.replace("$__interval", go_format_interval(ctx.interval_ms))
    sql = sql.replace("$__unixEpochFrom()", str(ctx.from_ms // 1000))
    sql = sql.replace("$__unixEpochTo()", str(ctx.to_ms // 1000))
    original = sql

    def macro(name: str, args: list[str]) -> str:
        frm, to = go_rfc3339nano(ctx.from_ms), go_rfc3339nano(ctx.to_ms)
        if name == "__time":
            return f'{args[0]} AS "time"'
        if name == "__timeEpoch":
            return f'extract(epoch from {args[0]}) as "time"'
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{frm}' AND '{to}'"
        if name == "__timeFrom":
            return f"'{frm}'"
        if name == "__timeTo":
            return f"'{to}'"
        if name in ("__timeGroup", "__timeGroupAlias"):
            if len(args) < 2:
                raise ValueError(f"macro {name} needs time column and interval")
            if len(args) == 3:
                raise ValueError("fill modes are not supported here")
            secs = go_parse_interval(args[1].strip("'"))
            if timescaledb:
                out = f"time_bucket('{secs:.3f}s',{args[0]})"
            else:
                s = go_format_float(secs)
                out = f"floor(extract(epoch from {args[0]})/{s})*{s}"
            return out + (' AS "time"' if name == "__timeGroupAlias" else "")
        if name == "__unixEpochFilter":
            return (f"{args[0]} >= {ctx.from_ms // 1000} AND {args[0]} <= {ctx.to_ms // 1000}")
        raise ValueError(f"unknown macro {name!r}")

    def replace(m: re.Match) -> str:
        name = m.group(1)
        if name == "__timeGroup":
            i = original.find(m.group(0))
            if i >= 0 and original[i + len(m.group(0)):i + len(m.group(0)) + 1] == ",":
                name = "__timeGroupAlias"
        args = [a.strip(" ") for a in m.group(2).split(",")]
        return macro(name, args)

    return PG_MACRO.sub(replace, sql)


def expand_pg(sql: str, ctx: Context, timescaledb: bool,
              interpolate_variable: Callable = pg_interpolate_variable) -> str:
    """A PostgreSQL panel query as Grafana sends it to PostgreSQL."""
    return pg_backend(interpolate(sql, ctx, interpolate_variable), ctx, timescaledb)


# --------------------------------------------------------------------------- ClickHouse


def ch_format(value: Any, var: Any) -> Any:
    """CHDatasource.format."""
    if isinstance(value, list):
        return "'" + "','".join(_js_str(v) for v in value) + "'"
    return value


def _ch_macro_args(query: str, args_index: int) -> list[str]:
    """CHDatasource.getMacroArgs (from the '(' at args_index)."""
    args: list[str] = []
    depth = 0
    last = 1
    sub = query[args_index:]
    for m in re.finditer(r"\(|\)|,", sub):
        tok = m.group(0)
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        if tok == "," and depth == 1:
            args.append(sub[last:m.end() - 1])
            last = m.end()
        if depth == 0:
            args.append(sub[last:m.end() - 1])
            return args
    return []


def _js_replace_first(haystack: str, needle: str, replacement: str) -> str:
    """String.prototype.replace with a string pattern (first match, $-patterns expanded)."""
    i = haystack.find(needle)
    if i < 0:
        return haystack
    before, after = haystack[:i], haystack[i + len(needle):]

    def pattern(m: re.Match) -> str:
        p = m.group(0)
        return {"$$": "$", "$&": needle, "$`": before, "$'": after}.get(p, p)

    return before + re.sub(r"\$[$&`']", pattern, replacement) + after


def ch_apply_conditional_all(sql: str, variables: dict[str, Variable]) -> str:
    """CHDatasource.applyConditionalAll."""
    macro = "$__conditionalAll("
    idx = sql.rfind(macro)
    while idx != -1:
        params = _ch_macro_args(sql, idx + len(macro) - 1)
        if len(params) != 2:
            return sql
        var_param = params[1].strip()
        m = re.search(r"(?<=\$\{)[\w\d]+(?=\})|(?<=\$)[\w\d]+", var_param, re.ASCII)
        phrase = params[0]
        if m:
            var = variables.get(m.group(0))
            value = var.current_value_string() if var is not None else None
            if value in ("", ALL):
                phrase = "1=1"
        sql = _js_replace_first(sql, f"{macro}{params[0]},{params[1]})", phrase)
        idx = sql.rfind(macro)
    return sql


def _sdk_parse_args(text: str) -> tuple[Optional[list[str]], int]:
    """sqlutil parseArgs: (args, length) of a bracketed list at the start of text."""
    if not text.startswith("("):
        return None, 0
    args, depth, arg = [], 0, []
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
            if depth == 1:
                continue
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append("".join(arg).strip())
                return args, i + 1
        elif ch == "," and depth == 1:
            args.append("".join(arg).strip())
            arg = []
            continue
        arg.append(ch)
    raise ValueError("failed to parse macro arguments (missing close bracket?)")


def ch_backend(sql: str, ctx: Context) -> str:
    """sqlutil.Interpolate with the ClickHouse plugin's macros."""
    f_s, t_s = ctx.from_ms // 1000, ctx.to_ms // 1000
    secs = int(max(ctx.interval_ms / 1000, 1))
    ms = int(max(ctx.interval_ms, 1))

    def need(args, n, name):
        if args is None or len(args) != n:
            raise ValueError(f"$__{name}: expected {n} argument(s), received {0 if args is None else len(args)}")

    def time_filter(a):
        need(a, 1, "timeFilter")
        return f"{a[0]} >= toDateTime({f_s}) AND {a[0]} <= toDateTime({t_s})"

    def time_filter_ms(a):
        need(a, 1, "timeFilter_ms")
        return (f"{a[0]} >= fromUnixTimestamp64Milli({ctx.from_ms}) AND "
                f"{a[0]} <= fromUnixTimestamp64Milli({ctx.to_ms})")

    def time_interval(a):
        need(a, 1, "timeInterval")
        return f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {secs} second)"

    def time_interval_ms(a):
        need(a, 1, "timeInterval_ms")
        return f"toStartOfInterval(toDateTime64({a[0]}, 3), INTERVAL {ms} millisecond)"

    def not_for_clickhouse(a):
        raise ValueError("$__timeGroup is the SDK's SQL Server-style default, not for ClickHouse")

    macros: dict[str, Callable[[Optional[list[str]]], str]] = {
        # grafana-plugin-sdk-go sqlutil defaults
        "interval": lambda a: go_format_interval(ctx.interval_ms),
        "interval_ms": lambda a: str(ctx.interval_ms),
        "timeFrom": lambda a: f"{a[0]} >= '{go_rfc3339(f_s)}'",
        "timeTo": lambda a: f"{a[0]} <= '{go_rfc3339(t_s)}'",
        "timeGroup": not_for_clickhouse,
        "table": lambda a: "",
        "column": lambda a: "",
        # the plugin's (pkg/macros/macros.go)
        "fromTime": lambda a: f"toDateTime({f_s})",
        "toTime": lambda a: f"toDateTime({t_s})",
        "fromTime_ms": lambda a: f"fromUnixTimestamp64Milli({ctx.from_ms})",
        "toTime_ms": lambda a: f"fromUnixTimestamp64Milli({ctx.to_ms})",
        "timeFilter": time_filter,
        "timeFilter_ms": time_filter_ms,
        "dateFilter": lambda a: (f"{a[0]} >= toDate('{_date(f_s)}') AND {a[0]} <= toDate('{_date(t_s)}')"),
        "timeInterval": time_interval,
        "timeInterval_ms": time_interval_ms,
        "interval_s": lambda a: str(secs),
    }
    for name in sorted(macros, key=len, reverse=True):
        rgx = re.compile(r"\$__" + re.escape(name) + r"\b", re.ASCII)
        matches = []
        for m in rgx.finditer(sql):
            args, length = _sdk_parse_args(sql[m.end():])
            matches.append((sql[m.start():m.end() + length], args))
        for full, args in matches:
            sql = sql.replace(full, macros[name](args))
    return sql


def _date(s: int) -> str:
    return datetime.fromtimestamp(s, tz=timezone.utc).strftime("%Y-%m-%d")


def go_rfc3339(s: int) -> str:
    return datetime.fromtimestamp(s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand_ch(sql: str, ctx: Context) -> str:
    """A ClickHouse panel query as the plugin sends it to ClickHouse."""
    sql = ch_apply_conditional_all(sql, ctx.variables)
    sql = interpolate(sql, ctx, ch_format)
    return ch_backend(sql, ctx)


# --------------------------------------------------------------------------- Prometheus


def prometheus_regular_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\\\'")


def prometheus_special_regex_escape(value: str) -> str:
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]+?.()|]", lambda m: "\\\\" + m.group(0), value)


def prom_interpolate_query_expr(value: Any, var: Any) -> Any:
    """Prometheus datasource interpolateQueryExpr (classic escaping)."""
    if not getattr(var, "multi", False) and not getattr(var, "include_all", False):
        return prometheus_regular_escape(value) if isinstance(value, str) else value
    if isinstance(value, str):
        return prometheus_special_regex_escape(value)
    escaped = [prometheus_special_regex_escape(v) for v in value]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def expand_prom(expr: str, ctx: Context, scrape_interval_s: int) -> str:
    """A PromQL expression as the Prometheus data source sends it: $__rate_interval is
    max($__interval + scrape interval, 4 × scrape interval), $__range the range."""
    interval_s = ctx.interval_ms // 1000
    rate = max(interval_s + scrape_interval_s, 4 * scrape_interval_s)
    range_s = (ctx.to_ms - ctx.from_ms) // 1000
    scoped = ctx.scoped()
    scoped.update({
        "__rate_interval": ScopedVar("__rate_interval", f"{rate}s"),
        "__range": ScopedVar("__range", f"{range_s}s"),
        "__range_s": ScopedVar("__range_s", range_s),
        "__range_ms": ScopedVar("__range_ms", range_s * 1000),
    })
    return interpolate(expr, ctx, prom_interpolate_query_expr, scoped)
