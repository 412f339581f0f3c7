#!/usr/bin/env python3
"""End-to-end Flight ingest benchmark: Sluice against the raw transport limit.

In one run, with the same pre-generated rows (2,000,000 per shape by default, in
64k-row batches):

1. the **limit**: a pyarrow Flight server in a subprocess that reads every batch of a
   DoPut and acks it with a tiny JSON message, nothing else;
2. **sluice**: the real release binary with ``SLUICE__WAL__FSYNC=true`` in a fresh
   data directory, writing into ``bench_logs`` and ``bench_points``; an ack arrives
   once its batch is durable and the run ends when every ack is in.

The two sides run alternately, rep by rep, so both see the same machine, and both are
driven by the same client code (``SluiceClient.write``: one DoPut per run, acks read on
a background thread). Shapes:

* logs:   timestamp (ms, UTC), service, host, level, message (60-100 chars),
  trace_id (32 hex chars)
* points: time (us, UTC), series_id int64, value double

MB is the sum of ``RecordBatch.nbytes`` (10^6 bytes). Each measurement is repeated
``--reps`` times and the best is reported, with the ratio sluice/limit (target >= 0.7)
and the sluice process' peak RSS (VmHWM). A third reference is the disk: sequential
write + fsync of as many bytes in the same file system, since every acked byte is
written to the WAL. Sluice runs with its default settings (fsync on); the settings it ran
with are printed, each marked default or tuned.

Every DoPut's acks must cover every row sent, and at the end sluice's ``count(*)`` of
each table must equal the rows sent over all reps. Exit status 1 when a count differs or
the target is missed (or a prerequisite, such as the binary, is missing). With
``--limit-only`` or ``--no-fsync`` (diagnosis) the target is reported as IGNORED, not met.

Usage: ``bench/run.sh`` (builds the release binary first), or
``python bench/flight_bench.py [--rows N] [--reps N] [--sluice-bin PATH] [--limit-only]``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "clients" / "python"))
from sluice_client import SluiceClient  # noqa: E402

BATCH_ROWS = 65536

LOGS_SCHEMA = {
    "name": "bench_logs",
    "columns": [
        {"name": "timestamp", "type": "timestamp_ms"},
        {"name": "service", "type": "string"},
        {"name": "host", "type": "string"},
        {"name": "level", "type": "string"},
        {"name": "message", "type": "string"},
        {"name": "trace_id", "type": "string"},
    ],
}
POINTS_SCHEMA = {
    "name": "bench_points",
    "columns": [
        {"name": "time", "type": "timestamp"},
        {"name": "series_id", "type": "int64"},
        {"name": "value", "type": "double"},
    ],
}


# -- the discarding Flight server (runs in its own process) ------------------------------------


class DiscardServer(flight.FlightServerBase):
    """Reads every batch of a DoPut, acks it like Sluice does, keeps nothing."""

    def do_put(self, context, descriptor, reader, writer):
        request_id = 0
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                return
            if chunk.data is None:
                continue
            request_id += 1
            ack = {"request_id": request_id, "rows": chunk.data.num_rows, "wal_seq": request_id}
            writer.write(pa.py_buffer(json.dumps(ack).encode()))


def serve_discard() -> None:
    server = DiscardServer("grpc://127.0.0.1:0")
    print(f"DISCARD_READY grpc=127.0.0.1:{server.port}", flush=True)
    server.serve()


# -- data ---------------------------------------------------------------------------------------


def _random_indices(rng: random.Random, n: int, mask: int) -> pa.Array:
    """n pseudo-random uint32 indices in [0, mask] (mask = 2^k - 1), without Python ints."""
    raw = pa.Array.from_buffers(pa.uint32(), n, [None, pa.py_buffer(rng.randbytes(4 * n))])
    return pc.bit_wise_and(raw, pa.scalar(mask, pa.uint32()))


def _hex_ids(rng: random.Random, n: int) -> pa.Array:
    """n random 32-char lowercase hex strings, built straight from buffers."""
    data = rng.randbytes(16 * n).hex().encode()
    offsets = array("i", range(0, 32 * n + 1, 32))
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _time_column(n: int, base: int, step: int, unit: str) -> pa.Array:
    ints = pa.array(range(base, base + n * step, step), pa.int64())
    return ints.cast(pa.timestamp(unit, tz="UTC"))


def log_messages(rng: random.Random, n: int = 4096) -> list:
    """``n`` log messages of 60-100 characters (also used by otlp_bench.py)."""
    words = ("request handled upstream timeout retry cache miss user session token "
             "connection reset by peer slow query payment accepted queue depth exceeded "
             "disk latency gc pause scheduled job completed shard rebalanced").split()
    messages = []
    for _ in range(n):
        target = rng.randint(60, 100)
        msg = f"id={rng.getrandbits(32):08x}"
        while len(msg) < target:
            msg += " " + rng.choice(words)
        messages.append(msg[:target])
    return messages


def gen_logs(n: int, seed: int = 1) -> pa.Table:
    rng = random.Random(seed)
    messages = log_messages(rng)
    services = pa.array([f"svc-{name}" for name in
                         ("api", "auth", "billing", "search", "cart", "mail", "queue", "web")])
    hosts = pa.array([f"host-{i:03d}.dc1.example.net" for i in range(64)])
    levels = pa.array(["INFO"] * 10 + ["DEBUG"] * 3 + ["WARN"] * 2 + ["ERROR"])
    now_ms = int(time.time() * 1000) - n
    return pa.table({
        "timestamp": _time_column(n, now_ms, 1, "ms"),
        "service": services.take(_random_indices(rng, n, 7)),
        "host": hosts.take(_random_indices(rng, n, 63)),
        "level": levels.take(_random_indices(rng, n, 15)),
        "message": pa.array(messages).take(_random_indices(rng, n, 4095)),
        "trace_id": _hex_ids(rng, n),
    })


def gen_points(n: int, seed: int = 2) -> pa.Table:
    rng = random.Random(seed)
    now_us = int(time.time() * 1_000_000) - n * 1000
    seq = pa.array(range(n), pa.int64())
    raw = _random_indices(rng, n, 0xFFFFFFFF).cast(pa.float64())
    return pa.table({
        "time": _time_column(n, now_us, 1000, "us"),
        "series_id": pc.bit_wise_and(seq, 1023),
        "value": pc.divide(raw, 1 << 20),
    })


# -- sluice's settings --------------------------------------------------------------------------

# Defaults of the settings the benches set (server/src/config.rs, server/sinks/src/config.rs,
# sluice.example.toml), to tell a default run from a tuned one.
SLUICE_DEFAULTS = {
    "wal.fsync": "true",
    "wal.compression": "none",
    "postgres.pool_size": "4",
    "postgres.timescaledb": "auto",
    "clickhouse.compression": "lz4",
    "rollup.enabled": "true",
}
# Where the bench puts sluice and its stores: not tuning.
_PLUMBING = {"server.grpc_addr", "server.http_addr", "server.data_dir", "postgres.url",
             "clickhouse.url"}


def describe_settings(env: dict) -> str:
    """The ``SLUICE__SECTION__KEY`` settings in ``env`` (what a sluice under test gets,
    including any inherited from the caller's environment), each marked default or tuned;
    every setting not listed is at its default."""
    parts = []
    for var in sorted(k for k in env if k.startswith("SLUICE__")):
        key = ".".join(var[len("SLUICE__"):].lower().split("__"))
        if key in _PLUMBING:
            continue
        value = str(env[var])
        default = SLUICE_DEFAULTS.get(key)
        if default is None:
            parts.append(f"{key}={value} (tuned)")
        elif value.lower() == default:
            parts.append(f"{key}={value} (default)")
        else:
            parts.append(f"{key}={value} (tuned; default {default})")
    return ", ".join(parts + ["everything else default"])


def require_file(path, what: str, hint: str) -> None:
    """Stops the bench (exit status 1) when a prerequisite is missing."""
    if not os.access(path, os.X_OK):
        raise SystemExit(f"{what} not found at {path} ({hint})")


def require_tool(name: str, hint: str) -> None:
    if shutil.which(name) is None:
        raise SystemExit(f"{name} is needed and not on PATH ({hint})")


# -- processes ---------------------------------------------------------------------------------


class Proc:
    """A child process whose stdout announces readiness with one line."""

    def __init__(self, argv, env, marker, log_path, timeout=30.0):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=self.log)
        lines: "queue.Queue[bytes]" = queue.Queue()

        def pump():
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(b"")

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                line = None
            if line and line.decode(errors="replace").startswith(marker):
                self.addrs = dict(kv.split("=", 1) for kv in line.decode().split()[1:])
                return
            if line == b"" or left <= 0:
                self.stop()
                raise RuntimeError(f"{argv[0]} did not print {marker} within {timeout}s "
                                   f"(exit {self.proc.returncode}); log:\n{self.tail()}")

    def tail(self, n=4000) -> str:
        self.log.flush()
        return Path(self.log_path).read_bytes()[-n:].decode(errors="replace")

    def peak_rss_kib(self):
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self, timeout=15.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- measuring -----------------------------------------------------------------------------------


def disk_write_mb_s(directory: Path, nbytes: int, fsync_every: int = 64 << 20) -> float:
    """Sequential write + fsync throughput of ``directory``'s file system, in MB/s.

    Every acked byte goes through Sluice's WAL, so this bounds what Sluice can sustain
    (with fsync on, and without it once the kernel's dirty-page limit is reached). Written
    as the WAL writes (``[wal] direct_io``): with O_DIRECT from page-aligned 4 MiB chunks,
    through the page cache where the file system refuses that.
    """
    import mmap
    chunk = mmap.mmap(-1, 4 << 20)  # page-aligned, as O_DIRECT needs
    chunk.write(os.urandom(4 << 20))
    path = directory / "disk-probe"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        fd = os.open(path, flags, 0o600)
    try:
        start = time.perf_counter()
        written = since_sync = 0
        while written < nbytes:
            written += os.write(fd, chunk)
            since_sync += len(chunk)
            if since_sync >= fsync_every:
                os.fsync(fd)
                since_sync = 0
        os.fsync(fd)
        return written / (time.perf_counter() - start) / 1e6
    finally:
        os.close(fd)
        path.unlink()


def run_once(client: SluiceClient, table: str, batches) -> float:
    start = time.perf_counter()
    acks = client.write(table, batches)
    elapsed = time.perf_counter() - start
    rows = sum(b.num_rows for b in batches)
    acked = sum(a.get("rows", 0) for a in acks)
    if acked != rows or len(acks) != len(batches):
        raise RuntimeError(f"{table}: {len(acks)} acks for {acked} rows, "
                           f"expected {len(batches)} acks for {rows} rows")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sluice-bin", default=os.environ.get("SLUICE_BIN")
                    or str(Path.home() / ".cache/sluice-target/release/sluice"))
    ap.add_argument("--limit-only", action="store_true", help="skip the sluice half")
    ap.add_argument("--no-fsync", action="store_true",
                    help="run sluice with SLUICE__WAL__FSYNC=false (diagnosis only)")
    ap.add_argument("--keep-data", action="store_true", help="keep sluice's data directory")
    ap.add_argument("--discard-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.discard_server:
        serve_discard()
        return 0
    if args.rows < 1 or args.reps < 1:
        ap.error("--rows and --reps must be at least 1")

    print(f"generating {args.rows:,} rows per shape ...", flush=True)
    shapes = {}
    for name, gen, table in (("logs", gen_logs, "bench_logs"),
                             ("points", gen_points, "bench_points")):
        batches = gen(args.rows).to_batches(max_chunksize=BATCH_ROWS)
        nbytes = sum(b.nbytes for b in batches)
        shapes[name] = (table, batches, nbytes)
        print(f"  {name}: {len(batches)} batches, {nbytes / 1e6:.1f} MB", flush=True)

    sides = ["limit"] if args.limit_only else ["limit", "sluice"]
    if "sluice" in sides:
        require_file(args.sluice_bin, "sluice binary",
                     "build it: cargo build --release -p sluice, or --sluice-bin")

    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    times = {}  # (side, shape) -> [seconds per rep]
    peak_rss = disk = None
    settings = None
    mismatches = []
    procs = {}
    try:
        disk = disk_write_mb_s(workdir, max(n for _, _, n in shapes.values()))
        print(f"disk: sequential write (as the WAL: O_DIRECT where possible) + fsync every 64 MiB in {workdir}: {disk:.0f} MB/s",
              flush=True)
        print("limit: discarding pyarrow Flight server (subprocess)", flush=True)
        procs["limit"] = Proc([sys.executable, __file__, "--discard-server"], dict(os.environ),
                              "DISCARD_READY", workdir / "discard.log")
        if "sluice" in sides:
            data_dir = workdir / "data"
            env = dict(os.environ,
                       SLUICE__SERVER__GRPC_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__HTTP_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__DATA_DIR=str(data_dir),
                       SLUICE__WAL__FSYNC="false" if args.no_fsync else "true")
            settings = describe_settings(env)
            print(f"sluice: {args.sluice_bin} ({settings}; data in {data_dir})", flush=True)
            procs["sluice"] = Proc([args.sluice_bin, "serve"], env, "SLUICE_READY",
                                   workdir / "sluice.log")
        clients = {side: SluiceClient(f"grpc://{procs[side].addrs['grpc']}") for side in sides}
        if "sluice" in clients:
            clients["sluice"].register_table(LOGS_SCHEMA)
            clients["sluice"].register_table(POINTS_SCHEMA)

        # Alternate the sides rep by rep so both see the same machine (noisy neighbours,
        # page cache, CPU frequency); report the best rep of each.
        for rep in range(1, args.reps + 1):
            for name, (table, batches, _) in shapes.items():
                for side in sides:
                    t = run_once(clients[side], table, batches)
                    times.setdefault((side, name), []).append(t)
                    print(f"  rep {rep}  {name:<7} {side:<7} {t:7.3f} s  "
                          f"{args.rows / t / 1e6:7.2f} M rows/s", flush=True)

        if "sluice" in clients:
            for name, (table, _, _) in shapes.items():
                got = clients["sluice"].query(f"SELECT count(*) AS n FROM {table}")
                got, want = got.column("n")[0].as_py(), args.reps * args.rows
                print(f"  sluice {table}: count(*) = {got:,} (expected {want:,}) "
                      f"{'ok' if got == want else 'MISMATCH'}", flush=True)
                if got != want:
                    mismatches.append(f"{table}: count(*) = {got:,}, expected {want:,}")
            peak_rss = procs["sluice"].peak_rss_kib()
        for client in clients.values():
            client.close()
    except BaseException:
        if "sluice" in procs:
            print(f"--- sluice log (tail) ---\n{procs['sluice'].tail()}", file=sys.stderr)
        raise
    finally:
        for proc in procs.values():
            proc.stop()
        if args.keep_data:
            print(f"data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {key: min(ts) for key, ts in times.items()}

    print()
    print(f"rows per run: {args.rows:,}, batch {BATCH_ROWS:,} rows, best of {args.reps}")
    if settings is not None:
        print(f"sluice settings: {settings}")
    print(f"{'shape':<8} {'side':<7} {'M rows/s':>9} {'MB/s':>9} {'ratio':>7} {'of disk':>8}")
    for name, (_, _, nbytes) in shapes.items():
        limit = results["limit", name]
        for side in ("limit", "sluice"):
            if (side, name) not in results:
                continue
            t = results[side, name]
            mb_s = nbytes / t / 1e6
            extra = f"{limit / t:7.2f} {mb_s / disk:8.2f}" if side == "sluice" else ""
            print(f"{name:<8} {side:<7} {args.rows / t / 1e6:9.2f} {mb_s:9.1f} {extra}")
    if disk is not None:
        print(f"disk write+fsync: {disk:.0f} MB/s (every byte Sluice acks is written to its WAL)")
    if peak_rss is not None:
        print(f"sluice peak RSS (VmHWM): {peak_rss / 1024:.1f} MiB")
    ok = True
    ratios = [results["limit", n] / results["sluice", n] for n in shapes if ("sluice", n) in results]
    if args.limit_only:
        print("target sluice/limit >= 0.70: IGNORED (--limit-only: sluice did not run)")
    elif args.no_fsync:
        print(f"target sluice/limit >= 0.70: IGNORED (--no-fsync is not the default setting; "
              f"worst {min(ratios):.2f} with fsync off)")
    else:
        met = len(ratios) == len(shapes) and min(ratios) >= 0.7
        print(f"target sluice/limit >= 0.70: {'met' if met else 'NOT met'} "
              f"(worst {min(ratios):.2f})")
        ok &= met
    for m in mismatches:
        print(f"FAIL: row count mismatch: {m}")
    ok &= not mismatches
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
