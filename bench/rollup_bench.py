#!/usr/bin/env python3
"""Rollup cost benchmark: metric points into PostgreSQL with rollups on and off.

In one run, the same pre-generated points (10,000,000 by default, at 10,000 series: one
point per series per second, series interleaved as live scrapes are, in 64k-row batches)
go into the seed's ``metrics`` table of one PostgreSQL (``metric_series`` +
``metrics_points``) through two sluice release binaries that differ in one setting:

1. **rollups off**: ``[rollup] enabled = false``;
2. **rollups on**: the default (``metrics_1m`` in ClickHouse, every other setting at its
   default).

Both have ``[clickhouse] url`` set (a throwaway chdb-core server, or
``SLUICE_BENCH_CH_URL``), fsync on, every other setting at its default, and their own
data directory; they take turns, ``--reps`` times each, alternating which goes first.
``metrics_points`` (and ``metrics_1m`` in ClickHouse) are truncated before every
measurement. The clock runs from the first DoPut until PostgreSQL has every point
committed (``/readyz``) and, with rollups on, the rollup has also taken every point
(``sluice_rollup_points_total``), so its work is inside the measurement. After each
rollups-on measurement the bench waits for every bucket to be written and checks that
ClickHouse's ``metrics_1m`` counts every point once (``sum(count_v)``) in the expected
number of buckets; after every measurement it checks ``count(*)`` of ``metrics_points``.

Target (issue 14): rollups cost at most 10% of ingest rows/s, i.e. best rows/s with
rollups on >= 0.9 x best with rollups off. Exit status 1 when the target is missed, a count
differs, or something it needs is missing.

Usage: ``bench/run.sh rollup`` (builds the release binary first), or
``python bench/rollup_bench.py [--points N] [--series N] [--reps N] [--sluice-bin PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ch_bench import ThrowawayClickHouse  # noqa: E402
from flight_bench import BATCH_ROWS, Proc, describe_settings, require_file, require_tool  # noqa: E402
from pg_bench import ThrowawayPostgres, check_count, psql, wait_sink_idle  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "clients" / "python"))
from sluice_client import SluiceClient  # noqa: E402

# 2026-12-01T00:00:00Z
T0_US = 1_796_083_200 * 1_000_000
NAMES = ["cpu_usage", "mem_used", "disk_io", "net_rx", "net_tx",
         "load1", "procs", "ctx_switches", "irq", "temp"]


def gen_points(points: int, series: int) -> pa.Table:
    """``points`` rows: second ``i // series`` after T0 for series ``i % series``."""
    idx = pa.array(range(points), pa.int64())
    s = pc.remainder(idx, series)
    sec = pc.divide(idx, series)
    names = [NAMES[k % len(NAMES)] for k in range(series)]
    labels = [json.dumps({"host": f"host-{k // len(NAMES)}", "dc": f"dc{k % 3}"},
                         separators=(",", ":")) for k in range(series)]
    name_col = pc.take(pa.array(names), s)
    label_col = pc.take(pa.array(labels), s)
    time_col = pc.add(pc.multiply(sec, 1_000_000), T0_US).cast(pa.timestamp("us", tz="UTC"))
    value = pc.multiply(pc.cast(pc.remainder(pc.add(idx, sec), 1000), pa.float64()), 0.5)
    return pa.table({"time": time_col, "metric_name": name_col, "labels": label_col,
                     "value": value})


def ch(url: str, sql: str) -> str:
    # POST: ClickHouse runs GET queries read-only.
    with urllib.request.urlopen(urllib.request.Request(url + "/", data=sql.encode())) as r:
        return r.read().decode().strip()


