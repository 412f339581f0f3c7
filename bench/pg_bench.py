#!/usr/bin/env python3
"""PostgreSQL ingest benchmark: Sluice end to end against psql's binary COPY and ADBC.

In one run, with the same pre-generated rows (2,000,000 per shape by default, in 64k-row
batches, the shapes of ``flight_bench.py``), into the same pre-created tables of one
PostgreSQL (a throwaway cluster, or ``SLUICE_BENCH_PG_URL``), each measured ``--reps``
times, alternating, tables truncated before every measurement:

1. **sluice**: the release binary with ``postgres.url`` set, fsync on and the WAL
   compressed with zstd (``--wal-compression``; PostgreSQL shares the disk here); the clock runs
   from the first DoPut until ``/readyz`` says the postgres sink has nothing left
   (every row committed in PostgreSQL), then ``count(*)`` is checked;
2. **psql**: ``\\copy <table> FROM <file> WITH (FORMAT binary)`` of the same rows, the
   file written beforehand by ``\\copy ... TO`` (PostgreSQL's own COPY limit);
3. **adbc**: pyarrow + ``adbc_driver_postgresql`` ``adbc_ingest`` of the same Arrow
   table, what a user would do instead.

Targets (issue 3): sluice >= 0.9 x psql and >= 1.2 x adbc.

Usage: ``bench/run.sh pg`` (builds the release binary first), or
``python bench/pg_bench.py [--rows N] [--reps N] [--sluice-bin PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flight_bench import BATCH_ROWS, Proc, gen_logs, gen_points  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "clients" / "python"))
from sluice_client import SluiceClient  # noqa: E402

TABLES = {
    "points": ("bench_points",
               "time timestamptz NOT NULL, series_id bigint, value double precision",
               [{"name": "time", "type": "timestamp"},
                {"name": "series_id", "type": "int64"},
                {"name": "value", "type": "double"}]),
    "logs": ("bench_logs",
             "timestamp timestamptz NOT NULL, service text, host text, level text, "
             "message text, trace_id text",
             [{"name": "timestamp", "type": "timestamp_ms"},
              {"name": "service", "type": "string"},
              {"name": "host", "type": "string"},
              {"name": "level", "type": "string"},
              {"name": "message", "type": "string"},
              {"name": "trace_id", "type": "string"}]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayPostgres:
    """initdb + pg_ctl in a temp dir, as the postgres user when running as root."""

    def __init__(self, workdir: Path, bin_dir: Path | None = None, extra_opts: str = ""):
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not versions and bin_dir is None:
            raise SystemExit("no PostgreSQL under /usr/lib/postgresql; set SLUICE_BENCH_PG_URL")
        self.bin = bin_dir or versions[-1]
        self.dir = workdir / "pg"
        self.dir.mkdir()
        self.port = free_port()
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_pg:
            shutil.chown(self.dir, "postgres")
            os.chmod(workdir, 0o755)
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-sync")
        # Durable like a real server (fsync on), sized for bulk loads.
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                "-c max_wal_size=4GB -c shared_buffers=512MB -c synchronous_commit=on" + extra_opts)
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                  "-o", opts, "start")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool, *args):
        subprocess.run(self.as_pg + [str(self.bin / tool), *args], check=True,
                       stdout=subprocess.DEVNULL)

    def stop(self):
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")


def psql(url: str, command: str) -> str:
    out = subprocess.run(["psql", url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", command],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def wait_sink_idle(http: str, timeout: float = 600, sink: str = "postgres") -> None:
    """Waits until ``sink`` has every WAL record (and its last attempt succeeded)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://{http}/readyz") as r:
            state = json.load(r)["sinks"][sink]
        if state["lag_records"] == 0 and state["state"] == "ok":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sink} sink still behind after {timeout}s: {state}")
        time.sleep(0.02)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sluice-bin", default=os.environ.get("SLUICE_BIN")
                    or str(Path.home() / ".cache/sluice-target/release/sluice"))
    ap.add_argument("--pool-size", default=os.environ.get("SLUICE__POSTGRES__POOL_SIZE", "4"))
    ap.add_argument("--shapes", default="points,logs")
    # PostgreSQL shares this machine's disk with sluice's WAL in this bench; zstd (level 1)
    # shrinks the WAL of log rows about 4x, leaving the disk to PostgreSQL.
    ap.add_argument("--wal-compression",
                    default=os.environ.get("SLUICE__WAL__COMPRESSION", "zstd"))
    args = ap.parse_args()

    import adbc_driver_postgresql.dbapi as adbc  # noqa: E402

    shapes = {}
    for name in args.shapes.split(","):
        table = (gen_points if name == "points" else gen_logs)(args.rows)
        shapes[name] = (table.to_batches(max_chunksize=BATCH_ROWS), table)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-pgbench-"))
    os.chmod(workdir, 0o755)
    pg = None
    sluice = None
    times: dict = {}
    try:
        url = os.environ.get("SLUICE_BENCH_PG_URL")
        if not url:
            pg = ThrowawayPostgres(workdir)
            url = pg.url
        print(f"PostgreSQL: {url} ({psql(url, 'SHOW server_version')})", flush=True)
        for name in shapes:
            t, cols, _ = TABLES[name]
            psql(url, f"DROP TABLE IF EXISTS {t}; CREATE TABLE {t} ({cols})")
        env = dict(os.environ,
                   SLUICE__SERVER__GRPC_ADDR="127.0.0.1:0",
                   SLUICE__SERVER__HTTP_ADDR="127.0.0.1:0",
                   SLUICE__SERVER__DATA_DIR=str(workdir / "data"),
                   SLUICE__WAL__FSYNC="true",
                   SLUICE__POSTGRES__URL=url,
                   SLUICE__POSTGRES__POOL_SIZE=str(args.pool_size),
                   SLUICE__WAL__COMPRESSION=args.wal_compression)
        sluice = Proc([args.sluice_bin, "serve"], env, "SLUICE_READY", workdir / "sluice.log")
        client = SluiceClient(f"grpc://{sluice.addrs['grpc']}")
        for name in shapes:
            t, _, columns = TABLES[name]
            client.register_table({"name": t, "sinks": ["postgres"], "columns": columns})
        files = {}
        for rep in range(1, args.reps + 1):
            for name, (batches, table) in shapes.items():
                t = TABLES[name][0]
                # sluice
                psql(url, f"TRUNCATE {t}")
                start = time.perf_counter()
                client.write(t, batches)
                wait_sink_idle(sluice.addrs["http"])
                el = time.perf_counter() - start
                n = int(psql(url, f"SELECT count(*) FROM {t}"))
                if n != args.rows:
                    raise RuntimeError(f"sluice: {t} has {n} rows, expected {args.rows}")
                times.setdefault((name, "sluice"), []).append(el)
                print(f"  rep {rep} {name:<7} sluice {el:7.3f} s {args.rows / el / 1e6:6.2f} M rows/s",
                      flush=True)
                if name not in files:
                    files[name] = workdir / f"{t}.bin"
                    psql(url, f"\\copy {t} TO '{files[name]}' WITH (FORMAT binary)")
                # psql \copy
                psql(url, f"TRUNCATE {t}")
                start = time.perf_counter()
                psql(url, f"\\copy {t} FROM '{files[name]}' WITH (FORMAT binary)")
                el = time.perf_counter() - start
                times.setdefault((name, "psql"), []).append(el)
                print(f"  rep {rep} {name:<7} psql   {el:7.3f} s {args.rows / el / 1e6:6.2f} M rows/s",
                      flush=True)
                # ADBC
                psql(url, f"TRUNCATE {t}")
                start = time.perf_counter()
                with adbc.connect(url) as conn:
                    with conn.cursor() as cur:
                        cur.adbc_ingest(t, table, mode="append")
                    conn.commit()
                el = time.perf_counter() - start
                n = int(psql(url, f"SELECT count(*) FROM {t}"))
                if n != args.rows:
                    raise RuntimeError(f"adbc: {t} has {n} rows, expected {args.rows}")
                times.setdefault((name, "adbc"), []).append(el)
                print(f"  rep {rep} {name:<7} adbc   {el:7.3f} s {args.rows / el / 1e6:6.2f} M rows/s",
                      flush=True)
        client.close()
    except BaseException:
        if sluice is not None:
            print(f"--- sluice log (tail) ---\n{sluice.tail()}", file=sys.stderr)
        raise
    finally:
        if sluice is not None:
            sluice.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    print()
    print(f"rows per run: {args.rows:,}, best of {args.reps}, sluice pool_size {args.pool_size}, "
          f"WAL fsync on, compression {args.wal_compression}")
    print(f"{'shape':<8} {'side':<7} {'M rows/s':>9} {'vs psql':>8} {'vs adbc':>8}")
    ok = True
    for name in shapes:
        for side in ("sluice", "psql", "adbc"):
            t = best[name, side]
            extra = ""
            if side == "sluice":
                vp, va = best[name, "psql"] / t, best[name, "adbc"] / t
                ok &= vp >= 0.9 and va >= 1.2
                extra = f"{vp:8.2f} {va:8.2f}"
            print(f"{name:<8} {side:<7} {args.rows / t / 1e6:9.2f} {extra}")
    print(f"targets sluice >= 0.9 x psql and >= 1.2 x adbc: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
