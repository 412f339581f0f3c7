"""Grafana dashboards (deploy/grafana/dashboards) against real stores.

Every panel query and every variable query of the dashboards is expanded as Grafana and its
data source plugins expand it (``grafana_expand.py``, which says which source each step
follows) for fixed time ranges and variable selections, run on the store its data source
uid points to, and its rows compared value by value with what the data written through
Sluice must give:

- a throwaway PostgreSQL and ClickHouse (or fresh databases in ``SLUICE_TEST_PG_URL`` /
  ``SLUICE_TEST_CH_URL``) and the real ``sluice`` binary in front of them;
- metric points (REST ``/write/metrics``), logs (``/write/logs``), spans and span events
  (``/write/spans``, ``/write/span_events``, and one trace over OTLP/HTTP JSON), plus a
  row PostgreSQL refuses (a dead letter) and two Flight batches Sluice refuses;
- once every sink has caught up (``/readyz``), the rollup has no open bucket and
  PostgreSQL's ``metrics_1m`` holds every minute: each SQL target in several scenarios
  (a 40-minute and a 24-hour range, so a 1m and a 2m ``$__interval``; All and chosen
  variable values; a search text; a trace id); PostgreSQL targets both as a plain
  PostgreSQL data source and as the provisioned ``timescaledb: true`` one sends them
  (``time_bucket``; on a PostgreSQL without TimescaleDB through a stand-in
  ``time_bucket(interval, timestamptz)`` = ``date_bin`` from 2000-01-03, TimescaleDB's
  origin, in a schema of its own on the search path);
- the data links (logs → trace → logs) followed: the link URL's dashboard and variables
  exist, and the linked dashboard's panels return the linked trace's rows;
- Prometheus panels: each PromQL expression expanded, parsed with ``promql-parser``, its
  metric names found in Sluice's ``/metrics`` (or, for series this run does not produce,
  in the Rust registration), its ``by``/matcher/legend labels among the metric's labels;
- the dashboard JSON checked against the Grafana schema as the Foundation SDK models it
  (``grafana-foundation-sdk``, generated from Grafana's schema: every key known, every
  value of its type), and the provisioning YAML structurally;
- finally sluice stops, the oldest raw points are deleted (retention), and the tiered
  panels must read those minutes from ``metrics_1m``.

What is not checked: Grafana itself (rendering, the frame conversion of results, the
ClickHouse plugin's ad hoc filters), PromQL results (no Prometheus here), and the
TimescaleDB path of the PostgreSQL panels on a real TimescaleDB unless
``SLUICE_TEST_PG_URL`` points at one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import typing
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import grafana_expand as gx
from conftest import REPO, start_sluice

DASH_DIR = REPO / "deploy" / "grafana" / "dashboards"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
COMPOSE = REPO / "deploy" / "docker-compose" / "poc.yaml"
DASHBOARDS: dict[str, dict] = {
    d["uid"]: d for d in (json.loads(p.read_text()) for p in sorted(DASH_DIR.glob("*.json")))
}
# The resolution Grafana divides the range by when a panel sets no maxDataPoints: the
# panel's width in pixels; 500 stands for a half-width panel.
DEFAULT_RESOLUTION = 500
PG_UID, CH_UID, PROM_UID = "sluice-postgres", "sluice-clickhouse", "sluice-prometheus"


# =============================================================================== helpers


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows
    return out


def sql_targets(uid: str) -> list[tuple[dict, dict]]:
    return [(p, t) for p in all_panels(DASHBOARDS[uid]) for t in p.get("targets", [])
            if t.get("datasource", p.get("datasource", {})).get("uid") in (PG_UID, CH_UID)]


def prom_targets() -> list[tuple[str, dict, dict]]:
    return [(uid, p, t) for uid, d in DASHBOARDS.items() for p in all_panels(d)
            for t in p.get("targets", [])
            if t.get("datasource", p.get("datasource", {})).get("uid") == PROM_UID]


def target_ds(panel: dict, target: dict) -> str:
    return target.get("datasource", panel.get("datasource", {}))["uid"]


def provisioned_datasources() -> dict[str, dict]:
    import yaml
    docs = [yaml.safe_load(p.read_text()) for p in sorted((PROVISIONING / "datasources").glob("*.y*ml"))]
    return {ds["uid"]: ds for doc in docs for ds in doc.get("datasources", [])}


def pg_jsonb_text(labels: dict) -> str:
    """A flat string→string object as PostgreSQL prints the jsonb (keys by length, then bytes)."""
    keys = sorted(labels, key=lambda k: (len(k.encode()), k.encode()))
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(labels[k])}" for k in keys) + "}"


@dataclass(frozen=True)
class Time:
    """An expected point in time (Unix seconds); matches a timestamp or epoch-seconds cell."""

    s: float


@dataclass(frozen=True)
class Exactly:
    """An expected float both sides compute the same way (no tolerance)."""

    value: float


@dataclass(frozen=True)
class Subset:
    """An expected map that the cell must contain (other keys allowed)."""

    items: tuple


def subset(d: dict) -> Subset:
    return Subset(tuple(sorted(d.items())))


@dataclass(frozen=True)
class Tags:
    """Expected trace-view tags: a key-sorted list of {key, value} holding these pairs."""

    items: tuple


def tags(d: dict) -> Tags:
    return Tags(tuple(sorted(d.items())))


def parse_time(cell: Any) -> float:
    if isinstance(cell, (int, float)):
        return float(cell)
    text = str(cell).strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return float(text)
    dt = datetime.fromisoformat(text.replace(" ", "T"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def cell_matches(got: Any, want: Any) -> bool:
    if isinstance(want, Tags):
        g = json.loads(got) if isinstance(got, str) else got
        keys = [t["key"] for t in g]
        have = {t["key"]: t["value"] for t in g}
        return keys == sorted(keys) and all(have.get(k) == v for k, v in want.items)
    if isinstance(want, Time):
        return abs(parse_time(got) - want.s) < 1e-6
    if isinstance(want, Exactly):
        return float(got) == want.value
    if isinstance(want, bool):
        return str(got).lower() in ("t", "true", "1") if want else str(got).lower() in ("f", "false", "0")
    if isinstance(want, int):
        return int(float(got)) == want and float(got) == want
    if isinstance(want, float):
        g = float(got)
        return math.isclose(g, want, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(want, Subset):
        g = json.loads(got) if isinstance(got, str) else got
        return all(g.get(k) == v for k, v in want.items)
    if isinstance(want, (dict, list)):
        g = json.loads(got) if isinstance(got, str) else got
        return g == want
    return str(got) == want


def assert_rows(label: str, sql: str, columns: list[str], rows: list[list],
                want_columns: list[str], want_rows: list[tuple]) -> None:
    assert columns == want_columns, f"{label}: columns {columns}, expected {want_columns}\n{sql}"
    assert len(rows) == len(want_rows), (
        f"{label}: {len(rows)} rows, expected {len(want_rows)}\n{sql}\n"
        f"got: {rows[:8]}\nwant: {want_rows[:8]}")
    for i, (g, w) in enumerate(zip(rows, want_rows)):
        for c, (gc, wc) in enumerate(zip(g, w)):
            assert cell_matches(gc, wc), (
                f"{label}: row {i} column {columns[c]!r}: got {gc!r}, expected {wc!r}\n{sql}\n"
                f"row: {g}\nexpected row: {w}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =============================================================================== stores


class ThrowawayPostgres:
    """initdb + pg_ctl in a temp dir (as the postgres user when root), see INFRA.md."""

    def __init__(self):
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not versions:
            pytest.fail("no PostgreSQL under /usr/lib/postgresql; set SLUICE_TEST_PG_URL")
        self.bin = versions[-1]
        # Its own folder under /tmp: pytest's temp folders are closed to the postgres user.
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-dash-pg-"))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_pg:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                  "start")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(self.as_pg + [str(self.bin / tool), *args], check=True,
                       stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


class ThrowawayClickHouse:
    """A chdb-core server (the real ClickHouse engine) in a temp dir, see INFRA.md."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "ch"
        self.dir.mkdir()
        port, tcp = free_port(), free_port()
        (self.dir / "config.xml").write_text(
            f"<clickhouse><http_port>{port}</http_port><tcp_port>{tcp}</tcp_port>"
            "<listen_host>127.0.0.1</listen_host></clickhouse>")
        code = ("import chdb._chdb as c; c.query('SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; "
                "SELECT sleepEachRow(1) FROM numbers(86400) SETTINGS max_block_size=1 FORMAT Null',"
                f"'CSV',path='{self.dir / 'data'}')")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=self.dir,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    pytest.fail("ClickHouse (chdb-core) did not start; pip install chdb-core")
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def psql(url: str, sql: str, search_path: Optional[str] = None) -> tuple[list[str], list[list[str]]]:
    """Runs one statement over the simple query protocol (as Grafana's pgx Exec does);
    returns (column names, rows as text)."""
    env = dict(os.environ, PGTZ="UTC")
    if search_path:
        env["PGOPTIONS"] = f"-c search_path={search_path}"
    out = subprocess.run(["psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--csv", "-c", sql],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise AssertionError(f"PostgreSQL refused:\n{sql}\n{out.stderr}")
    records = list(csv.reader(io.StringIO(out.stdout)))
    return (records[0], records[1:]) if records else ([], [])


def ch_http(url: str, database: str, sql: str, fmt: bool = True) -> Any:
    params = {"database": database}
    if fmt:
        params.update(default_format="JSONCompact", date_time_output_format="iso",
                      output_format_json_quote_64bit_integers="0",
                      output_format_json_quote_64bit_floats="0")
    req = urllib.request.Request(f"{url}/?{urllib.parse.urlencode(params)}", data=sql.encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read().decode()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"ClickHouse refused:\n{sql}\n{e.read().decode()}") from None
    return json.loads(body) if fmt else body


def ch_query(url: str, database: str, sql: str) -> tuple[list[str], list[list]]:
    r = ch_http(url, database, sql)
    return [m["name"] for m in r["meta"]], r["data"]


# =============================================================================== data


@dataclass
class Point:
    metric: str
    labels: str  # as PostgreSQL prints the jsonb
    labels_obj: dict
    t_us: int
    value: float


@dataclass
class Log:
    ts_ms: int
    service: str
    host: str
    level: str
    trace_id: str
    span_id: str
    message: str
    labels: dict


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    name: str
    start_us: int
    end_us: int
    duration_ns: int
    status_code: str
    status_message: str
    attr: dict
    attr_exact: bool = True  # False: Sluice adds OTLP resource/scope/kind entries


@dataclass
class Event:
    trace_id: str
    span_id: str
    ts_us: int
    name: str
    attr: dict


OTLP_TRACE = "5b8efff798038103d269b633813fc60c"
OTLP_ROOT, OTLP_CHILD = "eee19b7ec3c1b174", "eee19b7ec3c1b175"


@dataclass
class Data:
    t0: int  # Unix seconds, on a minute
    points: list[Point]
    logs: list[Log]
    spans: list[Span]
    events: list[Event]
    deleted_before_us: Optional[int] = None  # raw points older than this were deleted

    def raw_points(self) -> list[Point]:
        cut = self.deleted_before_us
        return [p for p in self.points if cut is None or p.t_us >= cut]


def build_data(t0: int) -> Data:
    us = 1_000_000
    la, lb, lc = {"host": "a", "dc": "x"}, {"host": "b", "dc": "x"}, {"host": "a"}
    points = []
    for i in range(30):
        points.append(Point("dash_cpu", pg_jsonb_text(la), la, (t0 + 20 * i) * us,
                            float((i * 7) % 13) + 0.25 * i))
    for i in range(40):
        points.append(Point("dash_cpu", pg_jsonb_text(lb), lb, (t0 + 5 + 15 * i) * us, 100 - 1.5 * i))
    for i in range(20):
        points.append(Point("dash_mem", pg_jsonb_text(lc), lc, (t0 + 30 * i) * us, 1000.0 + i))

    spans, events = [], []
    for k in range(30):
        trace = f"{0xabc000 + k:032x}"
        root = f"{0x100 + 3 * k:016x}"
        start = (t0 + 20 * k + 2) * us
        d_root = ((k * 37) % 50 + 5) * 1_000_000 + k * 1000
        d_db = ((k * 13) % 20 + 1) * 1_000_000
        d_wk = ((k * 7) % 10 + 1) * 1_000_000 + k
        spans.append(Span(trace, root, "", "api", "GET /items", start, start + d_root // 1000,
                          d_root, "Error" if k % 7 == 0 else "Ok", "boom" if k % 7 == 0 else "",
                          {"k": str(k)}))
        spans.append(Span(trace, f"{0x101 + 3 * k:016x}", root, "db", "SELECT items", start + 1000,
                          start + 1000 + d_db // 1000, d_db, "Error" if k % 5 == 0 else "Unset",
                          "", {"k": str(k)}))
        spans.append(Span(trace, f"{0x102 + 3 * k:016x}", root, "worker", "enrich", start + 2000,
                          start + 2000 + d_wk // 1000, d_wk, "Ok", "", {"k": str(k)}))
        if k % 10 == 0:
            events.append(Event(trace, f"{0x101 + 3 * k:016x}", start + 1500, "exception",
                                {"exception.message": f"boom {k}"}))
    # One trace over OTLP/HTTP JSON: api → db, the db span failed and retried once.
    s0 = (t0 + 90) * us
    spans.append(Span(OTLP_TRACE, OTLP_ROOT, "", "api", "GET /orders", s0, s0 + 250_000,
                      250_000_000, "Ok", "", {"http.route": "/orders", "span.kind": "Server"},
                      attr_exact=False))
    spans.append(Span(OTLP_TRACE, OTLP_CHILD, OTLP_ROOT, "db", "SELECT orders", s0 + 10_000,
                      s0 + 130_000, 120_000_000, "Error", "deadlock detected",
                      {"db.system": "postgresql", "span.kind": "Client"}, attr_exact=False))
    events.append(Event(OTLP_TRACE, OTLP_CHILD, s0 + 60_000, "retry", {"attempt": "1"}))

    logs = []
    for i in range(60):
        trace, span = "", ""
        if i == 10:
            trace, span = OTLP_TRACE, OTLP_ROOT
        elif i % 4 == 0:
            k = i // 4
            trace, span = f"{0xabc000 + k:032x}", f"{0x100 + 3 * k:016x}"
        msg = (f"Timeout calling db (attempt {i})" if i % 7 == 3
               else f"request {i} done in {i * 3} ms")
        logs.append(Log((t0 + 1 + 17 * i) * 1000 + 123, ["api", "db", "worker"][i % 3],
                        "h1" if i % 2 else "h2", ["info", "info", "warn", "error", "debug"][i % 5],
                        trace, span, msg, {"i": str(i)}))
    return Data(t0, points, logs, spans, events)


def otlp_body(data: Data) -> dict:
    by_id = {s.span_id: s for s in data.spans if s.trace_id == OTLP_TRACE}
    ev = [e for e in data.events if e.trace_id == OTLP_TRACE][0]

    def attrs(d):
        return [{"key": k, "value": {"stringValue": v}} for k, v in d.items()]

    def span(s: Span, kind: int, code: int, extra_attrs: dict, events=()):
        out = {"traceId": s.trace_id, "spanId": s.span_id, "name": s.name, "kind": kind,
               "startTimeUnixNano": str(s.start_us * 1000), "endTimeUnixNano": str(s.end_us * 1000),
               "attributes": attrs(extra_attrs),
               "status": {"code": code, **({"message": s.status_message} if s.status_message else {})}}
        if s.parent_span_id:
            out["parentSpanId"] = s.parent_span_id
        if events:
            out["events"] = list(events)
        return out

    root, child = by_id[OTLP_ROOT], by_id[OTLP_CHILD]
    retry = {"timeUnixNano": str(ev.ts_us * 1000), "name": ev.name,
             "attributes": [{"key": "attempt", "value": {"intValue": "1"}}]}
    scope = {"name": "dashboards-test", "version": "1"}
    return {"resourceSpans": [
        {"resource": {"attributes": attrs({"service.name": "api", "host.name": "h1"})},
         "scopeSpans": [{"scope": scope, "spans": [span(root, 2, 1, {"http.route": "/orders"})]}]},
        {"resource": {"attributes": attrs({"service.name": "db"})},
         "scopeSpans": [{"scope": scope, "spans": [
             span(child, 3, 2, {"db.system": "postgresql"}, [retry])]}]},
    ]}


def iso_us(t_us: int) -> str:
    return datetime.fromtimestamp(t_us // 1_000_000, tz=timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S") + f".{t_us % 1_000_000:06d}Z"


def http_post(base: str, path: str, body: bytes, ctype: str) -> dict:
    req = urllib.request.Request(f"{base}{path}", data=body, method="POST",
                                 headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise AssertionError(f"POST {path}: {e.code} {e.read().decode()}") from None


def http_get(base: str, path: str) -> bytes:
    try:
        with urllib.request.urlopen(f"{base}{path}", timeout=30) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        return e.read()


def ndjson(records: list[dict]) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def write_data(http: str, flight: str, data: Data) -> None:
    n = len(data.points)
    r = http_post(http, "/write/metrics", ndjson([
        {"name": p.metric, "labels": p.labels_obj, "value": p.value, "time": p.t_us // 1000}
        for p in data.points]), "application/x-ndjson")
    assert r == {"rows": n}, r
    r = http_post(http, "/write/logs", ndjson([
        {"timestamp": l.ts_ms, "service": l.service, "host": l.host, "level": l.level,
         "trace_id": l.trace_id, "span_id": l.span_id, "message": l.message, "labels": l.labels}
        for l in data.logs]), "application/x-ndjson")
    assert r == {"rows": len(data.logs)}, r
    rest_spans = [s for s in data.spans if s.trace_id != OTLP_TRACE]
    r = http_post(http, "/write/spans", json.dumps([
        {"trace_id": s.trace_id, "span_id": s.span_id, "parent_span_id": s.parent_span_id,
         "service": s.service, "name": s.name, "start_time": iso_us(s.start_us),
         "end_time": iso_us(s.end_us), "duration_ns": s.duration_ns,
         "status_code": s.status_code, "status_message": s.status_message, "attr": s.attr}
        for s in rest_spans]).encode(), "application/json")
    assert r == {"rows": len(rest_spans)}, r
    rest_events = [e for e in data.events if e.trace_id != OTLP_TRACE]
    r = http_post(http, "/write/span_events", json.dumps([
        {"trace_id": e.trace_id, "span_id": e.span_id, "ts": iso_us(e.ts_us), "name": e.name,
         "attr": e.attr} for e in rest_events]).encode(), "application/json")
    assert r == {"rows": len(rest_events)}, r
    r = http_post(http, "/v1/traces", json.dumps(otlp_body(data)).encode(), "application/json")
    assert not r.get("partialSuccess", {}).get("rejectedSpans"), r

    # A row PostgreSQL refuses for good (text cannot hold a NUL byte): a dead letter; and
    # batches Sluice refuses at ingest (labels that are not JSON, a null value).
    r = http_post(http, "/write/metrics_events", json.dumps([
        {"time": iso_us((data.t0 + 60) * 1_000_000), "app": "nul\u0000byte", "host": "h1",
         "labels": {}, "value": 1.0, "trace_id": "", "level": "info"}]).encode(), "application/json")
    assert r == {"rows": 1}, r
    import pyarrow as pa
    from sluice_client import SluiceClient
    schema = pa.schema([("time", pa.timestamp("us", tz="UTC")), ("metric_name", pa.string()),
                        ("labels", pa.string()), ("value", pa.float64())])
    t = (data.t0 + 60) * 1_000_000
    with SluiceClient(flight) as client:
        for labels, value in (("not json", 1.0), ("{}", None)):
            with pytest.raises(Exception):
                client.write("metrics", pa.table({"time": [t], "metric_name": ["dash_refused"],
                                                  "labels": [labels], "value": [value]}, schema=schema))


def metric_samples(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text exposition → family/sample name → [(labels, value)]."""
    out: dict[str, list] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            out.setdefault(line.split()[2], [])
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(4))))
    return out


def wait_caught_up(http: str, pg_url: str, data: Data, timeout: float = 90) -> None:
    """Every sink has every WAL record, the rollup wrote every bucket, PostgreSQL's
    metrics_1m (refreshed every maintenance_interval) holds every minute."""
    buckets = len({(p.metric, p.labels, p.t_us // 60_000_000) for p in data.points})
    deadline = time.monotonic() + timeout
    while True:
        ready = json.loads(http_get(http, "/readyz"))
        sinks = ready.get("sinks", {})
        states = {s: (sinks.get(s, {}).get("state"), sinks.get(s, {}).get("lag_records"))
                  for s in ("postgres", "clickhouse", "rollup")}
        open_buckets = metric_samples(http_get(http, "/metrics").decode()).get(
            "sluice_rollup_open_buckets", [({}, -1)])[0][1]
        have = int(psql(pg_url, "SELECT count(*) FROM metrics_1m WHERE metric_name LIKE 'dash_%'")[1][0][0])
        if all(s == ("ok", 0) for s in states.values()) and open_buckets == 0 and have == buckets:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"stores did not catch up in {timeout}s: sinks {states}, "
                                 f"rollup open buckets {open_buckets}, PostgreSQL metrics_1m "
                                 f"{have}/{buckets} buckets; readyz {ready}")
        time.sleep(0.2)


# =============================================================================== stack


@dataclass
class Stack:
    pg_url: str
    ch_url: str
    ch_db: str
    data: Data
    sluice: Any
    timescaledb: bool  # the database has TimescaleDB
    now_minute: int
    var_cache: dict = field(default_factory=dict)  # (uid, scenario name) → variables


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("dashboards")
    pg = ch = None
    ext_pg = os.environ.get("SLUICE_TEST_PG_URL")
    ext_ch = os.environ.get("SLUICE_TEST_CH_URL")
    dbname = f"sluice_dash_{secrets.token_hex(4)}"
    server = None
    try:
        if ext_pg:
            psql(ext_pg, f"CREATE DATABASE {dbname}")
            u = urllib.parse.urlsplit(ext_pg)
            pg_url = urllib.parse.urlunsplit(u._replace(path="/" + dbname))
        else:
            pg = ThrowawayPostgres()
            pg_url = pg.url
        if ext_ch:
            ch_url = ext_ch.rstrip("/")
        else:
            ch = ThrowawayClickHouse(work)
            ch_url = ch.url
        ch_http(ch_url, "default", f"CREATE DATABASE {dbname}", fmt=False)

        now = int(time.time())
        now_minute = now - now % 60
        data = build_data(now_minute - 30 * 60)
        server = start_sluice(
            work / "data", work / "sluice.log",
            SLUICE__POSTGRES__URL=pg_url,
            SLUICE__POSTGRES__MAINTENANCE_INTERVAL="1s",
            SLUICE__CLICKHOUSE__URL=ch_url,
            SLUICE__CLICKHOUSE__DATABASE=dbname,
            SLUICE__ROLLUP__DELAY="300ms")
        try:
            write_data(server.http_url, server.flight_location, data)
            wait_caught_up(server.http_url, pg_url, data)
        except BaseException:
            print(f"--- sluice log (tail) ---\n{server.log_tail(8000)}", file=sys.stderr)
            raise
        timescaledb = psql(pg_url, "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")[1][0][0] == "1"
        if not timescaledb:
            # The provisioned data source has timescaledb: true, so Grafana sends
            # time_bucket(); this stand-in has TimescaleDB's semantics for these calls
            # (sub-day widths, origin 2000-01-03 00:00 UTC) and is only on the search path
            # of the queries that test that form.
            psql(pg_url, "CREATE SCHEMA grafana_test_standin")
            psql(pg_url, "CREATE FUNCTION grafana_test_standin.time_bucket(bucket_width interval, ts timestamptz) "
                         "RETURNS timestamptz LANGUAGE sql IMMUTABLE AS "
                         "$$ SELECT date_bin(bucket_width, ts, TIMESTAMPTZ '2000-01-03 00:00:00+00') $$")
        yield Stack(pg_url, ch_url, dbname, data, server, timescaledb, now_minute)
    finally:
        if server is not None:
            server.stop()
        if ext_ch:
            try:
                ch_http(ch_url, "default", f"DROP DATABASE IF EXISTS {dbname}", fmt=False)
            except Exception:
                pass
        if ext_pg:
            try:
                psql(ext_pg, f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
            except Exception:
                pass
        if ch is not None:
            ch.stop()
        if pg is not None:
            pg.stop()


# =============================================================================== scenarios


@dataclass
class Scenario:
    name: str
    range_: str  # "40m" or "24h"
    selections: dict  # var name → value (str, list, or gx.ALL)


SCENARIOS: dict[str, list[Scenario]] = {
    "sluice-metrics": [
        Scenario("defaults-40m", "40m", {}),
        Scenario("label-b-40m", "40m", {"labels": ['{"dc": "x", "host": "b"}']}),
        Scenario("mem-40m", "40m", {"metric": "dash_mem"}),
        Scenario("defaults-24h", "24h", {}),
    ],
    "sluice-logs": [
        Scenario("defaults-40m", "40m", {}),
        Scenario("filtered-40m", "40m", {"service": ["api", "db"], "level": ["error", "warn"],
                                          "search": "TIMEOUT"}),
        Scenario("trace-40m", "40m", {"trace_id": OTLP_TRACE}),
        Scenario("defaults-24h", "24h", {}),
    ],
    "sluice-traces": [
        Scenario("defaults-40m", "40m", {"trace_id": OTLP_TRACE}),
        Scenario("db-40m", "40m", {"service": ["db"], "trace_id": f"{0xabc000 + 5:032x}"}),
        Scenario("defaults-24h", "24h", {"trace_id": OTLP_TRACE}),
    ],
}


def time_range(st: Stack, range_: str) -> tuple[int, int]:
    """The dashboard range in ms; the 40-minute one ends half a second past a minute so the
    expansions carry Grafana's millisecond precision."""
    to = st.now_minute * 1000
    if range_ == "40m":
        return to - 40 * 60_000, to + 500
    return to - 24 * 3_600_000, to


def panel_context(dash: dict, panel: dict, variables: dict, from_ms: int, to_ms: int,
                  ds_interval: Optional[str] = None) -> gx.Context:
    resolution = int(panel.get("maxDataPoints") or DEFAULT_RESOLUTION)
    interval_ms, _ = gx.calculate_interval(from_ms, to_ms, resolution,
                                           panel.get("interval") or ds_interval)
    return gx.Context(from_ms, to_ms, interval_ms, variables)


def var_query_sql(var: dict) -> str:
    q = var["query"]
    return q if isinstance(q, str) else q.get("rawSql") or q.get("query")


def run_sql(st: Stack, ds_uid: str, sql: str, timescaledb_form: bool = False):
    if ds_uid == PG_UID:
        path = None
        if timescaledb_form and not st.timescaledb:
            path = "public,grafana_test_standin"
        return psql(st.pg_url, sql, search_path=path)
    return ch_query(st.ch_url, st.ch_db, sql)


def resolve_variables(st: Stack, uid: str, scenario: Scenario, check: bool = True) -> dict:
    """Loads each variable's options (running its query, as Grafana does in dashboard
    order) and sets its value: the scenario's selection, else All where offered, else the
    first option. With ``check``, each variable query's result must be the expected one."""
    dash = DASHBOARDS[uid]
    from_ms, to_ms = time_range(st, scenario.range_)
    variables: dict[str, gx.Variable] = {}
    for v in dash["templating"]["list"]:
        var = gx.Variable(v["name"], v["type"], bool(v.get("multi")), bool(v.get("includeAll")),
                          v.get("allValue") or None)
        if v["type"] == "textbox":
            var.value = scenario.selections.get(v["name"], v.get("query", ""))
        elif v["type"] == "query":
            ds = v["datasource"]["uid"]
            ctx = gx.Context(from_ms, to_ms, 60_000, dict(variables))
            raw = var_query_sql(v)
            sql = (gx.expand_pg(raw, ctx, timescaledb=False) if ds == PG_UID else gx.expand_ch(raw, ctx))
            cols, rows = run_sql(st, ds, sql)
            options = [r[0] for r in rows]
            if v.get("sort") == 1:
                options = sorted(options)
            if check:
                want = expected_variable(st.data, uid, v["name"], variables, from_ms, to_ms)
                assert options == want, (f"{uid} variable {v['name']} ({scenario.name}): "
                                         f"options {options}, expected {want}\n{sql}")
            var.options = options
            sel = scenario.selections.get(v["name"])
            if sel is None:
                if var.include_all:
                    sel = [gx.ALL] if var.multi else gx.ALL
                else:
                    sel = [options[0]] if var.multi else options[0]
            var.value = sel
        else:
            raise AssertionError(f"{uid}: variable type {v['type']} is not handled by this test")
        variables[v["name"]] = var
    return variables


def selected(ctx: gx.Context, name: str) -> Optional[list]:
    """The values a variable selects, or None for All (no filter)."""
    var = ctx.variables[name]
    if var.has_all():
        return None
    return var.value if isinstance(var.value, list) else [var.value]


# =============================================================================== expected rows


def minute(t_us: int) -> int:
    return t_us // 60_000_000 * 60


def series_selected(ctx: gx.Context, p: Point) -> bool:
    labels = selected(ctx, "labels")
    return p.metric == ctx.variables["metric"].value and (labels is None or p.labels in labels)


def agg(values: list[float]) -> tuple[float, float, float]:
    return sum(values) / len(values), min(values), max(values)


def pg_1m(data: Data) -> dict[tuple, tuple]:
    """PostgreSQL's metrics_1m: every point (the refresh ran before any deletion)."""
    groups: dict[tuple, list] = {}
    for p in data.points:
        groups.setdefault((minute(p.t_us), p.metric, p.labels), []).append(p.value)
    return {k: agg(v) for k, v in groups.items()}


def in_pg_range(ctx: gx.Context, t_us: int) -> bool:
    """PostgreSQL's BETWEEN with the range's milliseconds."""
    return ctx.from_ms * 1000 <= t_us <= ctx.to_ms * 1000


def in_ch_range(ctx: gx.Context, t_us: int) -> bool:
    """ClickHouse toDateTime(seconds) bounds."""
    return (ctx.from_ms // 1000) * 1_000_000 <= t_us <= (ctx.to_ms // 1000) * 1_000_000


def exp_metrics_raw(data: Data, ctx: gx.Context):
    secs = ctx.interval_ms // 1000
    groups: dict[tuple, list] = {}
    for p in data.raw_points():
        if series_selected(ctx, p) and in_pg_range(ctx, p.t_us):
            groups.setdefault(((p.t_us // 1_000_000) // secs * secs, p.labels), []).append(p.value)
    rows = [(Time(t), l, sum(v) / len(v)) for (t, l), v in sorted(groups.items())]
    return ["time", "metric", "value"], rows


def exp_metrics_pg1m(data: Data, ctx: gx.Context):
    rows = []
    for (b, metric, labels), (a, lo, hi) in sorted(pg_1m(data).items()):
        p = Point(metric, labels, {}, b * 1_000_000, 0)
        if series_selected(ctx, p) and in_pg_range(ctx, b * 1_000_000):
            rows.append((b, labels, a, lo, hi))
    rows.sort(key=lambda r: (r[0], r[1]))
    return ["time", "metric", "avg_v", "min_v", "max_v"], [(Time(r[0]),) + r[1:] for r in rows]


def tiered(data: Data, ctx: gx.Context) -> list[tuple]:
    """sluice_metric_range for each selected series: (time s, labels, value, tier)."""
    out = []
    m1 = pg_1m(data)
    frm, to = ctx.from_ms * 1000, ctx.to_ms * 1000  # $__timeFrom()/$__timeTo(), µs
    series = sorted({(p.metric, p.labels) for p in data.points if series_selected(ctx, p)})
    for metric, labels in series:
        raw = [p for p in data.raw_points() if (p.metric, p.labels) == (metric, labels)]
        cut = None
        if raw:
            first = min(p.t_us for p in raw)
            cut = -(-first // 60_000_000) * 60_000_000  # the first minute at or after it
        for p in raw:
            if frm <= p.t_us < to and p.t_us >= cut:
                out.append((p.t_us / 1e6, labels, p.value, "raw"))
        for (b, mm, ll), (a, _, _) in m1.items():
            b_us = b * 1_000_000
            if (mm, ll) == (metric, labels) and frm <= b_us < to and (cut is None or b_us < cut):
                out.append((float(b), labels, a, "1m"))
    return out


def exp_metrics_tiered(data: Data, ctx: gx.Context):
    rows = sorted(((t, f"{l} {tier}", v) for t, l, v, tier in tiered(data, ctx)),
                  key=lambda r: (r[0], r[1]))
    return ["time", "metric", "value"], [(Time(t), m, v) for t, m, v in rows]


def exp_metrics_tiers(data: Data, ctx: gx.Context):
    groups: dict[tuple, list] = {}
    for t, l, v, tier in tiered(data, ctx):
        groups.setdefault((l, tier), []).append(t)
    rows = [(l, tier, len(ts), Time(min(ts)), Time(max(ts))) for (l, tier), ts in sorted(groups.items())]
    return ["labels", "tier", "rows", "first", "last"], rows


def ch_1m(data: Data) -> dict[tuple, list]:
    """The rollup's buckets (every good point, whatever PostgreSQL still holds)."""
    groups: dict[tuple, list] = {}
    for p in data.points:
        groups.setdefault((minute(p.t_us), p.metric, p.labels), []).append(p.value)
    return groups


def exp_metrics_ch_merged(data: Data, ctx: gx.Context):
    rows = []
    for (b, metric, labels), values in ch_1m(data).items():
        p = Point(metric, labels, {}, b * 1_000_000, 0)
        if series_selected(ctx, p) and in_ch_range(ctx, b * 1_000_000):
            rows.append((b, labels) + agg(values))
    rows.sort(key=lambda r: (r[0], r[1]))
    return ["time", "labels", "avg_v", "min_v", "max_v"], [(Time(r[0]),) + r[1:] for r in rows]


def exp_metrics_ch_interval(data: Data, ctx: gx.Context):
    secs = max(ctx.interval_ms // 1000, 1)
    groups: dict[tuple, list] = {}
    for (b, metric, labels), values in ch_1m(data).items():
        p = Point(metric, labels, {}, b * 1_000_000, 0)
        if series_selected(ctx, p) and in_ch_range(ctx, b * 1_000_000):
            groups.setdefault((b // secs * secs, labels), []).extend(values)
    rows = [(Time(t), l) + agg(v) for (t, l), v in sorted(groups.items())]
    return ["time", "labels", "avg_v", "min_v", "max_v"], rows


def log_filtered(data: Data, ctx: gx.Context) -> list[Log]:
    services, levels = selected(ctx, "service"), selected(ctx, "level")
    search = ctx.variables["search"].value
    trace = ctx.variables["trace_id"].value
    out = []
    for l in data.logs:
        if not in_ch_range(ctx, l.ts_ms * 1000):
            continue
        if services is not None and l.service not in services:
            continue
        if levels is not None and l.level not in levels:
            continue
        if search and search.lower() not in l.message.lower():
            continue
        if trace and l.trace_id != trace:
            continue
        out.append(l)
    return out


def exp_logs_volume(by: str):
    def f(data: Data, ctx: gx.Context):
        secs = max(ctx.interval_ms // 1000, 1)
        counts: dict[tuple, int] = {}
        for l in log_filtered(data, ctx):
            key = ((l.ts_ms // 1000) // secs * secs, getattr(l, by))
            counts[key] = counts.get(key, 0) + 1
        return ["time", by, "logs"], [(Time(t), k, n) for (t, k), n in sorted(counts.items())]
    return f


def exp_logs_table(data: Data, ctx: gx.Context):
    logs = sorted(log_filtered(data, ctx), key=lambda l: (-l.ts_ms, l.service, l.message))[:1000]
    return (["timestamp", "service", "host", "level", "trace_id", "span_id", "message"],
            [(Time(l.ts_ms / 1000), l.service, l.host, l.level, l.trace_id, l.span_id, l.message)
             for l in logs])


def span_filtered(data: Data, ctx: gx.Context) -> list[Span]:
    services = selected(ctx, "service")
    return [s for s in data.spans if in_ch_range(ctx, s.start_us)
            and (services is None or s.service in services)]


def ch_quantile(values: list[int], level: float) -> float:
    """ClickHouse quantile() below its 8192-value reservoir: linear interpolation."""
    v = sorted(values)
    pos = level * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def span_buckets(data: Data, ctx: gx.Context, by_service: bool) -> dict[tuple, list[Span]]:
    secs = max(ctx.interval_ms // 1000, 1)
    groups: dict[tuple, list] = {}
    for s in span_filtered(data, ctx):
        key = ((s.start_us // 1_000_000) // secs * secs,) + ((s.service,) if by_service else ())
        groups.setdefault(key, []).append(s)
    return groups


def exp_traces_latency(data: Data, ctx: gx.Context):
    rows = []
    for (t,), spans in sorted(span_buckets(data, ctx, False).items()):
        d = [s.duration_ns for s in spans]
        rows.append((Time(t),) + tuple(ch_quantile(d, q) / 1e6 for q in (0.5, 0.95, 0.99)))
    return ["time", "p50", "p95", "p99"], rows


def exp_traces_errors(data: Data, ctx: gx.Context):
    rows = [(Time(t), svc, sum(s.status_code == "Error" for s in spans) / len(spans))
            for (t, svc), spans in sorted(span_buckets(data, ctx, True).items())]
    return ["time", "service", "error_rate"], rows


def exp_traces_count(data: Data, ctx: gx.Context):
    rows = [(Time(t), svc, len(spans)) for (t, svc), spans in sorted(span_buckets(data, ctx, True).items())]
    return ["time", "service", "spans"], rows


def exp_traces_slowest(data: Data, ctx: gx.Context):
    groups: dict[str, list[Span]] = {}
    for s in span_filtered(data, ctx):
        groups.setdefault(s.trace_id, []).append(s)
    rows = []
    for trace, spans in groups.items():
        start, end = min(s.start_us for s in spans), max(s.end_us for s in spans)
        roots = [s.name for s in spans if s.parent_span_id == ""]
        rows.append((trace, Time(start / 1e6), (end - start) / 1000, len(spans),
                     sum(s.status_code == "Error" for s in spans), roots[0] if roots else "",
                     ", ".join(sorted({s.service for s in spans}))))
    rows.sort(key=lambda r: (-r[2], r[0]))
    return ["trace_id", "started", "duration_ms", "spans", "errors", "root", "services"], rows[:20]


def trace_spans(data: Data, ctx: gx.Context) -> list[Span]:
    trace = ctx.variables["trace_id"].value
    return sorted((s for s in data.spans if s.trace_id == trace), key=lambda s: (s.start_us, s.span_id))


def exp_trace_view(data: Data, ctx: gx.Context):
    rows = []
    for s in trace_spans(data, ctx):
        want_tags = ([{"key": k, "value": s.attr[k]} for k in sorted(s.attr)] if s.attr_exact
                     else tags(s.attr))
        rows.append((s.trace_id, s.span_id, s.parent_span_id, s.service, s.name, Exactly(s.start_us / 1000),
                     s.duration_ns / 1e6, want_tags, {"Ok": 1, "Error": 2}.get(s.status_code, 0),
                     s.status_message))
    return (["traceID", "spanID", "parentSpanID", "serviceName", "operationName", "startTime",
             "duration", "tags", "statusCode", "statusMessage"], rows)


def exp_trace_spans(data: Data, ctx: gx.Context):
    rows = [(Time(s.start_us / 1e6), s.service, s.name, s.span_id, s.parent_span_id, s.duration_ns / 1e6,
             s.status_code, s.status_message, s.attr if s.attr_exact else subset(s.attr))
            for s in trace_spans(data, ctx)]
    return (["start_time", "service", "name", "span_id", "parent_span_id", "duration_ms",
             "status_code", "status_message", "attr"], rows)


def exp_trace_events(data: Data, ctx: gx.Context):
    trace = ctx.variables["trace_id"].value
    evs = sorted((e for e in data.events if e.trace_id == trace), key=lambda e: (e.ts_us, e.span_id, e.name))
    return ["ts", "span_id", "name", "attr"], [(Time(e.ts_us / 1e6), e.span_id, e.name, e.attr) for e in evs]


EXPECTED: dict[tuple, Callable] = {
    ("sluice-metrics", 1, "A"): exp_metrics_raw,
    ("sluice-metrics", 2, "A"): exp_metrics_pg1m,
    ("sluice-metrics", 3, "A"): exp_metrics_tiered,
    ("sluice-metrics", 4, "A"): exp_metrics_tiers,
    ("sluice-metrics", 5, "A"): exp_metrics_ch_merged,
    ("sluice-metrics", 6, "A"): exp_metrics_ch_interval,
    ("sluice-logs", 1, "A"): exp_logs_volume("level"),
    ("sluice-logs", 2, "A"): exp_logs_volume("service"),
    ("sluice-logs", 3, "A"): exp_logs_table,
    ("sluice-traces", 1, "A"): exp_traces_latency,
    ("sluice-traces", 2, "A"): exp_traces_errors,
    ("sluice-traces", 3, "A"): exp_traces_count,
    ("sluice-traces", 4, "A"): exp_traces_slowest,
    ("sluice-traces", 5, "A"): exp_trace_view,
    ("sluice-traces", 6, "A"): exp_trace_spans,
    ("sluice-traces", 7, "A"): exp_trace_events,
}


def expected_variable(data: Data, uid: str, name: str, variables: dict, from_ms: int, to_ms: int) -> list[str]:
    ctx = gx.Context(from_ms, to_ms, 60_000, variables)
    if (uid, name) == ("sluice-metrics", "metric"):
        return sorted({p.metric for p in data.points})
    if (uid, name) == ("sluice-metrics", "labels"):
        return sorted({p.labels for p in data.points if p.metric == variables["metric"].value})
    if (uid, name) == ("sluice-logs", "service"):
        return sorted({l.service for l in data.logs if in_ch_range(ctx, l.ts_ms * 1000)})
    if (uid, name) == ("sluice-logs", "level"):
        return sorted({l.level for l in data.logs if in_ch_range(ctx, l.ts_ms * 1000)})
    if (uid, name) == ("sluice-traces", "service"):
        return sorted({s.service for s in data.spans if in_ch_range(ctx, s.start_us)})
    raise AssertionError(f"no expected options for variable {name} of {uid}")


# =============================================================================== expander unit checks


def test_expander_intervals():
    # rangeutil.calculateInterval: 40 min over 500 px is 4.8 s → 5 s, raised to the 1m minimum.
    assert gx.calculate_interval(0, 2_400_000, 500, "1m") == (60_000, "1m")
    assert gx.calculate_interval(0, 86_400_000, 500, "1m") == (120_000, "2m")
    assert gx.calculate_interval(0, 3_600_000, 500, None) == (5_000, "5s")
    assert gx.calculate_interval(0, 3_600_000, 1000, None) == (5_000, "5s")  # 3.6 s → 5 s
    assert gx.round_interval(1499) == 1000 and gx.round_interval(44_999) == 30_000
    assert gx.seconds_to_hms(0.5) == "500ms" and gx.seconds_to_hms(7200) == "2h"
    assert gx.interval_to_ms("1m") == 60_000 and gx.interval_to_ms("10") == 10_000


def _vars(**kw) -> dict:
    return {k: v for k, v in kw.items()}


def test_expander_template_variables():
    hosts = gx.Variable("host", multi=True, include_all=True, value=["srv1", "srv2"],
                        options=["srv1", "srv2", "srv3"])
    user = gx.Variable("user", value="O'Brien")
    region_all = gx.Variable("region", multi=True, include_all=True, value=[gx.ALL],
                             options=["us", "eu"])
    inst_all = gx.Variable("inst", multi=True, include_all=True, all_value=".*", value=[gx.ALL],
                           options=["a:1", "b:2"])
    ctx = gx.Context(0, 1000, 1000, _vars(host=hosts, user=user, region=region_all, inst=inst_all))
    pg = gx.pg_interpolate_variable
    # The PostgreSQL interpolation truth table (grafana interpolationTruthTable.test.ts).
    assert gx.interpolate("WHERE host IN ($host)", ctx, pg) == "WHERE host IN ('srv1','srv2')"
    assert gx.interpolate("WHERE name = '$user'", ctx, pg) == "WHERE name = 'O''Brien'"
    assert gx.interpolate("WHERE host IN (${host:sqlstring})", ctx, pg) == "WHERE host IN ('srv1','srv2')"
    assert gx.interpolate("WHERE r IN ($region)", ctx, pg) == "WHERE r IN ('us','eu')"
    # A custom all value is left as it is, whatever the format.
    assert gx.interpolate('i=~"$inst" ${inst:sqlstring}', ctx, pg) == 'i=~".*" .*'
    # Three syntaxes; unknown names and Grafana's SQL macros stay for the backend.
    assert gx.interpolate("[[user]] ${user} $user $nope $__timeFilter(t)", ctx, gx.ch_format) == \
        "O'Brien O'Brien O'Brien $nope $__timeFilter(t)"
    # Formats (scenes formatRegistry).
    v = gx.Variable("v", multi=True, value=["a'b", 'c"d'])
    ctx2 = gx.Context(0, 1000, 1000, {"v": v})
    assert gx.interpolate("${v:sqlstring}", ctx2) == "'a''b','c\\\"d'"
    assert gx.interpolate("${v:singlequote}", ctx2) == "'a\\'b','c\"d'"
    assert gx.interpolate("${v:csv}|${v}|${v:pipe}", ctx2) == "a'b,c\"d|{a'b,c\"d}|a'b|c\"d"
    assert gx.interpolate("${v:queryparam}", ctx2) == "var-v=a%27b&var-v=c%22d"
    # The ClickHouse plugin's format: a list joined in quotes, a string as it is.
    assert gx.interpolate("IN ($host) = '$user'", ctx, gx.ch_format) == "IN ('srv1','srv2') = 'O'Brien'"
    # Scoped $__interval / $__interval_ms.
    ctx3 = gx.Context(0, 1000, 120_000, {})
    assert gx.interpolate("$__interval $__interval_ms", ctx3, pg) == "2m 120000"
    # The older @grafana/sql interpolation quotes a single string of a multi variable.
    one = gx.Variable("one", multi=True, value="x")
    assert gx.sql_interpolate_variable_legacy("x", one) == "'x'"
    assert gx.pg_interpolate_variable("x", one) == "x"


def test_expander_postgres_macros():
    # Expectations of grafana pkg/tsdb/grafana-postgresql-datasource/macros_test.go.
    frm = int(datetime(2018, 4, 12, 18, 0, tzinfo=timezone.utc).timestamp() * 1000)
    ctx = gx.Context(frm, frm + 300_000, 60_000, {})
    pg = lambda s, ts=False: gx.pg_backend(s, ctx, ts)  # noqa: E731
    assert pg("select $__time(time_column)") == 'select time_column AS "time"'
    assert pg("WHERE $__timeFilter(time_column)") == \
        "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"
    assert pg("select $__timeFrom()") == "select '2018-04-12T18:00:00Z'"
    assert pg("select $__timeTo()") == "select '2018-04-12T18:05:00Z'"
    assert pg("SELECT $__timeGroup(time_column,'5m'), value") == \
        'SELECT floor(extract(epoch from time_column)/300)*300 AS "time", value'
    assert pg("SELECT $__timeGroup(time_column,'5m') as time, value") == \
        "SELECT floor(extract(epoch from time_column)/300)*300 as time, value"
    assert pg("$__timeGroupAlias(time_column , '5m')") == 'floor(extract(epoch from time_column)/300)*300 AS "time"'
    assert pg("GROUP BY $__timeGroup(time_column , '5m')", True) == "GROUP BY time_bucket('300.000s',time_column)"
    assert pg("GROUP BY $__timeGroup(time_column , '12d')", True) == "GROUP BY time_bucket('1036800.000s',time_column)"
    assert pg("GROUP BY $__timeGroup(time_column , '20ms')", True) == "GROUP BY time_bucket('0.020s',time_column)"
    assert pg("select $__unixEpochFilter(time)") == f"select time >= {frm // 1000} AND time <= {frm // 1000 + 300}"
    assert pg("$__interval $__interval_ms") == "1m 60000"
    # Sub-second and pre-1970 ranges keep RFC3339Nano's shortest fraction.
    ctx2 = gx.Context(int(datetime(1960, 2, 1, 7, 0, tzinfo=timezone.utc).timestamp() * 1000) + 500,
                      int(datetime(1980, 2, 3, 8, 0, tzinfo=timezone.utc).timestamp() * 1000) + 500, 1000, {})
    assert gx.pg_backend("WHERE $__timeFilter(c)", ctx2, False) == \
        "WHERE c BETWEEN '1960-02-01T07:00:00.5Z' AND '1980-02-03T08:00:00.5Z'"
    assert gx.go_format_float(300.0) == "300" and gx.go_format_float(0.5) == "0.5"
    assert gx.go_format_float(1e6) == "1e+06" and gx.go_format_float(86400.0) == "86400"
    with pytest.raises(ValueError):
        pg("$__nope(x)")


def test_expander_clickhouse_macros():
    ctx = gx.Context(1_700_000_000_250, 1_700_003_600_750, 20_000,
                     {"service": gx.Variable("service", multi=True, include_all=True, value=[gx.ALL],
                                             options=["api", "db"]),
                      "level": gx.Variable("level", multi=True, include_all=True, value=["warn", "error"],
                                           options=["error", "warn"]),
                      "q": gx.Variable("q", type="textbox", value=""),
                      "t": gx.Variable("t", type="textbox", value="abc")})
    ch = lambda s: gx.ch_backend(s, ctx)  # noqa: E731
    # grafana/clickhouse-datasource pkg/macros/macros.go (seconds truncate the range).
    assert ch("$__timeFilter(ts)") == "ts >= toDateTime(1700000000) AND ts <= toDateTime(1700003600)"
    assert ch("$__timeFilter_ms(ts)") == \
        "ts >= fromUnixTimestamp64Milli(1700000000250) AND ts <= fromUnixTimestamp64Milli(1700003600750)"
    assert ch("$__timeInterval(ts)") == "toStartOfInterval(toDateTime(ts), INTERVAL 20 second)"
    assert ch("$__timeInterval_ms(ts)") == "toStartOfInterval(toDateTime64(ts, 3), INTERVAL 20000 millisecond)"
    assert ch("$__interval_s $__fromTime $__toTime") == "20 toDateTime(1700000000) toDateTime(1700003600)"
    assert ch("$__fromTime_ms") == "fromUnixTimestamp64Milli(1700000000250)"
    assert ch("$__timeFilter( toDateTime(ts) )") == \
        "toDateTime(ts) >= toDateTime(1700000000) AND toDateTime(ts) <= toDateTime(1700003600)"
    assert gx.ch_backend("$__timeInterval(ts)", gx.Context(0, 1, 500, {})) == \
        "toStartOfInterval(toDateTime(ts), INTERVAL 1 second)"
    # applyConditionalAll, then the template service (src/data/CHDatasource.ts).
    sql = ("WHERE $__conditionalAll(service IN (${service:sqlstring}), $service) AND "
           "$__conditionalAll(level IN ($level), $level) AND "
           "$__conditionalAll(positionCaseInsensitiveUTF8(m, ${q:sqlstring}) > 0, $q) AND "
           "$__conditionalAll(t = ${t:sqlstring}, ${t})")
    assert gx.expand_ch(sql, ctx) == "WHERE 1=1 AND level IN ('warn','error') AND 1=1 AND t = 'abc'"
    with pytest.raises(ValueError):
        gx.ch_backend("$__timeFilter(a, b)", ctx)


def test_expander_prometheus():
    inst = gx.Variable("instance", multi=True, include_all=True, all_value=".*",
                       value=["127.0.0.1:8080", "sluice:8080"], options=[])
    ctx = gx.Context(0, 3_600_000, 5_000, {"instance": inst})
    expr = 'rate(x{instance=~"$instance"}[$__rate_interval]) $__range'
    assert gx.expand_prom(expr, ctx, 5) == \
        'rate(x{instance=~"(127\\\\.0\\\\.0\\\\.1:8080|sluice:8080)"}[20s]) 3600s'
    inst.value = [gx.ALL]
    assert gx.expand_prom(expr, ctx, 5) == 'rate(x{instance=~".*"}[20s]) 3600s'


# =============================================================================== JSON and YAML


def _model_errors(cls: type, data: Any, path: str) -> list[str]:
    """Checks ``data`` against a Foundation SDK model class: every key must survive a
    round trip through the model (an unknown key does not), and every value must be of the
    model's declared type."""
    from grafana_foundation_sdk.cog import runtime as cogruntime
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    class Encoder(JSONEncoder):
        def default(self, o):
            if isinstance(o, cogruntime.UnknownDataquery):
                return o.data
            return super().default(o)

    obj = cls.from_json(data)
    back = json.loads(json.dumps(obj, cls=Encoder))
    errors: list[str] = []

    def compare(a, b, p):
        if isinstance(a, dict):
            if not isinstance(b, dict):
                errors.append(f"{p}: became {b!r}")
                return
            for k, v in a.items():
                if k not in b and v is None:
                    continue  # null is absent
                if k not in b:
                    errors.append(f"{p}.{k}: not a key of the schema")
                else:
                    compare(v, b[k], f"{p}.{k}")
        elif isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b):
                errors.append(f"{p}: became {b!r}")
                return
            for i, (x, y) in enumerate(zip(a, b)):
                compare(x, y, f"{p}[{i}]")
        elif a != b:
            errors.append(f"{p}: {a!r} became {b!r}")

    compare(data, back, path)
    _type_errors(obj, path, errors)
    return errors


def _type_ok(value: Any, hint: Any, path: str, errors: list[str]) -> bool:
    import enum
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is typing.Any or hint is object:
        _type_errors(value, path, errors)  # a model behind an untyped slot (panel options)
        return True
    if origin is typing.Union:
        if value is None and type(None) in args:
            return True
        for arm in (a for a in args if a is not type(None)):
            scratch: list[str] = []
            if _type_ok(value, arm, path, scratch):
                errors.extend(scratch)
                return True
        return False
    if origin is typing.Literal:
        return value in args
    if origin in (list, typing.List):
        return isinstance(value, list) and all(_type_ok(v, args[0], f"{path}[]", errors) for v in value)
    if origin in (dict, typing.Dict):
        return isinstance(value, dict)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {m.value for m in hint} or isinstance(value, hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type):
        if isinstance(value, hint):
            _type_errors(value, path, errors)
            return True
        return False
    return True


def _type_errors(obj: Any, path: str, errors: list[str]) -> None:
    cls = type(obj)
    if not hasattr(cls, "from_json"):
        return
    module = sys.modules[cls.__module__]
    try:
        hints = typing.get_type_hints(cls.__init__, globalns=vars(module))
    except Exception as e:  # pragma: no cover - a model the SDK cannot resolve
        errors.append(f"{path}: cannot read the model's types ({e})")
        return
    for name, hint in hints.items():
        if name == "return" or not hasattr(obj, name):
            continue
        value = getattr(obj, name)
        if value is None:
            continue
        if not _type_ok(value, hint, f"{path}.{name}", errors):
            errors.append(f"{path}.{name}: {value!r} is not {hint}")


def test_dashboards_match_grafana_schema():
    """Each dashboard against Grafana's schema as grafana-foundation-sdk models it."""
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard
    register_default_plugins()
    assert set(DASHBOARDS) == {"sluice-metrics", "sluice-logs", "sluice-traces", "sluice-self"}
    for uid, d in DASHBOARDS.items():
        errors = _model_errors(Dashboard, d, uid)
        assert not errors, f"{uid} does not match the dashboard schema:\n" + "\n".join(errors[:30])
        # The SDK's current schema version (Grafana 11.6/12).
        assert d["schemaVersion"] == Dashboard().schema_version, d["schemaVersion"]


def test_dashboards_are_consistent():
    sources = provisioned_datasources()
    types = {uid: ds["type"] for uid, ds in sources.items()}
    titles = set()
    for uid, d in DASHBOARDS.items():
        assert d["title"] not in titles
        titles.add(d["title"])
        panels = all_panels(d)
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{uid}: panel ids repeat: {ids}"
        # Panels lie on the 24-column grid without overlapping.
        cells = set()
        for p in panels:
            gp = p["gridPos"]
            assert gp["x"] >= 0 and gp["x"] + gp["w"] <= 24, (uid, p["title"], gp)
            for x in range(gp["x"], gp["x"] + gp["w"]):
                for y in range(gp["y"], gp["y"] + gp["h"]):
                    assert (x, y) not in cells, f"{uid}: panel {p['title']!r} overlaps another"
                    cells.add((x, y))
        names = {v["name"] for v in d["templating"]["list"]}
        for v in d["templating"]["list"]:
            if "datasource" in v:
                assert types.get(v["datasource"]["uid"]) == v["datasource"]["type"], (uid, v["name"])
        for p in panels:
            for t in p.get("targets", []):
                ds = t.get("datasource", p.get("datasource"))
                assert types.get(ds["uid"]) == ds["type"], (uid, p["title"], ds)
                assert t["datasource"] == p["datasource"], (uid, p["title"])
                text = t.get("rawSql") or t.get("expr")
                if ds["uid"] == CH_UID:
                    # The plugin's query model (src/types/sql.ts); pluginVersion ≥ 4 skips the
                    # v3 migration; format is sqlutil.FormatQueryOption.
                    assert t["editorType"] == "sql" and isinstance(t["rawSql"], str), t
                    assert {0: "timeseries", 1: "table", 2: "logs", 3: "traces"}[t["format"]] == t["queryType"], t
                    assert tuple(int(x) for x in t["pluginVersion"].split(".")) >= (4, 0, 0)
                    want = {"table": (1, "table"), "traces": (3, "traces")}.get(p["type"], (0, "timeseries"))
                    assert (t["format"], t["queryType"]) == want, (uid, p["title"])
                elif ds["uid"] == PG_UID:
                    assert t["editorMode"] == "code" and t["rawQuery"] is True, t
                    assert t["format"] == ("table" if p["type"] == "table" else "time_series"), t
                    # Grafana 12 strips SQL comments before its macros and 11 does not:
                    # without comments both send the same SQL.
                    assert "--" not in t["rawSql"] and "/*" not in t["rawSql"], t["rawSql"]
                else:
                    assert t["editorMode"] == "code" and t["expr"], t
                # Every variable a query uses exists (or is one of Grafana's own).
                for m in gx.VARIABLE_REGEX.finditer(text):
                    name = m.group(1) or m.group(2) or m.group(4)
                    assert name in names or name.startswith("__"), f"{uid}: unknown variable ${name}"
            for o in p.get("fieldConfig", {}).get("overrides", []):
                for prop in o["properties"]:
                    if prop["id"] == "links":
                        for link in prop["value"]:
                            check_link(uid, link["url"])


def check_link(source_uid: str, url: str) -> tuple[str, dict]:
    """A data link to a dashboard: its uid exists and every var-X is a variable there."""
    m = re.match(r"^/d/([^/?]+)/[^?]*\?(.*)$", url)
    assert m, f"{source_uid}: data link {url!r} is not a dashboard link"
    target = m.group(1)
    assert target in DASHBOARDS, f"{source_uid}: data link to unknown dashboard {target}"
    names = {v["name"] for v in DASHBOARDS[target]["templating"]["list"]}
    for part in m.group(2).split("&"):
        if part.startswith("var-"):
            assert part[4:].split("=")[0] in names, f"{source_uid}: {url} sets an unknown variable"
        elif part.startswith("${") and part.endswith(":queryparam}"):
            assert part[2:-len(":queryparam}")] in names, f"{source_uid}: {url}"
        else:
            assert part == "${__url_time_range}", f"{source_uid}: {url}: {part}"
    return target, {}


def test_provisioning_yaml():
    import yaml
    ds_files = sorted((PROVISIONING / "datasources").glob("*.y*ml"))
    db_files = sorted((PROVISIONING / "dashboards").glob("*.y*ml"))
    assert ds_files and db_files, "deploy/grafana/provisioning has no datasources or dashboards YAML"
    names, uids = set(), set()
    for f in ds_files:
        doc = yaml.safe_load(f.read_text())
        assert doc["apiVersion"] == 1, f
        for ds in doc["datasources"]:
            for key in ("name", "type", "uid", "access"):
                assert isinstance(ds.get(key), str) and ds[key], (f.name, ds.get("name"), key)
            assert ds["name"] not in names and ds["uid"] not in uids
            names.add(ds["name"])
            uids.add(ds["uid"])
            assert isinstance(ds.get("jsonData", {}), dict)
            assert isinstance(ds.get("secureJsonData", {}), dict)
    sources = provisioned_datasources()
    assert sources[PG_UID]["type"] in ("grafana-postgresql-datasource", "postgres")
    assert sources[PG_UID]["jsonData"].get("database"), "PostgreSQL data source without a database"
    assert isinstance(sources[PG_UID]["jsonData"].get("timescaledb", False), bool)
    assert sources[CH_UID]["type"] == "grafana-clickhouse-datasource"
    ch = sources[CH_UID]["jsonData"]
    assert ch.get("host") and isinstance(ch.get("port"), int) and ch.get("protocol") in ("http", "native")
    assert sources[PROM_UID]["type"] == "prometheus" and sources[PROM_UID].get("url")
    paths = []
    for f in db_files:
        doc = yaml.safe_load(f.read_text())
        assert doc["apiVersion"] == 1, f
        for prov in doc["providers"]:
            assert prov["name"] and prov.get("type", "file") == "file", prov
            paths.append(prov["options"]["path"])
    # The compose file mounts this folder where the provider reads dashboards from.
    if COMPOSE.exists():
        compose = yaml.safe_load(COMPOSE.read_text())
        mounts = [m for svc in compose["services"].values() for m in svc.get("volumes", [])
                  if isinstance(m, str) and "grafana/dashboards" in m]
        assert any(m.split(":")[1] in paths for m in mounts), (mounts, paths)


# =============================================================================== against the stores


def run_target(st: Stack, uid: str, panel: dict, target: dict, scenario: Scenario,
               variables: Optional[dict] = None) -> None:
    dash = DASHBOARDS[uid]
    from_ms, to_ms = time_range(st, scenario.range_)
    if variables is None:
        key = (uid, scenario.name)
        if key not in st.var_cache:
            st.var_cache[key] = resolve_variables(st, uid, scenario, check=False)
        variables = st.var_cache[key]
    ctx = panel_context(dash, panel, variables, from_ms, to_ms)
    ds = target_ds(panel, target)
    key = (uid, panel["id"], target["refId"])
    want_cols, want_rows = EXPECTED[key](st.data, ctx)
    label = f"{uid} panel {panel['id']} {panel['title']!r} {target['refId']} [{scenario.name}]"
    if ds == PG_UID:
        for ts in (False, True):
            sql = gx.expand_pg(target["rawSql"], ctx, timescaledb=ts)
            legacy = gx.expand_pg(target["rawSql"], ctx, timescaledb=ts,
                                  interpolate_variable=gx.sql_interpolate_variable_legacy)
            assert sql == legacy, f"{label}: Grafana 11 and 12 would send different SQL"
            cols, rows = run_sql(st, ds, sql, timescaledb_form=ts)
            assert_rows(f"{label} ({'timescaledb' if ts else 'postgres'} form)", sql, cols, rows,
                        want_cols, want_rows)
    else:
        sql = gx.expand_ch(target["rawSql"], ctx)
        cols, rows = run_sql(st, ds, sql)
        assert_rows(label, sql, cols, rows, want_cols, want_rows)
    if not want_rows and scenario.name.startswith("defaults"):
        raise AssertionError(f"{label}: expected no rows in the default scenario; the test data "
                             "should give every panel something to show")


def test_every_sql_target_has_an_expectation():
    keys = {(uid, p["id"], t["refId"]) for uid in DASHBOARDS for p, t in sql_targets(uid)}
    assert keys == set(EXPECTED), (keys ^ set(EXPECTED))


@pytest.mark.parametrize("uid,scenario", [(u, s) for u, ss in SCENARIOS.items() for s in ss],
                         ids=lambda x: x if isinstance(x, str) else x.name)
def test_variable_queries(stack, uid, scenario):
    resolve_variables(stack, uid, scenario, check=True)


@pytest.mark.parametrize(
    "uid,panel_id,ref,scenario",
    [(u, p["id"], t["refId"], s) for u, ss in SCENARIOS.items() for s in ss for p, t in sql_targets(u)],
    ids=lambda x: x.name if isinstance(x, Scenario) else str(x))
def test_sql_panels(stack, uid, panel_id, ref, scenario):
    panel = next(p for p in all_panels(DASHBOARDS[uid]) if p["id"] == panel_id)
    target = next(t for t in panel["targets"] if t["refId"] == ref)
    run_target(stack, uid, panel, target, scenario)


def follow_link(st: Stack, source_uid: str, source_ctx: gx.Context, url: str, value: str) -> tuple[str, dict]:
    """A data link as Grafana opens it: the dashboard and the variable values it sets."""
    url = url.replace("${__value.raw}", value)
    url = url.replace("${__url_time_range}", f"from={source_ctx.from_ms}&to={source_ctx.to_ms}")
    url = gx.interpolate(url, source_ctx)
    m = re.match(r"^/d/([^/?]+)/[^?]*\?(.*)$", url)
    params: dict[str, list] = {}
    for k, v in urllib.parse.parse_qsl(m.group(2), keep_blank_values=True):
        params.setdefault(k, []).append(v)
    assert params["from"] == [str(source_ctx.from_ms)] and params["to"] == [str(source_ctx.to_ms)]
    return m.group(1), {k[4:]: v for k, v in params.items() if k.startswith("var-")}


def test_data_links_lead_to_the_trace_and_back(stack):
    logs = DASHBOARDS["sluice-logs"]
    scenario = SCENARIOS["sluice-logs"][0]
    variables = resolve_variables(stack, "sluice-logs", scenario, check=False)
    table = next(p for p in all_panels(logs) if p["type"] == "table")
    from_ms, to_ms = time_range(stack, scenario.range_)
    ctx = panel_context(logs, table, variables, from_ms, to_ms)
    cols, rows = run_sql(stack, CH_UID, gx.expand_ch(table["targets"][0]["rawSql"], ctx))
    trace_ids = [r[cols.index("trace_id")] for r in rows]
    assert OTLP_TRACE in trace_ids
    link = table["fieldConfig"]["overrides"][0]["properties"][0]["value"][0]["url"]
    target, link_vars = follow_link(stack, "sluice-logs", ctx, link, OTLP_TRACE)
    assert target == "sluice-traces" and link_vars == {"trace_id": [OTLP_TRACE]}

    # The traces dashboard opened by the link shows that trace.
    traces_scenario = Scenario("from-logs-link", "40m", {"trace_id": OTLP_TRACE})
    tvars = resolve_variables(stack, "sluice-traces", traces_scenario, check=False)
    for panel in all_panels(DASHBOARDS["sluice-traces"]):
        if "$trace_id" in panel["title"]:
            run_target(stack, "sluice-traces", panel, panel["targets"][0], traces_scenario, tvars)
            assert "trace_id" in panel["targets"][0]["rawSql"]

    # From the trace's spans back to the trace's logs.
    spans_panel = next(p for p in all_panels(DASHBOARDS["sluice-traces"])
                       if p["type"] == "table" and p["fieldConfig"]["overrides"]
                       and p["fieldConfig"]["overrides"][0]["matcher"]["options"] == "span_id")
    tctx = panel_context(DASHBOARDS["sluice-traces"], spans_panel, tvars, from_ms, to_ms)
    back = spans_panel["fieldConfig"]["overrides"][0]["properties"][0]["value"][0]["url"]
    target, link_vars = follow_link(stack, "sluice-traces", tctx, back, OTLP_CHILD)
    assert target == "sluice-logs" and link_vars == {"trace_id": [OTLP_TRACE]}
    logs_scenario = Scenario("from-trace-link", "40m", {"trace_id": OTLP_TRACE})
    lvars = resolve_variables(stack, "sluice-logs", logs_scenario, check=False)
    run_target(stack, "sluice-logs", table, table["targets"][0], logs_scenario, lvars)
    lctx = panel_context(logs, table, lvars, from_ms, to_ms)
    assert [(l.trace_id, l.span_id) for l in log_filtered(stack.data, lctx)] == [(OTLP_TRACE, OTLP_ROOT)]

    # The slowest-traces table links to the trace within the same dashboard.
    slow = next(p for p in all_panels(DASHBOARDS["sluice-traces"]) if p["title"] == "Slowest traces")
    svars = resolve_variables(stack, "sluice-traces", SCENARIOS["sluice-traces"][1], check=False)
    sctx = panel_context(DASHBOARDS["sluice-traces"], slow, svars, from_ms, to_ms)
    url = slow["fieldConfig"]["overrides"][0]["properties"][0]["value"][0]["url"]
    target, link_vars = follow_link(stack, "sluice-traces", sctx, url, "t1")
    assert target == "sluice-traces" and link_vars == {"trace_id": ["t1"], "service": ["db"]}


# =============================================================================== Prometheus


def registered_metrics() -> dict[str, set[str]]:
    """Metric name → label names, from the Rust registrations (server/core, server/wal)."""
    out: dict[str, set[str]] = {}
    for f in (REPO / "server" / "core" / "src" / "metrics.rs", REPO / "server" / "wal" / "src" / "metrics.rs"):
        text = f.read_text()
        for m in re.finditer(r'"(sluice_[a-z0-9_]+)"', text):
            rest = text[m.end():m.end() + 600]
            # The labels array of this registration, if it has one before the next name.
            nxt = re.search(r'"sluice_[a-z0-9_]+"', rest)
            seg = rest[:nxt.start()] if nxt else rest
            labels = re.search(r"&\[([^\]]*)\]", seg)
            out[m.group(1)] = set(re.findall(r'"([a-z_]+)"', labels.group(1))) if labels else set()
    return out


def _walk(e) -> typing.Iterator:
    yield e
    for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(e, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            yield from _walk(child)
    args = getattr(e, "args", None)
    if args is not None:
        for a in (args if isinstance(args, (list, tuple)) else getattr(args, "args", args)):
            yield from _walk(a)


def _selectors(e) -> list:
    import promql_parser as pp
    return [n for n in _walk(e) if isinstance(n, pp.VectorSelector)]


def _output_labels(e, families: dict[str, set]) -> Optional[set]:
    """Labels of an expression's result (None: any; scalars give an empty set)."""
    import promql_parser as pp
    if isinstance(e, pp.AggregateExpr):
        mod = e.modifier
        if mod is None:
            return set()
        labels = set(mod.labels)
        return labels if "By" in str(mod.type) else None
    if isinstance(e, pp.BinaryExpr):
        lhs, rhs = _output_labels(e.lhs, families), _output_labels(e.rhs, families)
        return lhs if lhs else rhs
    if isinstance(e, (pp.ParenExpr, pp.UnaryExpr)):
        return _output_labels(e.expr, families)
    if isinstance(e, pp.MatrixSelector):
        return _output_labels(e.vector_selector, families)
    if isinstance(e, pp.Call):
        for a in _walk(e):
            if isinstance(a, pp.VectorSelector):
                return families.get(a.name, set()) | {"instance", "job"}
        return set()
    if isinstance(e, pp.VectorSelector):
        return families.get(e.name, set()) | {"instance", "job"}
    return set()


def test_prometheus_panels(stack):
    import promql_parser as pp
    text = http_get(stack.sluice.http_url, "/metrics").decode()
    live = metric_samples(text)
    live_labels = {name: set().union(*[set(l) for l, _ in samples]) if samples else set()
                   for name, samples in live.items()}
    registered = registered_metrics()
    scrape = gx.interval_to_ms(provisioned_datasources()[PROM_UID].get("jsonData", {}).get("timeInterval", "15s")) // 1000
    only_registered: set[str] = set()
    self_dash = DASHBOARDS["sluice-self"]
    now_ms = int(time.time() * 1000)
    for selection in ([gx.ALL], ["127.0.0.1:8080", "sluice:8080"]):
        inst_def = self_dash["templating"]["list"][0]
        inst = gx.Variable("instance", "query", True, True, inst_def.get("allValue"), selection,
                           ["127.0.0.1:8080", "sluice:8080"])
        for uid, panel, target in prom_targets():
            ctx = panel_context(DASHBOARDS[uid], panel, {"instance": inst}, now_ms - 3_600_000, now_ms,
                                ds_interval=f"{scrape}s")
            expr = gx.expand_prom(target["expr"], ctx, scrape)
            assert "$" not in expr, f"{panel['title']}: unexpanded variable in {expr}"
            try:
                ast = pp.parse(expr)
            except Exception as e:
                raise AssertionError(f"{panel['title']} {target['refId']}: PromQL does not parse: {e}\n{expr}")
            families = {}
            for sel in _selectors(ast):
                name = sel.name
                if name in live:
                    labels = live_labels[name] | live_labels.get(name + "_total", set())
                elif name in registered:
                    labels = registered[name]
                    only_registered.add(name)
                else:
                    raise AssertionError(f"{panel['title']}: metric {name} is neither in /metrics "
                                         f"nor registered by Sluice")
                families[name] = labels
                for m in sel.matchers.matchers:
                    assert m.name in labels | {"instance", "job", "__name__"}, \
                        f"{panel['title']}: {name} has no label {m.name}"
            for node in _walk(ast):
                if isinstance(node, pp.AggregateExpr) and node.modifier is not None:
                    inner = set().union(*[families[s.name] for s in _selectors(node.expr)]) | {"instance", "job"}
                    missing = set(node.modifier.labels) - inner
                    assert not missing, f"{panel['title']}: grouped by labels {missing} the metric lacks"
            out = _output_labels(ast, families)
            for lab in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert out is None or lab in out, \
                    f"{panel['title']} {target['refId']}: legend uses {{{{{lab}}}}}, the result has {out}"
    # The variable's label_values() metric.
    for v in self_dash["templating"]["list"]:
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q)
        assert m and m.group(1) in live, q
    # What this run could only check against the Rust registration (no sample of it).
    expected_conditional = {"sluice_timescaledb_job_failing", "sluice_timescaledb_job_runs_total",
                            "sluice_sink_retries_total", "sluice_sink_failed_tables",
                            "sluice_rollup_late_points_total", "sluice_rollup_refused_points_total",
                            "sluice_archive_errors_total",
                            "sluice_archive_rows_total", "sluice_archive_lag_seconds"}
    print(f"\nPromQL metric names checked only against the Rust registration "
          f"(no sample in this run): {sorted(only_registered)}")
    assert only_registered <= expected_conditional, only_registered - expected_conditional
    # The dead letter and the refused batch this test caused are visible.
    assert any(l.get("sink") == "postgres" and l.get("table") == "metrics_events" and v >= 1
               for l, v in live.get("sluice_sink_dead_letter_rows_total", [])), live.get("sluice_sink_dead_letter_rows_total")
    assert any(l.get("table") == "metrics" and v >= 1
               for l, v in live.get("sluice_ingest_refused_rows_total", [])), live.get("sluice_ingest_refused_rows_total")


# =============================================================================== retention (last: stops sluice)


def test_tiered_panels_after_retention(stack):
    """With sluice stopped (so its refresh cannot recompute the minutes), the first 150 s of
    raw points go, as retention would take them: the tiered panels then read those minutes
    from metrics_1m and the raw panel no longer shows them."""
    stack.sluice.stop()
    cut_s = stack.data.t0 + 150
    psql(stack.pg_url, f"DELETE FROM metrics_points WHERE time < to_timestamp({cut_s})")
    stack.data.deleted_before_us = cut_s * 1_000_000
    try:
        scenario = SCENARIOS["sluice-metrics"][0]
        variables = resolve_variables(stack, "sluice-metrics", scenario, check=True)
        for panel, target in sql_targets("sluice-metrics"):
            run_target(stack, "sluice-metrics", panel, target, scenario, variables)
        from_ms, to_ms = time_range(stack, scenario.range_)
        ctx = panel_context(DASHBOARDS["sluice-metrics"], all_panels(DASHBOARDS["sluice-metrics"])[2],
                            variables, from_ms, to_ms)
        tiers = {(l, tier) for _, l, _, tier in tiered(stack.data, ctx)}
        assert ('{"dc": "x", "host": "a"}', "1m") in tiers and ('{"dc": "x", "host": "a"}', "raw") in tiers
    finally:
        stack.data.deleted_before_us = None
