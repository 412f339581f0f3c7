#!/usr/bin/env python3
"""TimescaleDB ingest benchmark: Flight -> hypertable beside Flight -> plain table and
parallel ``psql \\copy`` binary into the same hypertable.

In one run, on one PostgreSQL 15 server with TimescaleDB (``../shared/timescaledb``'s
``install-tree``, or ``SLUICE_BENCH_TSDB_URL``), with the same pre-generated rows (the
points shape of ``flight_bench.py``, 2,000,000 rows in 64k-row batches by default), each
measured ``--reps`` times, alternating, tables truncated before every measurement:

1. **sluice -> hypertable**: the release binary (fsync on, ``postgres.pool_size`` = N,
   ``--pool-size``, default 4; every other setting at its default, so the WAL is
   uncompressed and ``postgres.timescaledb`` is ``auto``) writing a table Sluice created
   lazily as a hypertable on its time column (checked); the clock runs from the first
   DoPut until ``/readyz`` says the postgres sink has every row committed;
2. **sluice -> hypertable, tuned WAL** (unless ``--wal-compression none``): the same, with
   the WAL compressed (zstd by default, as in ``pg_bench.py``), in a database of its own;
3. **sluice -> plain**: as 1, into a database of the same server set up with
   ``postgres.timescaledb = "off"`` (a plain table with a time index);
4. **psql x N -> hypertable**: the same rows as N binary COPY files (contiguous parts of
   one file; N = ``pool_size``, the COPY sessions sluice runs, one connection each),
   loaded by N ``psql \\copy ... FROM ... (FORMAT binary)`` at once into the hypertable
   of 1; and, for reference, **psql x 1**: the whole file, one stream.

Counts are checked after every measurement. Target: sluice into the hypertable with
default settings at least 0.8 x the parallel psql load (the store's own limit here); the
other sluice runs are reported for information, each with its settings marked default or
tuned. Exit status 1 when the target is missed, when a count read back differs from the
rows sent, or when a prerequisite (psql, TimescaleDB, the binary) is missing.

Usage: ``bench/run.sh tsdb [--rows N] [--reps N] [--pool-size N] [--wal-compression C]``
(builds the release binary first).
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
from flight_bench import (BATCH_ROWS, SLUICE_DEFAULTS, Proc, describe_settings,  # noqa: E402
                          gen_points, require_file, require_tool)
from pg_bench import (ThrowawayPostgres, psql, psql_copy, split_copy_binary,  # noqa: E402
                      wait_sink_idle)

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
                    default=int(os.environ.get("SLUICE__POSTGRES__POOL_SIZE",
                                               SLUICE_DEFAULTS["postgres.pool_size"])),
                    help="sluice's postgres.pool_size and the number of parallel psql "
                         "streams (default 4)")
    ap.add_argument("--wal-compression",
                    default=os.environ.get("SLUICE__WAL__COMPRESSION", "zstd"),
                    help="WAL compression of the tuned hypertable run ('none': no tuned run)")
    args = ap.parse_args()
    if args.rows < 1 or args.reps < 1 or args.pool_size < 1:
        ap.error("--rows, --reps and --pool-size must be at least 1")
    require_file(args.sluice_bin, "sluice binary",
                 "build it: cargo build --release -p sluice, or --sluice-bin")
    require_tool("psql", "apt-get install postgresql-client")

    n = args.pool_size
    default_wal = SLUICE_DEFAULTS["wal.compression"]
    # side -> (database, postgres.timescaledb, WAL compression, a hypertable?); the first
    # is the default run the target applies to.
    sides = {"hypertable": ("bench_hypertable", SLUICE_DEFAULTS["postgres.timescaledb"],
                            default_wal, True)}
    if args.wal_compression.lower() != default_wal:
        sides[f"hypertable, wal={args.wal_compression}"] = (
            "bench_hypertable_tuned", SLUICE_DEFAULTS["postgres.timescaledb"],
            args.wal_compression, True)
    sides["plain"] = ("bench_plain", "off", default_wal, False)
    streams = [n] if n == 1 else [n, 1]
    psql_n = f"psql x {n} -> hypertable"

    table = gen_points(args.rows)
    batches = table.to_batches(max_chunksize=BATCH_ROWS)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-tsdbbench-"))
    os.chmod(workdir, 0o755)
    pg = None
    procs: dict = {}
    settings: dict = {}
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
        if not version:
            raise SystemExit(f"TimescaleDB is not available on {admin}")
        print(f"PostgreSQL: {admin} ({psql(admin, 'SHOW server_version')}, TimescaleDB "
              f"{version})", flush=True)
        urls = {}
        for k, (side, (db, mode, wal, hyper)) in enumerate(sides.items()):
            psql(admin, f"DROP DATABASE IF EXISTS {db}")
            psql(admin, f"CREATE DATABASE {db}")
            urls[side] = with_db(admin, db)
            env = dict(os.environ,
                       SLUICE__SERVER__GRPC_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__HTTP_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__DATA_DIR=str(workdir / f"data-{k}"),
                       SLUICE__WAL__FSYNC="true",
                       SLUICE__POSTGRES__URL=urls[side],
                       SLUICE__POSTGRES__TIMESCALEDB=mode,
                       SLUICE__POSTGRES__POOL_SIZE=str(n),
                       SLUICE__WAL__COMPRESSION=wal)
            settings[side] = describe_settings(env)
            print(f"sluice -> {side}: {settings[side]}", flush=True)
            procs[side] = Proc([args.sluice_bin, "serve"], env, "SLUICE_READY",
                               workdir / f"sluice-{k}.log")
            client = SluiceClient(f"grpc://{procs[side].addrs['grpc']}")
            client.register_table({"name": TABLE, "sinks": ["postgres"], "columns": COLUMNS})
            # A first row makes sluice create the table (lazily, as users get it).
            client.write(TABLE, [batches[0].slice(0, 1)])
            wait_sink_idle(procs[side].addrs["http"])
            client.close()
            kind = psql(urls[side], "SELECT count(*) FROM timescaledb_information.hypertables "
                        f"WHERE hypertable_name = '{TABLE}'") if hyper else "1"
            if kind != "1":
                raise RuntimeError(f"{TABLE} is not a hypertable in {db} "
                                   f"(postgres.timescaledb = {mode})")
        target_url = urls["hypertable"]
        # The psql side's files: the rows sluice wrote, as one binary COPY file and as N
        # contiguous parts of it.
        psql(target_url, f"TRUNCATE {TABLE}")
        SluiceClient(f"grpc://{procs['hypertable'].addrs['grpc']}").write(TABLE, batches)
        wait_sink_idle(procs["hypertable"].addrs["http"])
        whole = workdir / "all.bin"
        # COPY TO of a hypertable reads only its (empty) parent: copy a query.
        psql(target_url, f"\\copy (SELECT time, series_id, value FROM {TABLE}) "
             f"TO '{whole}' WITH (FORMAT binary)")
        files = {1: [whole], n: split_copy_binary(whole, n, args.rows)}

        def check(side: str, url: str) -> None:
            got = int(psql(url, f"SELECT count(*) FROM {TABLE}"))
            if got != args.rows:
                raise RuntimeError(f"row count mismatch: after {side}, {TABLE} has {got} "
                                   f"rows, expected {args.rows}")

        def report(rep: int, side: str, el: float) -> None:
            times.setdefault(side, []).append(el)
            print(f"  rep {rep} {side:<34} {el:7.3f} s {args.rows / el / 1e6:6.2f} M rows/s",
                  flush=True)

        for rep in range(1, args.reps + 1):
            for side in sides:
                url = urls[side]
                psql(url, f"TRUNCATE {TABLE}")
                client = SluiceClient(f"grpc://{procs[side].addrs['grpc']}")
                start = time.perf_counter()
                client.write(TABLE, batches)
                wait_sink_idle(procs[side].addrs["http"])
                el = time.perf_counter() - start
                client.close()
                check(f"sluice -> {side}", url)
                report(rep, f"sluice -> {side}", el)
            for k in streams:
                side = f"psql x {k} -> hypertable"
                psql(target_url, f"TRUNCATE {TABLE}")
                el = psql_copy(target_url, TABLE, files[k])
                check(side, target_url)
                report(rep, side, el)
    except BaseException:
        for name, p in procs.items():
            print(f"--- sluice -> {name} log (tail) ---\n{p.tail()}", file=sys.stderr)
        raise
    finally:
        for p in procs.values():
            p.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    limit = best[psql_n]
    print()
    print(f"rows per run: {args.rows:,} (points shape), best of {args.reps}, every count "
          f"checked; N = {n} parallel streams (sluice's postgres.pool_size)")
    for side in sides:
        print(f"sluice -> {side}: {settings[side]}")
    print(f"{'side':<36} {'M rows/s':>9} {'vs psql x ' + str(n):>12}")
    for side, t in best.items():
        print(f"{side:<36} {args.rows / t / 1e6:9.2f} {limit / t:12.2f}")
    ratio = limit / best["sluice -> hypertable"]
    ok = ratio >= TARGET
    print(f"target sluice -> hypertable (default settings, pool_size {n}) >= {TARGET} x "
          f"{psql_n}: {'met' if ok else 'NOT met'} ({ratio:.2f}); the other sluice runs "
          "are for information")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
