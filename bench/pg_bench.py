#!/usr/bin/env python3
"""PostgreSQL ingest benchmark: Sluice end to end against parallel psql binary COPY and ADBC.

In one run, with the same pre-generated rows (2,000,000 per shape by default, in 64k-row
batches, the shapes of ``flight_bench.py``), into the same pre-created tables of one
PostgreSQL (a throwaway cluster, or ``SLUICE_BENCH_PG_URL``), each measured ``--reps``
times, alternating, tables truncated before every measurement and ``count(*)`` checked
after every one. N is ``--pool-size`` (default 4, sluice's ``[postgres] pool_size``
default): sluice runs that many COPY sessions, one connection each, and the baselines get
the same parallelism.

1. **sluice**: the release binary with ``postgres.url`` set, ``postgres.pool_size`` = N,
   fsync on and every other setting at its default (the WAL uncompressed); the clock runs
   from the first DoPut until ``/readyz`` says the postgres sink has nothing left (every
   row committed in PostgreSQL);
2. **sluice, tuned WAL** (unless ``--wal-compression none``): the same with the WAL
   compressed (``--wal-compression``, zstd by default; PostgreSQL shares the disk here),
   reported beside the default run;
3. **psql x N**: the same rows as N binary COPY files (contiguous parts of the one file
   ``\\copy ... TO`` wrote), loaded by N ``psql -c "\\copy <table> FROM <part> WITH
   (FORMAT binary)"`` at once (PostgreSQL's own COPY limit at sluice's parallelism); and
   **psql x 1**: the whole file in one stream, for reference;
4. **adbc x N**: pyarrow + ``adbc_driver_postgresql`` ``adbc_ingest`` of the same rows in
   N contiguous parts, one process and connection each, at once (what a user would do
   instead, at the same parallelism); and **adbc x 1**: the whole table on one connection.

Targets (issue 3), for sluice with default settings: >= 0.9 x psql x N and >= 1.2 x
adbc x N; the tuned run's ratios are printed for information. Exit status 1 when a target
is missed, when a count read back differs from the rows sent, or when a prerequisite
(psql, PostgreSQL, the ADBC driver, the binary) is missing.

Usage: ``bench/run.sh pg`` (builds the release binary first), or
``python bench/pg_bench.py [--rows N] [--reps N] [--pool-size N] [--wal-compression C]
[--sluice-bin PATH]``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import queue
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flight_bench import (BATCH_ROWS, SLUICE_DEFAULTS, Proc, describe_settings,  # noqa: E402
                          gen_logs, gen_points, require_file, require_tool)

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


def check_count(url: str, table: str, rows: int, side: str) -> None:
    """Raises (the bench exits 1) unless ``table`` holds exactly ``rows`` rows."""
    n = int(psql(url, f"SELECT count(*) FROM {table}"))
    if n != rows:
        raise RuntimeError(f"row count mismatch: after {side}, {table} has {n} rows, "
                           f"expected {rows}")


def split_parts(rows: int, n: int) -> list[tuple[int, int]]:
    """(offset, length) of ``n`` contiguous, non-empty, near-equal parts of ``rows`` rows."""
    per = -(-rows // n)
    return [(o, min(per, rows - o)) for o in range(0, rows, per)]


PGCOPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def split_copy_binary(path: Path, n: int, rows: int) -> list[Path]:
    """Cuts a binary COPY file into the contiguous parts of ``split_parts(rows, n)``, each
    a binary COPY file of its own (the same header, the rows, the trailer). Raises unless
    the file holds exactly ``rows`` rows."""
    bounds = {offset for offset, _ in split_parts(rows, n)}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:11] != PGCOPY_SIGNATURE:
            raise RuntimeError(f"{path} is not a binary COPY file")
        (ext,) = struct.unpack_from(">i", m, 15)
        header_end = 19 + ext
        unpack_h = struct.Struct(">h").unpack_from
        unpack_i = struct.Struct(">i").unpack_from
        cuts, pos, seen = [], header_end, 0
        while True:
            (fields,) = unpack_h(m, pos)
            if fields == -1:
                break
            if seen in bounds:
                cuts.append(pos)
            pos += 2
            for _ in range(fields):
                (length,) = unpack_i(m, pos)
                pos += 4 + max(length, 0)
            seen += 1
        if seen != rows:
            raise RuntimeError(f"{path} holds {seen} rows, expected {rows}")
        cuts.append(pos)
        parts = []
        for k in range(len(cuts) - 1):
            part = path.with_name(f"{path.stem}.part{k}{path.suffix}")
            with open(part, "wb") as out:
                out.write(m[:header_end])
                out.write(m[cuts[k]:cuts[k + 1]])
                out.write(b"\xff\xff")
            parts.append(part)
    return parts


def psql_copy(url: str, table: str, files: list[Path]) -> float:
    """One ``psql -c "\\copy <table> FROM <file> WITH (FORMAT binary)"`` per file, all at
    once; seconds from the first start to the last exit. Raises if any fails."""
    start = time.perf_counter()
    running = [subprocess.Popen(["psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c",
                                 f"\\copy {table} FROM '{f}' WITH (FORMAT binary)"])
               for f in files]
    codes = [p.wait() for p in running]
    el = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"psql \\copy into {table} failed (exit statuses {codes})")
    return el


def write_ipc(path: Path, table: pa.Table) -> Path:
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=BATCH_ROWS)
    return path


def _adbc_worker(k: int, url: str, table: str, path: str, start, out) -> None:
    """One ADBC stream, in a process of its own (no shared GIL): loads its part from an
    Arrow IPC file, says it is ready, waits for ``start``, then connects, ingests, commits."""
    try:
        import adbc_driver_postgresql.dbapi as adbc
        part = pa.ipc.open_file(pa.memory_map(path)).read_all()
        out.put(("ready", k, None))
        start.wait()
        with adbc.connect(url) as conn:
            with conn.cursor() as cur:
                cur.adbc_ingest(table, part, mode="append")
            conn.commit()
        out.put(("done", k, None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails
        out.put(("error", k, repr(e)))


def adbc_ingest_parallel(mp, url: str, table: str, files: list[Path],
                         timeout: float = 1800) -> float:
    """``adbc_ingest`` of each Arrow IPC file on its own connection, all at once; seconds
    from the start signal (every process has its rows in memory) until every commit."""
    start, out = mp.Event(), mp.Queue()
    procs = [mp.Process(target=_adbc_worker, args=(k, url, table, str(f), start, out),
                        daemon=True) for k, f in enumerate(files)]
    try:
        for p in procs:
            p.start()

        def collect(kind: str, wait: float) -> None:
            for _ in procs:
                try:
                    got, k, err = out.get(timeout=wait)
                except queue.Empty:
                    raise RuntimeError(f"adbc into {table}: no '{kind}' from every process "
                                       f"within {wait:.0f}s") from None
                if got == "error":
                    raise RuntimeError(f"adbc stream {k} into {table} failed: {err}")

        collect("ready", 300)
        t0 = time.perf_counter()
        start.set()
        collect("done", timeout)
        el = time.perf_counter() - t0
        for p in procs:
            p.join(30)
        return el
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sluice-bin", default=os.environ.get("SLUICE_BIN")
                    or str(Path.home() / ".cache/sluice-target/release/sluice"))
    ap.add_argument("--pool-size", type=int,
                    default=int(os.environ.get("SLUICE__POSTGRES__POOL_SIZE",
                                               SLUICE_DEFAULTS["postgres.pool_size"])),
                    help="sluice's postgres.pool_size (COPY sessions, one connection each) "
                         "and the number of parallel psql and ADBC streams (default 4)")
    ap.add_argument("--shapes", default="points,logs")
    # PostgreSQL shares this machine's disk with sluice's WAL in this bench; zstd (level 1)
    # shrinks the WAL of log rows about 4x, leaving the disk to PostgreSQL. This is the
    # tuned run; the default run (WAL uncompressed) always runs too.
    ap.add_argument("--wal-compression",
                    default=os.environ.get("SLUICE__WAL__COMPRESSION", "zstd"),
                    help="WAL compression of the tuned sluice run ('none': no tuned run)")
    args = ap.parse_args()
    if args.rows < 1 or args.reps < 1 or args.pool_size < 1:
        ap.error("--rows, --reps and --pool-size must be at least 1")
    unknown = set(args.shapes.split(",")) - set(TABLES)
    if unknown:
        ap.error(f"unknown shapes {sorted(unknown)}; known: {sorted(TABLES)}")

    require_file(args.sluice_bin, "sluice binary",
                 "build it: cargo build --release -p sluice, or --sluice-bin")
    require_tool("psql", "apt-get install postgresql-client")
    try:
        import adbc_driver_postgresql.dbapi  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"the ADBC baseline needs adbc-driver-postgresql ({e}); "
                         "pip install adbc-driver-postgresql adbc-driver-manager") from None

    n = args.pool_size
    default_wal = SLUICE_DEFAULTS["wal.compression"]
    # label -> WAL compression; the first is the default run the targets apply to.
    runs = {"sluice": default_wal}
    if args.wal_compression.lower() != default_wal:
        runs[f"sluice wal={args.wal_compression}"] = args.wal_compression
    streams = [n] if n == 1 else [n, 1]
    baselines = [f"{tool} x {k}" for tool in ("psql", "adbc") for k in streams]
    psql_n, adbc_n = f"psql x {n}", f"adbc x {n}"

    shapes = {}
    for name in args.shapes.split(","):
        table = (gen_points if name == "points" else gen_logs)(args.rows)
        shapes[name] = (table.to_batches(max_chunksize=BATCH_ROWS), table)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-pgbench-"))
    os.chmod(workdir, 0o755)
    mp = multiprocessing.get_context("spawn")
    pg = None
    sluices: dict = {}  # label -> Proc
    clients: dict = {}  # label -> SluiceClient
    settings: dict = {}
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
        # The ADBC side's files: the same rows, whole and in N contiguous parts.
        arrow_files = {}
        for name, (_, table) in shapes.items():
            t = TABLES[name][0]
            arrow_files[name] = {
                1: [write_ipc(workdir / f"{t}.arrow", table)],
                n: [write_ipc(workdir / f"{t}.part{k}.arrow", table.slice(o, length))
                    for k, (o, length) in enumerate(split_parts(args.rows, n))],
            }
        # One sluice per run, each in its own data directory; they share the registry.
        for label, wal in runs.items():
            env = dict(os.environ,
                       SLUICE__SERVER__GRPC_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__HTTP_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__DATA_DIR=str(workdir / f"data-{len(sluices)}"),
                       SLUICE__WAL__FSYNC="true",
                       SLUICE__POSTGRES__URL=url,
                       SLUICE__POSTGRES__POOL_SIZE=str(n),
                       SLUICE__WAL__COMPRESSION=wal)
            settings[label] = describe_settings(env)
            print(f"{label}: {settings[label]}", flush=True)
            sluices[label] = Proc([args.sluice_bin, "serve"], env, "SLUICE_READY",
                                  workdir / f"sluice-{len(sluices)}.log")
            clients[label] = SluiceClient(f"grpc://{sluices[label].addrs['grpc']}")
            for name in shapes:
                t, _, columns = TABLES[name]
                clients[label].register_table({"name": t, "sinks": ["postgres"],
                                               "columns": columns})
        copy_files: dict = {}
        for rep in range(1, args.reps + 1):
            for name, (batches, _) in shapes.items():
                t = TABLES[name][0]

                def report(side: str, el: float) -> None:
                    times.setdefault((name, side), []).append(el)
                    print(f"  rep {rep} {name:<7} {side:<22} {el:7.3f} s "
                          f"{args.rows / el / 1e6:6.2f} M rows/s", flush=True)

                for label, client in clients.items():
                    psql(url, f"TRUNCATE {t}")
                    start = time.perf_counter()
                    client.write(t, batches)
                    wait_sink_idle(sluices[label].addrs["http"])
                    el = time.perf_counter() - start
                    check_count(url, t, args.rows, label)
                    report(label, el)
                if name not in copy_files:
                    # The psql side's files: what sluice wrote, as one binary COPY file and
                    # as N contiguous parts of it.
                    whole = workdir / f"{t}.bin"
                    psql(url, f"\\copy {t} TO '{whole}' WITH (FORMAT binary)")
                    copy_files[name] = {1: [whole], n: split_copy_binary(whole, n, args.rows)}
                for k in streams:
                    psql(url, f"TRUNCATE {t}")
                    el = psql_copy(url, t, copy_files[name][k])
                    check_count(url, t, args.rows, f"psql x {k}")
                    report(f"psql x {k}", el)
                for k in streams:
                    psql(url, f"TRUNCATE {t}")
                    el = adbc_ingest_parallel(mp, url, t, arrow_files[name][k])
                    check_count(url, t, args.rows, f"adbc x {k}")
                    report(f"adbc x {k}", el)
        for client in clients.values():
            client.close()
    except BaseException:
        for label, proc in sluices.items():
            print(f"--- {label} log (tail) ---\n{proc.tail()}", file=sys.stderr)
        raise
    finally:
        for proc in sluices.values():
            proc.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    print()
    print(f"rows per run: {args.rows:,}, best of {args.reps}, every count checked; "
          f"N = {n} parallel streams (sluice's postgres.pool_size)")
    for label in runs:
        print(f"{label}: {settings[label]}")
    print(f"{'shape':<8} {'side':<22} {'M rows/s':>9} {'vs ' + psql_n:>11} {'vs ' + adbc_n:>11}")
    ok = True
    for name in shapes:
        for side in list(runs) + baselines:
            t = best[name, side]
            extra = ""
            if side in runs:
                vp, va = best[name, psql_n] / t, best[name, adbc_n] / t
                if side == "sluice":
                    ok &= vp >= 0.9 and va >= 1.2
                extra = f"{vp:11.2f} {va:11.2f}"
            print(f"{name:<8} {side:<22} {args.rows / t / 1e6:9.2f} {extra}")
    print(f"targets, sluice with default settings (pool_size {n}): >= 0.9 x {psql_n} and "
          f">= 1.2 x {adbc_n}: {'met' if ok else 'NOT met'}")
    if len(runs) > 1:
        print("(the tuned run's ratios are for information; the targets apply to the "
              "default run)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
