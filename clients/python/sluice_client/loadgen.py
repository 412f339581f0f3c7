"""A load generator for Sluice's REST writes: metrics, logs and traces, every second.

Standard library only (urllib, json, gzip), so it runs on a bare ``python:3.11-slim``::

    python -m sluice_client.loadgen --http http://127.0.0.1:8080 --rate 10
    python clients/python/sluice_client/loadgen.py --http http://sluice:8080   # no package import

(``python -m sluice_client.loadgen`` imports the ``sluice_client`` package first, which
needs pyarrow; running the file by its path does not.)

Each round (``--interval``, default 1 s) it simulates ``--rate`` requests per second of a
small shop (services web -> api -> auth / cache / db) and sends, gzip-compressed:

- ``POST /write/metrics`` (the ``metrics`` table, friendly form
  ``{"name", "labels", "value", "time"}``, time in epoch milliseconds): about 20 series:
  ``cpu_usage_percent`` and ``memory_used_bytes`` per host, the counter
  ``http_requests_total`` per route and status class, ``http_request_duration_seconds``
  per route and quantile (0.5, 0.99), ``api_queue_depth``;
- ``POST /write/logs`` (``logs_events``): an access log line per request, warnings for
  slow queries, errors with the failing span's ids, and some background chatter;
- ``POST /write/spans`` and ``POST /write/span_events``: one trace per request, 4-6 spans
  with parent links, nested times, ``span.kind`` and HTTP attributes; about
  ``--error-ratio`` of them fail in the database or auth service, the error marked on
  the span and its ancestors, with an ``exception`` span event.

A 429 or 503 is retried after the server's ``Retry-After`` (seconds or an HTTP date), a
refused connection or a timeout after an exponential backoff, up to ``--max-retries``
times; anything else (a 400 names the line and field) is logged with the server's message
and that payload is dropped. ``--once --dry-run`` prints one round's payloads as one
JSON object ``{"/write/metrics": [...], "/write/logs": [...], ...}`` instead of sending.
"""

from __future__ import annotations

import argparse
import email.utils
import gzip
import http.client
import json
import logging
import random
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["Generator", "Sender", "main"]

log = logging.getLogger("sluice-loadgen")

HOSTS = ["host-1", "host-2", "host-3", "host-4"]
ROUTES = [
    # (method, route, weight, base latency in ms)
    ("GET", "/search", 5, 35.0),
    ("GET", "/cart", 3, 20.0),
    ("POST", "/checkout", 2, 80.0),
]
QUANTILES = (0.5, 0.99)
DB_STATEMENTS = {
    "/search": "SELECT id, name, price FROM products WHERE name ILIKE $1 LIMIT 20",
    "/cart": "SELECT item_id, qty FROM cart_items WHERE cart_id = $1",
    "/checkout": "INSERT INTO orders (cart_id, total) VALUES ($1, $2) RETURNING id",
}
DB_ERRORS = [
    ("PostgresError", "deadlock detected"),
    ("PostgresError", "canceling statement due to statement timeout"),
    ("ConnectionError", "connection reset by peer"),
]
AUTH_ERRORS = [("TokenExpired", "token expired"), ("Unauthorized", "invalid signature")]
BACKGROUND = [
    ("cache", "info", "evicted {n} keys (maxmemory reached)"),
    ("api", "debug", "connection pool: {n} idle, 2 busy"),
    ("web", "info", "health check ok"),
    ("db", "warn", "checkpoint took {n}00 ms"),
]


def rfc3339(ts_us: int) -> str:
    """Microseconds since 1970 as RFC 3339 UTC with microseconds."""
    secs, micros = divmod(ts_us, 1_000_000)
    return (
        datetime.fromtimestamp(secs, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        + f".{micros:06d}Z"
    )


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    host: str
    name: str
    kind: str
    start_us: int
    end_us: int
    attr: Dict[str, str] = field(default_factory=dict)
    status_code: str = "Ok"
    status_message: str = ""

    def record(self) -> Dict[str, Any]:
        attr = dict(self.attr)
        attr["span.kind"] = self.kind
        attr["resource.host.name"] = self.host
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "service": self.service,
            "name": self.name,
            "start_time": rfc3339(self.start_us),
            "end_time": rfc3339(self.end_us),
            "duration_ns": (self.end_us - self.start_us) * 1000,
            "status_code": self.status_code,
            "status_message": self.status_message,
            "attr": attr,
        }


