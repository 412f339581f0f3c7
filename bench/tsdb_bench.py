#!/usr/bin/env python3
"""TimescaleDB ingest benchmark: Flight -> hypertable beside Flight -> plain table and
parallel ``psql \\copy`` binary into the same hypertable.

In one run, on one PostgreSQL 15 server with TimescaleDB (``../shared/timescaledb``'s
``install-tree``, or ``SLUICE_BENCH_TSDB_URL``), with the same pre-generated rows (the
points shape of ``flight_bench.py``, 2,000,000 rows in 64k-row batches by default), each
measured ``--reps`` times, alternating, tables truncated before every measurement:

1. **sluice -> hypertable**: the release binary (fsync on, default ``pool_size`` 4,
   zstd WAL as in ``pg_bench.py``) writing a table Sluice created lazily as a hypertable
   on its time column; the clock runs from the first DoPut until ``/readyz`` says the
   postgres sink has every row committed;
2. **sluice -> plain**: the same into a database of the same server set up with
   ``postgres.timescaledb = "off"`` (a plain table with a time index);
3. **psql x N -> hypertable**: the same rows as N binary COPY files (N = ``pool_size``,
   the parallelism sluice uses), loaded by N ``psql \\copy ... FROM ... (FORMAT binary)``
   at once into the hypertable; and, for reference, **psql x 1**: one file, one stream.

Counts are checked after every measurement. Target (exit status 1 when missed): sluice
into the hypertable at least 0.8 x the parallel psql load (the store's own limit here).

Usage: ``bench/run.sh tsdb [--rows N] [--reps N]`` (builds the release binary first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flight_bench import BATCH_ROWS, Proc, gen_points  # noqa: E402
from pg_bench import ThrowawayPostgres, psql, wait_sink_idle  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "clients" / "python"))
from sluice_client import SluiceClient  # noqa: E402

TABLE = "bench_points"
COLUMNS = [{"name": "time", "type": "timestamp"},
           {"name": "series_id", "type": "int64"},
           {"name": "value", "type": "double"}]
TARGET = 0.8


def timescaledb_bin(workdir: Path) -> Path:
    folder = Path(os.environ.get("SLUICE_TIMESCALEDB_DIR", REPO.parent / "shared" / "timescaledb"))
    if not (folder / "install-tree").exists():
        raise SystemExit(f"no TimescaleDB build in {folder}; set SLUICE_BENCH_TSDB_URL or "
                         "SLUICE_TIMESCALEDB_DIR")
    out = subprocess.run([str(folder / "install-tree"), "/tmp/sluice-timescaledb"], check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip())


def with_db(url: str, db: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + db


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sluice-bin", default=os.environ.get("SLUICE_BIN")
                    or str(Path.home() / ".cache/sluice-target/release/sluice"))
    ap.add_argument("--pool-size", type=int,
                    default=int(os.environ.get("SLUICE__POSTGRES__POOL_SIZE", "4")))
    ap.add_argument("--wal-compression",
                    default=os.environ.get("SLUICE__WAL__COMPRESSION", "zstd"))
    args = ap.parse_args()

    table = gen_points(args.rows)
    batches = table.to_batches(max_chunksize=BATCH_ROWS)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-tsdbbench-"))
    os.chmod(workdir, 0o755)
    pg = None
    procs: dict = {}
    times: dict = {}
    try:
        admin = os.environ.get("SLUICE_BENCH_TSDB_URL")
        if not admin:
            pg = ThrowawayPostgres(workdir, timescaledb_bin(workdir),
                                   " -c shared_preload_libraries=timescaledb"
                                   " -c timescaledb.telemetry_level=off")
            admin = pg.url
        version = psql(admin, "SELECT default_version FROM pg_available_extensions "
                              "WHERE name = 'timescaledb'")
        print(f"PostgreSQL: {admin} ({psql(admin, 'SHOW server_version')}, TimescaleDB "
              f"{version})", flush=True)
        urls = {}
        for side, mode in (("hypertable", "require"), ("plain", "off")):
            db = f"bench_{side}"
            psql(admin, f"DROP DATABASE IF EXISTS {db}")
            psql(admin, f"CREATE DATABASE {db}")
            urls[side] = with_db(admin, db)
            env = dict(os.environ,
                       SLUICE__SERVER__GRPC_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__HTTP_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__DATA_DIR=str(workdir / f"data-{side}"),
                       SLUICE__WAL__FSYNC="true",
                       SLUICE__POSTGRES__URL=urls[side],
                       SLUICE__POSTGRES__TIMESCALEDB=mode,
                       SLUICE__POSTGRES__POOL_SIZE=str(args.pool_size),
                       SLUICE__WAL__COMPRESSION=args.wal_compression)
            procs[side] = Proc([args.sluice_bin, "serve"], env, "SLUICE_READY",
                               workdir / f"sluice-{side}.log")
            client = SluiceClient(f"grpc://{procs[side].addrs['grpc']}")
            client.register_table({"name": TABLE, "sinks": ["postgres"], "columns": COLUMNS})
            # A first row makes sluice create the table (lazily, as users get it).
            client.write(TABLE, [batches[0].slice(0, 1)])
            wait_sink_idle(procs[side].addrs["http"])
            client.close()
        kind = psql(urls["hypertable"], "SELECT count(*) FROM timescaledb_information.hypertables "
                    f"WHERE hypertable_name = '{TABLE}'")
        if kind != "1":
            raise RuntimeError(f"{TABLE} is not a hypertable in bench_hypertable")
        # The psql side's files: the same rows, split in pool_size parts.
        psql(urls["hypertable"], f"TRUNCATE {TABLE}")
        SluiceClient(f"grpc://{procs['hypertable'].addrs['grpc']}").write(TABLE, batches)
        wait_sink_idle(procs["hypertable"].addrs["http"])
        per = -(-args.rows // args.pool_size)
        files = []
        for k in range(args.pool_size):
            f = workdir / f"part{k}.bin"
            psql(urls["hypertable"], f"\\copy (SELECT time, series_id, value FROM {TABLE} "
                 f"ORDER BY time, series_id OFFSET {k * per} LIMIT {per}) TO '{f}' WITH (FORMAT binary)")
            files.append(f)
        whole = workdir / "all.bin"
        # COPY TO of a hypertable reads only its (empty) parent: copy a query.
        psql(urls["hypertable"], f"\\copy (SELECT time, series_id, value FROM {TABLE}) "
             f"TO '{whole}' WITH (FORMAT binary)")

        def check(side: str, url: str) -> None:
            n = int(psql(url, f"SELECT count(*) FROM {TABLE}"))
            if n != args.rows:
                raise RuntimeError(f"{side}: {TABLE} has {n} rows, expected {args.rows}")

        for rep in range(1, args.reps + 1):
            for side in ("hypertable", "plain"):
                url = urls[side]
                psql(url, f"TRUNCATE {TABLE}")
                client = SluiceClient(f"grpc://{procs[side].addrs['grpc']}")
                start = time.perf_counter()
                client.write(TABLE, batches)
                wait_sink_idle(procs[side].addrs["http"])
                el = time.perf_counter() - start
                client.close()
                check(f"sluice -> {side}", url)
                times.setdefault(f"sluice -> {side}", []).append(el)
                print(f"  rep {rep} sluice -> {side:<10} {el:7.3f} s "
                      f"{args.rows / el / 1e6:6.2f} M rows/s", flush=True)
            url = urls["hypertable"]
            psql(url, f"TRUNCATE {TABLE}")
            start = time.perf_counter()
            running = [subprocess.Popen(["psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c",
                                         f"\\copy {TABLE} FROM '{f}' WITH (FORMAT binary)"])
                       for f in files]
            if any(p.wait() != 0 for p in running):
                raise RuntimeError("a psql \\copy failed")
            el = time.perf_counter() - start
            check("psql", url)
            side = f"psql x {args.pool_size} -> hypertable"
            times.setdefault(side, []).append(el)
            print(f"  rep {rep} {side:<22} {el:7.3f} s {args.rows / el / 1e6:6.2f} M rows/s",
                  flush=True)
            psql(url, f"TRUNCATE {TABLE}")
            start = time.perf_counter()
            psql(url, f"\\copy {TABLE} FROM '{whole}' WITH (FORMAT binary)")
            el = time.perf_counter() - start
            check("psql x 1", url)
            side = "psql x 1 -> hypertable"
            times.setdefault(side, []).append(el)
            print(f"  rep {rep} {side:<22} {el:7.3f} s {args.rows / el / 1e6:6.2f} M rows/s",
                  flush=True)
    except BaseException:
        for name, p in procs.items():
            print(f"--- sluice {name} log (tail) ---\n{p.tail()}", file=sys.stderr)
        raise
    finally:
        for p in procs.values():
            p.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    limit = best[f"psql x {args.pool_size} -> hypertable"]
    print()
    print(f"rows per run: {args.rows:,} (points shape), best of {args.reps}, pool_size "
          f"{args.pool_size}, WAL fsync on, compression {args.wal_compression}")
    print(f"{'side':<28} {'M rows/s':>9} {'vs psql':>8}")
    for side, t in best.items():
        print(f"{side:<28} {args.rows / t / 1e6:9.2f} {limit / t:8.2f}")
    ratio = limit / best["sluice -> hypertable"]
    ok = ratio >= TARGET
    print(f"target sluice -> hypertable >= {TARGET} x parallel psql: "
          f"{'met' if ok else 'NOT met'} ({ratio:.2f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