def metric(http: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{http}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def wait_until(what: str, check, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", "--rows", dest="points", type=int, default=10_000_000)
    ap.add_argument("--series", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sluice-bin", default=os.environ.get("SLUICE_BIN")
                    or str(Path.home() / ".cache/sluice-target/release/sluice"))
    args = ap.parse_args()
    if args.points < 1 or args.series < 1 or args.reps < 1:
        ap.error("--points, --series and --reps must be at least 1")
    require_file(args.sluice_bin, "sluice binary",
                 "build it: cargo build --release -p sluice, or --sluice-bin")
    require_tool("psql", "apt-get install postgresql-client")

    table = gen_points(args.points, args.series)
    batches = table.to_batches(max_chunksize=BATCH_ROWS)
    seconds = (args.points + args.series - 1) // args.series
    minutes = len({(T0_US // 1_000_000 + s) // 60 for s in range(seconds)})
    expected_buckets = args.series * minutes if args.points >= args.series else args.points
    print(f"{args.points:,} points, {args.series:,} series, {seconds} s of points "
          f"({minutes} one-minute buckets per series)", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="sluice-rollupbench-"))
    os.chmod(workdir, 0o755)
    pg = chs = None
    sluices: dict = {}
    clients: dict = {}
    settings: dict = {}
    times: dict = {"rollups off": [], "rollups on": []}
    try:
        url = os.environ.get("SLUICE_BENCH_PG_URL")
        if not url:
            pg = ThrowawayPostgres(workdir)
            url = pg.url
        ch_url = os.environ.get("SLUICE_BENCH_CH_URL")
        if not ch_url:
            chs = ThrowawayClickHouse(workdir)
            ch_url = chs.url
        print(f"PostgreSQL: {url} ({psql(url, 'SHOW server_version')}); ClickHouse: {ch_url}",
              flush=True)
        for label, enabled in (("rollups off", "false"), ("rollups on", "true")):
            env = dict(os.environ,
                       SLUICE__SERVER__GRPC_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__HTTP_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__DATA_DIR=str(workdir / f"data-{len(sluices)}"),
                       SLUICE__WAL__FSYNC="true",
                       SLUICE__POSTGRES__URL=url,
                       SLUICE__CLICKHOUSE__URL=ch_url,
                       SLUICE__ROLLUP__ENABLED=enabled)
            settings[label] = describe_settings(env)
            print(f"{label}: {settings[label]}", flush=True)
            sluices[label] = Proc([args.sluice_bin, "serve"], env, "SLUICE_READY",
                                  workdir / f"sluice-{len(sluices)}.log", timeout=120)
            clients[label] = SluiceClient(f"grpc://{sluices[label].addrs['grpc']}")
        for rep in range(1, args.reps + 1):
            order = list(times) if rep % 2 else list(reversed(times))
            for label in order:
                http = sluices[label].addrs["http"]
                psql(url, "TRUNCATE metrics_points")
                ch(ch_url, "TRUNCATE TABLE metrics_1m")
                on = label == "rollups on"
                taken = metric(http, "sluice_rollup_points_total")
                start = time.perf_counter()
                clients[label].write("metrics", batches)
                wait_sink_idle(http)
                if on:
                    wait_until("the rollup to take every point",
                               lambda: metric(http, "sluice_rollup_points_total")
                               >= taken + args.points)
                el = time.perf_counter() - start
                check_count(url, "metrics_points", args.points, label)
                times[label].append(el)
                print(f"  rep {rep} {label:<12} {el:7.3f} s {args.points / el / 1e6:6.2f} M points/s",
                      flush=True)
                if on:
                    wait_until("every bucket written",
                               lambda: metric(http, "sluice_rollup_open_buckets") == 0)
                    wait_sink_idle(http, sink="rollup")
                    got = int(ch(ch_url, "SELECT sum(count_v) FROM metrics_1m"))
                    buckets = int(ch(ch_url, "SELECT count() FROM metrics_1m_merged"))
                    if got != args.points or buckets != expected_buckets:
                        raise RuntimeError(
                            f"metrics_1m counts {got} points in {buckets} buckets; "
                            f"expected {args.points} in {expected_buckets}")
        for c in clients.values():
            c.close()
    except BaseException:
        for label, proc in sluices.items():
            print(f"--- {label} log (tail) ---\n{proc.tail()}", file=sys.stderr)
        raise
    finally:
        for proc in sluices.values():
            proc.stop()
        if pg is not None:
            pg.stop()
        if chs is not None:
            chs.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    off, on = args.points / best["rollups off"], args.points / best["rollups on"]
    ratio = on / off
    print()
    print(f"{args.points:,} points at {args.series:,} series, best of {args.reps}, every "
          "count checked (metrics_points, and metrics_1m's points and buckets)")
    for label in times:
        print(f"{label}: {settings[label]}")
    print(f"rollups off: {off / 1e6:6.2f} M points/s")
    print(f"rollups on:  {on / 1e6:6.2f} M points/s ({ratio:.3f} x off)")
    ok = ratio >= 0.9
    print(f"target: rollups on >= 0.9 x off: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