class Generator:
    """Builds each round's records; keeps the counters and gauges between rounds."""

    def __init__(self, rate: float, error_ratio: float, seed: Optional[int] = None):
        self.rate = rate
        self.error_ratio = error_ratio
        self.rng = random.Random(seed)
        self.cpu = {h: self.rng.uniform(15, 40) for h in HOSTS}
        self.mem = {h: self.rng.uniform(1.5e9, 3e9) for h in HOSTS}
        self.requests_total: Dict[Tuple[str, str], float] = {
            (route, status): 0.0
            for _, route, _, _ in ROUTES
            for status in ("2xx", "4xx", "5xx")
        }
        self.queue_depth = 3.0

    # -- ids and random helpers -------------------------------------------------------
    def _hex(self, nbytes: int) -> str:
        return f"{self.rng.getrandbits(nbytes * 8):0{nbytes * 2}x}"

    def _requests_this_round(self, interval: float) -> int:
        mean = self.rate * interval
        if mean <= 0:
            return 0
        # Poisson-ish: normal around the mean, never negative.
        return max(0, int(round(self.rng.gauss(mean, max(1.0, mean ** 0.5)))))

    # -- one simulated request -> spans, events, logs -----------------------------------
    def _trace(self, now_us: int, interval_us: int):
        """One request: web -> api -> auth, cache, db (-> commit). Children are laid out
        first, one after another; each parent ends a little after its last child."""
        method, route, _, base_ms = self.rng.choices(ROUTES, weights=[r[2] for r in ROUTES])[0]
        trace_id = self._hex(16)
        host = self.rng.choice(HOSTS)
        fail = self.rng.random() < self.error_ratio
        fail_in = self.rng.choice(["db", "db", "auth"]) if fail else ""
        # A request that fails in the database missed the cache.
        cache_hit = route != "/checkout" and fail_in != "db" and self.rng.random() < 0.6
        slow_db = not fail and self.rng.random() < 0.05
        status = "500" if fail_in == "db" else ("401" if fail_in == "auth" else "200")

        def gap() -> int:
            return int(self.rng.uniform(0.05, 0.4) * 1000)

        def ms(lo: float, hi: float) -> int:
            return int(self.rng.uniform(lo, hi) * 1000)

        # Lay the trace out from 0, then shift it to end within the last interval.
        web = Span(trace_id, self._hex(8), "", "web", host, f"{method} {route}", "Server",
                   0, 0, {"http.method": method, "http.route": route,
                          "http.status_code": status,
                          "http.user_agent": "Mozilla/5.0 (loadgen)"})
        t = gap()
        api = Span(trace_id, self._hex(8), web.span_id, "api", host, f"api {route}", "Server",
                   t, 0, {"http.method": method, "http.route": route,
                          "http.status_code": status})
        t += gap()
        auth = Span(trace_id, self._hex(8), api.span_id, "auth", host, "auth.verify_token",
                    "Client", t, t + ms(1.0, 4.0), {"auth.method": "jwt"})
        t = auth.end_us + gap()
        spans = [web, api, auth]
        failing: Optional[Span] = None
        err: Tuple[str, str] = ("", "")
        slow: Optional[Span] = None
        if fail_in == "auth":
            failing, err = auth, self.rng.choice(AUTH_ERRORS)
        else:
            cache = Span(trace_id, self._hex(8), api.span_id, "cache", host, "redis GET",
                         "Client", t, t + ms(0.2, 1.5),
                         {"db.system": "redis", "cache.hit": "true" if cache_hit else "false"})
            spans.append(cache)
            t = cache.end_us + gap()
            if not cache_hit:
                db_us = int(self.rng.lognormvariate(0, 0.5) * base_ms * 1000)
                db_us *= 8 if slow_db else 1
                if fail_in == "db":
                    db_us = int(db_us * self.rng.uniform(1.5, 4))
                db = Span(trace_id, self._hex(8), api.span_id, "db", host,
                          "postgresql " + DB_STATEMENTS[route].split()[0], "Client",
                          t, t + db_us,
                          {"db.system": "postgresql", "db.statement": DB_STATEMENTS[route]})
                spans.append(db)
                t = db.end_us + gap()
                if fail_in == "db":
                    failing, err = db, self.rng.choice(DB_ERRORS)
                elif slow_db:
                    slow = db
                if route == "/checkout" and not fail:
                    spans.append(Span(trace_id, self._hex(8), db.span_id, "db", host,
                                      "db.commit", "Internal",
                                      db.end_us - db_us // 5, db.end_us, {}))
        api.end_us = t + ms(0.1, 1.0)
        web.end_us = api.end_us + gap() + ms(0.5, 3.0)
        web_us = web.end_us

        # Shift: the request ended at a random moment of the last interval.
        shift = now_us - int(self.rng.uniform(0, interval_us)) - web_us
        for sp in spans:
            sp.start_us += shift
            sp.end_us += shift

        events: List[Dict[str, Any]] = []
        logs: List[Dict[str, Any]] = []
        if failing is not None:
            etype, emsg = err
            failing.status_code = "Error"
            failing.status_message = emsg
            for sp in (api, web):
                sp.status_code = "Error"
                sp.status_message = f"{failing.service}: {emsg}"
            events.append({
                "trace_id": trace_id, "span_id": failing.span_id,
                "ts": rfc3339(failing.end_us - 50), "name": "exception",
                "attr": {"exception.type": etype, "exception.message": emsg,
                         "exception.escaped": "false"},
            })
            logs.append(self._log(failing.end_us, failing.service, host, "error", trace_id,
                                  failing.span_id, f"{failing.name} failed: {etype}: {emsg}",
                                  {"exception.type": etype}))
        elif cache_hit and self.rng.random() < 0.1:
            cache = spans[3]
            events.append({"trace_id": trace_id, "span_id": cache.span_id,
                           "ts": rfc3339(cache.start_us + 10), "name": "cache.hit",
                           "attr": {"cache.key": f"{route.strip('/')}:{self._hex(2)}"}})
        if slow is not None:
            logs.append(self._log(slow.end_us, "db", host, "warn", trace_id, slow.span_id,
                                  f"slow query ({(slow.end_us - slow.start_us) // 1000} ms): "
                                  f"{DB_STATEMENTS[route]}", {"db.system": "postgresql"}))
        level = "error" if status == "500" else ("warn" if status != "200" else "info")
        logs.append(self._log(api.start_us + 100, "api", host, "debug", trace_id, api.span_id,
                              f"handling {route} for user u{self.rng.randint(1, 500)}", {}))
        logs.append(self._log(web.end_us, "web", host, level, trace_id, web.span_id,
                              f"{method} {route} {status} {web_us / 1000:.1f}ms",
                              {"http.method": method, "http.route": route,
                               "http.status_code": status}))
        status_class = "2xx" if status == "200" else ("5xx" if status == "500" else "4xx")
        return route, status_class, web_us / 1e6, spans, events, logs

    @staticmethod
    def _log(ts_us, service, host, level, trace_id, span_id, message, labels):
        return {
            "timestamp": rfc3339(ts_us)[:23] + "Z",  # the column is milliseconds
            "service": service,
            "host": host,
            "level": level,
            "trace_id": trace_id,
            "span_id": span_id,
            "message": message,
            "labels": {"env": "poc", **labels},
        }

    # -- a whole round ------------------------------------------------------------------
    def round(self, now: Optional[float] = None, interval: float = 1.0) -> Dict[str, list]:
        now = time.time() if now is None else now
        now_us = int(now * 1_000_000)
        now_ms = now_us // 1000
        spans: List[Dict[str, Any]] = []
        events: List[Dict[str, Any]] = []
        logs: List[Dict[str, Any]] = []
        latencies: Dict[str, List[float]] = {route: [] for _, route, _, _ in ROUTES}
        for _ in range(self._requests_this_round(interval)):
            route, status_class, secs, s, e, lg = self._trace(now_us, int(interval * 1e6))
            key = (route, status_class)
            self.requests_total[key] = self.requests_total.get(key, 0.0) + 1
            latencies[route].append(secs)
            spans += [x.record() for x in s]
            events += e
            logs += lg
        if self.rng.random() < 0.5:
            service, level, text = self.rng.choice(BACKGROUND)
            logs.append(self._log(now_us - 1000, service, self.rng.choice(HOSTS), level, "", "",
                                  text.format(n=self.rng.randint(2, 40)), {"background": "true"}))

        def point(name: str, labels: Dict[str, str], value: float) -> Dict[str, Any]:
            return {"name": name, "labels": labels, "value": float(value), "time": now_ms}

        metrics = []
        load = len(spans) / max(1.0, 5 * self.rate * interval)
        for h in HOSTS:
            # A random walk pulled towards 25 % + 30 % at the nominal rate.
            self.cpu[h] = min(99.0, max(1.0, self.cpu[h] + self.rng.gauss(0, 2)
                                        + (25 + 30 * load - self.cpu[h]) * 0.1))
            self.mem[h] = min(7.5e9, max(5e8, self.mem[h] + self.rng.gauss(0, 2e7)))
            metrics.append(point("cpu_usage_percent", {"host": h, "env": "poc"},
                                 round(self.cpu[h], 2)))
            metrics.append(point("memory_used_bytes", {"host": h, "env": "poc"},
                                 round(self.mem[h])))
        for (route, status_class), total in sorted(self.requests_total.items()):
            metrics.append(point("http_requests_total",
                                 {"service": "web", "route": route, "status": status_class},
                                 total))
        for route, values in latencies.items():
            if not values:
                continue
            values.sort()
            for q in QUANTILES:
                v = values[min(len(values) - 1, int(q * len(values)))]
                metrics.append(point("http_request_duration_seconds",
                                     {"service": "web", "route": route, "quantile": str(q)},
                                     round(v, 6)))
        self.queue_depth = max(0.0, self.queue_depth + self.rng.gauss(0, 1.5))
        metrics.append(point("api_queue_depth", {"service": "api"}, round(self.queue_depth)))
        return {
            "/write/metrics": metrics,
            "/write/logs": logs,
            "/write/spans": spans,
            "/write/span_events": events,
        }


class Stop(Exception):
    pass


class Sender:
    """POSTs JSON arrays with gzip, retrying 429/503 (Retry-After) and connection errors."""

    def __init__(self, base: str, max_retries: int = 8, timeout: float = 30.0,
                 compress: bool = True, stopping=lambda: False):
        self.base = base.rstrip("/")
        self.max_retries = max_retries
        self.timeout = timeout
        self.compress = compress
        self.stopping = stopping

    @staticmethod
    def retry_after(value: Optional[str]) -> Optional[float]:
        """Retry-After as seconds: delta-seconds or an HTTP date; None when absent/bad."""
        if not value:
            return None
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.stopping():
                raise Stop()
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    def post(self, path: str, records: List[Dict[str, Any]]) -> Optional[int]:
        """Sends the records; returns the rows the server stored, or None on failure."""
        body = json.dumps(records, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "sluice-loadgen/0.1"}
        if self.compress:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        url = self.base + path
        attempt = 0
        while True:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    answer = json.loads(resp.read() or b"{}")
                    return int(answer.get("rows", len(records)))
            except urllib.error.HTTPError as e:
                detail = e.read(2000).decode("utf-8", "replace").strip()
                try:
                    detail = json.loads(detail).get("error", detail)
                except (ValueError, AttributeError):
                    pass
                if e.code in (429, 503) and attempt < self.max_retries:
                    wait = self.retry_after(e.headers.get("Retry-After"))
                    wait = min(60.0, wait if wait is not None else self._backoff(attempt))
                    log.warning("POST %s: HTTP %d (%s); retrying in %.1fs (attempt %d/%d)",
                                path, e.code, detail, wait, attempt + 1, self.max_retries)
                    attempt += 1
                    self._sleep(wait)
                    continue
                log.error("POST %s: HTTP %d: %s -- %d records dropped",
                          path, e.code, detail, len(records))
                return None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                if attempt < self.max_retries:
                    wait = self._backoff(attempt)
                    log.warning("POST %s: %s; retrying in %.1fs (attempt %d/%d)",
                                path, reason, wait, attempt + 1, self.max_retries)
                    attempt += 1
                    self._sleep(wait)
                    continue
                log.error("POST %s: %s, gave up after %d retries -- %d records dropped",
                          path, reason, self.max_retries, len(records))
                return None

    @staticmethod
    def _backoff(attempt: int) -> float:
        return min(30.0, 0.5 * 2 ** attempt) * random.uniform(0.8, 1.2)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sluice-loadgen",
        description="Keeps writing metrics, logs and spans to Sluice's REST API.")
    p.add_argument("--http", default="http://127.0.0.1:8080",
                   help="Sluice's HTTP address (default %(default)s)")
    p.add_argument("--rate", type=float, default=10.0,
                   help="simulated requests per second, one trace and 2-3 log lines each "
                        "(default %(default)s)")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between rounds (default %(default)s)")
    p.add_argument("--error-ratio", type=float, default=0.05,
                   help="share of requests that fail (default %(default)s)")
    p.add_argument("--max-retries", type=int, default=8,
                   help="retries of one POST on 429/503/connection errors (default %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    p.add_argument("--no-gzip", action="store_true", help="send bodies uncompressed")
    p.add_argument("--seed", type=int, default=None, help="random seed (repeatable data)")
    p.add_argument("--once", action="store_true", help="one round, then exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print each round's payloads as one JSON line instead of sending")
    p.add_argument("-v", "--verbose", action="store_true", help="log every POST")
    args = p.parse_args(argv)
    if args.rate < 0 or args.interval <= 0 or not 0 <= args.error_ratio <= 1:
        p.error("--rate must be >= 0, --interval > 0, --error-ratio within 0..1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr)
    stop = {"now": False}

    def on_signal(signum, _frame):  # PID 1 in a container gets no default SIGTERM action
        log.info("signal %d: stopping after this request", signum)
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    gen = Generator(args.rate, args.error_ratio, args.seed)
    sender = Sender(args.http, args.max_retries, args.timeout, not args.no_gzip,
                    stopping=lambda: stop["now"])
    if not args.dry_run:
        log.info("writing to %s: %.1f requests/s, a round every %.1fs",
                 sender.base, args.rate, args.interval)
    sent = {"rows": 0, "failed": 0, "rounds": 0}
    next_round = time.monotonic()
    try:
        while not stop["now"]:
            payloads = gen.round(interval=args.interval)
            if args.dry_run:
                print(json.dumps(payloads, separators=(",", ":")), flush=True)
            else:
                for path, records in payloads.items():
                    if not records:
                        continue
                    rows = sender.post(path, records)
                    if rows is None:
                        sent["failed"] += 1
                    else:
                        sent["rows"] += rows
                        log.debug("POST %s: %d rows", path, rows)
                sent["rounds"] += 1
                if sent["rounds"] % 30 == 1:
                    log.info("round %d: %d rows stored so far, %d failed requests",
                             sent["rounds"], sent["rows"], sent["failed"])
            if args.once:
                break
            next_round += args.interval
            delay = next_round - time.monotonic()
            if delay < 0:
                if delay < -5 * args.interval:
                    log.warning("%.1fs behind schedule; skipping ahead", -delay)
                    next_round = time.monotonic()
                continue
            end = time.monotonic() + delay
            while not stop["now"] and time.monotonic() < end:
                time.sleep(min(0.2, max(0.0, end - time.monotonic())))
    except Stop:
        pass
    except BrokenPipeError:  # e.g. --dry-run | head
        return 0
    if not args.dry_run:
        log.info("stopped: %d rounds, %d rows stored, %d failed requests",
                 sent["rounds"], sent["rows"], sent["failed"])
        if args.once and sent["failed"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
