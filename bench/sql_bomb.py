#!/usr/bin/env python3
"""SQL-bomb benchmark: ingest at full rate while hostile queries run (issue 10).

In one run, against one release binary (fsync on, default settings) and the same
pre-generated rows (points shape: time us, series_id, value; 64k-row batches):

* **quiet**: one client streams ``--rows`` rows over one DoPut; nothing else runs;
* **bombs**: the same client streams the same rows while three processes keep running
  * a cross join of two 100M-row ranges (Flight DoGet, cancelled when the phase ends),
  * a huge value, ``SELECT cardinality(range(100000000000))`` (HTTP /query), and
  * a deep expression, ``SELECT 1+1+...+1`` with 950 terms (HTTP /query),
  one after the other as each ends, each refused or stopped by Sluice's limits.

A refused bomb is sent again every 20 ms. A thread samples ``/healthz`` every 20 ms in
both phases. Every measurement starts a fresh server in a fresh data directory; the phases
alternate rep by rep, and which goes first too (``--reps``, best and median of each
reported). Targets (exit status 1 when missed): ingest
with bombs at least 0.8 of quiet ingest, ``/healthz`` p99 under 100 ms while the bombs
run (and no failed probe), and in every measurement the rows acked equal to the rows
written and to ``SELECT count(*)`` (a failed count query counts as a mismatch). A missing
binary or any error in a measurement also exits 1; the settings sluice ran with are
printed, each marked default or tuned.

Usage: ``bench/run.sh bomb [--rows N] [--reps N]`` (builds the release binary), or
``python bench/sql_bomb.py --sluice-bin PATH [--rows N] [--reps N]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "clients" / "python"))
sys.path.insert(0, str(REPO / "bench"))
from sluice_client import SluiceClient  # noqa: E402
from flight_bench import Proc, describe_settings, gen_points, require_file  # noqa: E402

SCHEMA = {
    "name": "bomb_points",
    "columns": [
        {"name": "time", "type": "timestamp"},
        {"name": "series_id", "type": "int64"},
        {"name": "value", "type": "double"},
    ],
}
CROSS_JOIN = "SELECT count(*) FROM range(100000000) a CROSS JOIN range(100000000) b"
HUGE = "SELECT cardinality(range(100000000000))"
DEEP = "SELECT " + "+".join(["1"] * 950)


def http_post(addr: str, path: str, body: dict, timeout: float = 120.0) -> tuple[int, bytes]:
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


class Sampler(threading.Thread):
    """GET /healthz every 20 ms; keeps the latencies (ms)."""

    def __init__(self, addr: str):
        super().__init__(daemon=True)
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.stop = threading.Event()
        self.ms: list[float] = []
        self.failures = 0

    def run(self):
        while not self.stop.is_set():
            t = time.perf_counter()
            try:
                c = http.client.HTTPConnection(self.host, self.port, timeout=5)
                c.request("GET", "/healthz")
                ok = c.getresponse().status == 200
                c.close()
            except OSError:
                ok = False
            if ok:
                self.ms.append((time.perf_counter() - t) * 1000)
            else:
                self.failures += 1
            self.stop.wait(0.02)


def bomb(kind: str, grpc: str, http_addr: str, stop, out) -> None:
    """Runs one hostile query again and again until ``stop`` is set; puts how each ended
    on ``out``. A process of its own, so the bomb clients do not take the writer's GIL."""
    outcomes: dict[str, int] = {}

    def note(what: str):
        outcomes[what] = outcomes.get(what, 0) + 1

    client = flight.FlightClient(f"grpc://{grpc}")
    while not stop.is_set():
        try:
            if kind == "cross_join":
                # Cancelled from here when the phase ends: a short deadline per call.
                opts = flight.FlightCallOptions(timeout=2.0)
                try:
                    client.do_get(flight.Ticket(CROSS_JOIN.encode()), opts).read_all()
                    note("finished")
                except flight.FlightTimedOutError:
                    note("cancelled by the client")
                except flight.FlightError as e:
                    note(type(e).__name__)
            else:
                status, _ = http_post(http_addr, "/query", {"sql": HUGE if kind == "huge" else DEEP})
                note(f"http {status}")
                # Refused at once: sent again every 20 ms (a hostile client, not a flood of
                # requests, which is another test).
                stop.wait(0.02)
        except Exception as e:  # noqa: BLE001 - a bench counts whatever happens
            note(type(e).__name__)
    out.put((kind, outcomes))


def write(grpc: str, batches: list[pa.RecordBatch]) -> tuple[float, int]:
    client = SluiceClient(f"grpc://{grpc}")
    t = time.perf_counter()
    acks = client.write(SCHEMA["name"], batches)
    secs = time.perf_counter() - t
    client.close()
    return secs, sum(a["rows"] for a in acks)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sluice-bin", default=os.environ.get("SLUICE_BIN", str(REPO / "target/release/sluice")))
    args = ap.parse_args()
    if args.rows < 1 or args.reps < 1:
        ap.error("--rows and --reps must be at least 1")
    require_file(args.sluice_bin, "sluice binary",
                 "build it: cargo build --release -p sluice, or --sluice-bin")

    table = gen_points(args.rows)
    batches = table.to_batches(max_chunksize=65536)
    results: dict[str, list[float]] = {"quiet": [], "bombs": []}
    health: dict[str, list[float]] = {"quiet": [], "bombs": []}
    failures = {"quiet": 0, "bombs": 0}
    outcomes: dict[str, dict[str, int]] = {}
    written = acked = counted = 0
    mismatches: list[str] = []
    settings = None
    mp = multiprocessing.get_context("spawn")
    for rep in range(args.reps):
        # Alternate which phase goes first; each measurement gets a fresh server and data
        # directory, so both phases start from the same state.
        for phase in (("quiet", "bombs") if rep % 2 == 0 else ("bombs", "quiet")):
            with tempfile.TemporaryDirectory(prefix="sluice-bomb.") as tmp:
                env = dict(os.environ,
                           SLUICE__SERVER__DATA_DIR=f"{tmp}/data",
                           SLUICE__SERVER__GRPC_ADDR="127.0.0.1:0",
                           SLUICE__SERVER__HTTP_ADDR="127.0.0.1:0",
                           SLUICE__WAL__FSYNC="true",
                           RUST_LOG="warn")
                settings = describe_settings(env)
                server = Proc([args.sluice_bin, "serve"], env, "SLUICE_READY", f"{tmp}/sluice.log")
                sampler = None
                stop, out = mp.Event(), mp.Queue()
                bombers: list = []
                try:
                    grpc, http_addr = server.addrs["grpc"], server.addrs["http"]
                    SluiceClient(f"grpc://{grpc}").register_table(SCHEMA)
                    sampler = Sampler(http_addr)
                    if phase == "bombs":
                        bombers = [mp.Process(target=bomb, args=(k, grpc, http_addr, stop, out),
                                              daemon=True)
                                   for k in ("cross_join", "huge", "deep")]
                    sampler.start()
                    for b in bombers:
                        b.start()
                    # The bombs are running before the first batch (a spawned process needs
                    # a moment to import pyarrow).
                    time.sleep(2.0 if bombers else 0.0)
                    secs, rows = write(grpc, batches)
                    written += args.rows
                    acked += rows
                    stop.set()
                    sampler.stop.set()
                    for _ in bombers:
                        kind, got = out.get(timeout=30)
                        for k, v in got.items():
                            outcomes.setdefault(kind, {}).setdefault(k, 0)
                            outcomes[kind][k] += v
                    for b in bombers:
                        b.join(timeout=10)
                    sampler.join()
                    status, body = http_post(http_addr, "/query",
                                             {"sql": f"SELECT count(*) AS n FROM {SCHEMA['name']}"})
                    n = json.loads(body)[0]["n"] if status == 200 else -1
                    counted += n
                    if not rows == n == args.rows:
                        mismatches.append(f"rep {rep + 1} {phase}: written {args.rows}, "
                                          f"acked {rows}, counted {n} (HTTP {status})")
                except BaseException:
                    print(f"--- sluice log (tail) ---\n{server.tail()}", file=sys.stderr)
                    raise
                finally:
                    # Stop everything this measurement started, also when it failed (a
                    # bomb process left running would keep the bench from exiting).
                    stop.set()
                    if sampler is not None:
                        sampler.stop.set()
                    for b in bombers:
                        if b.is_alive():
                            b.terminate()
                            b.join()
                    server.stop()
            results[phase].append(args.rows / secs)
            health[phase].extend(sampler.ms)
            failures[phase] += sampler.failures
            print(f"rep {rep + 1} {phase:5}: {args.rows / secs / 1e6:6.2f} M rows/s "
                  f"({secs:.2f} s), /healthz p50 {pct(sampler.ms, 50):.1f} ms "
                  f"p99 {pct(sampler.ms, 99):.1f} ms max {max(sampler.ms, default=0):.1f} ms",
                  flush=True)

    quiet, bombs = max(results["quiet"]), max(results["bombs"])
    ratio = bombs / quiet
    p99 = pct(health["bombs"], 99)
    print()
    print(f"ingest, quiet (best of {args.reps}):      {quiet / 1e6:.2f} M rows/s")
    print(f"ingest, with bombs (best of {args.reps}): {bombs / 1e6:.2f} M rows/s  ratio {ratio:.2f} (target >= 0.80)")
    print(f"ingest, with bombs (median):     {statistics.median(results['bombs']) / 1e6:.2f} M rows/s "
          f"vs quiet median {statistics.median(results['quiet']) / 1e6:.2f}")
    for phase in ("quiet", "bombs"):
        ms = health[phase]
        print(f"/healthz {phase:5}: n={len(ms)} p50 {pct(ms, 50):.1f} ms  p95 {pct(ms, 95):.1f} ms  "
              f"p99 {pct(ms, 99):.1f} ms  max {max(ms, default=0):.1f} ms  failures {failures[phase]}")
    print(f"bombs: {json.dumps(outcomes)}")
    print(f"rows written {written}, acked {acked}, counted by SQL {counted}")
    print(f"sluice settings: {settings}")
    ok = True
    if ratio < 0.8:
        print("FAIL: ingest with bombs is below 0.8 of quiet ingest")
        ok = False
    if not p99 < 100 or failures["bombs"]:
        print("FAIL: /healthz p99 is not under 100 ms while the bombs run (or it failed)")
        ok = False
    if mismatches or not (written == acked == counted):
        for m in mismatches:
            print(f"FAIL: row count mismatch: {m}")
        print("FAIL: rows written, acked and counted disagree")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
