#!/usr/bin/env python3
"""ClickHouse ingest benchmark: Sluice end to end against curl of a Native file.

In one run, with the same pre-generated rows (2,000,000 logs rows by default, in 64k-row
batches, the logs shape of ``flight_bench.py``), into the same pre-created MergeTree
table of one ClickHouse (a throwaway chdb-core server, or ``SLUICE_BENCH_CH_URL``), each
measured ``--reps`` times, alternating, the table truncated before every measurement:

1. **sluice, lz4**: the release binary with ``clickhouse.url`` set, fsync on and every
   other setting at its default, including ``clickhouse.compression = "lz4"`` (LZ4 INSERT
   bodies); the clock runs from the first DoPut until ``/readyz`` says the clickhouse sink
   has nothing left (every row inserted), then ``count()`` is checked. Also printed: when
   the last DoPut ack came (every row durable in the WAL) and the CPU seconds sluice and
   ClickHouse used;
2. **sluice, none**: the same with ``clickhouse.compression = "none"`` (uncompressed
   bodies, as curl sends), a second sluice process in its own data directory;
3. **curl**: ``curl --data-binary @file 'INSERT INTO t FORMAT Native'`` of the same rows
   in the same order (ClickHouse's own insert limit). The file is written beforehand by
   ClickHouse itself: the client's batches go into a Memory table as ArrowStream and come
   out with ``SELECT * ... FORMAT Native`` on one thread, so the order is kept;
4. **curl, sorted** (``--sorted-too``, for information): the same, of a file written by
   ``SELECT * FROM t`` after an insert, i.e. already in ORDER BY order, which spares
   ClickHouse the sort of the insert. The rows the client sends are not sorted, so this
   is not the limit for them.

Target (issue 4): sluice >= 0.9 x curl, for the run with the default compression (lz4);
the ratio of the ``none`` run is reported beside it. The WAL is uncompressed (the
default; ``--wal-compression`` tunes both runs, and the settings are printed, each marked
default or tuned). Exit status 1 when the target is missed, when any run's ``count()``
differs from the rows sent, or when a prerequisite (ClickHouse, curl, the binary) is
missing.

Usage: ``bench/run.sh ch`` or ``python bench/ch_bench.py [--rows N] [--reps N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flight_bench import (BATCH_ROWS, SLUICE_DEFAULTS, Proc, describe_settings,  # noqa: E402
                          gen_logs, require_file, require_tool)
from pg_bench import free_port, wait_sink_idle  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "clients" / "python"))
from sluice_client import SluiceClient  # noqa: E402

TABLE = "bench_logs"
DDL = (f"CREATE TABLE {TABLE} (timestamp DateTime64(3, 'UTC'), service LowCardinality(String), "
       "host LowCardinality(String), level LowCardinality(String), message String, "
       "trace_id String) ENGINE = MergeTree PARTITION BY toYYYYMMDD(timestamp) "
       "ORDER BY (service, timestamp) SETTINGS non_replicated_deduplication_window = 1000")
COLUMNS = [{"name": "timestamp", "type": "timestamp_ms"},
           {"name": "service", "type": "string", "role": "tag"},
           {"name": "host", "type": "string", "role": "tag"},
           {"name": "level", "type": "string", "role": "tag"},
           {"name": "message", "type": "string", "role": "message"},
           {"name": "trace_id", "type": "string"}]


class ThrowawayClickHouse:
    """A chdb-core server in a temp dir, as INFRA.md describes."""

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
                    raise SystemExit("ClickHouse (chdb-core) did not start; pip install chdb-core")
                time.sleep(0.2)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ch(url: str, sql: str, data: bytes | None = None) -> bytes:
    q = urllib.parse.urlencode({"query": sql}) if data is not None else ""
    req = urllib.request.Request(f"{url}/?{q}", data=data if data is not None else sql.encode())
    with urllib.request.urlopen(req) as r:
        return r.read()


def native_in_client_order(url: str, table) -> bytes:
    """The rows as one Native file, in the order the client sends them, written by ClickHouse.

    The batches go into a Memory table as ArrowStream on one thread; one thread reads them
    back out."""
    import pyarrow as pa
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=BATCH_ROWS)
    src = f"{TABLE}_src"
    ch(url, f"DROP TABLE IF EXISTS {src}")
    ch(url, f"CREATE TABLE {src} AS {TABLE} ENGINE = Memory")
    # Parallel parsing would interleave the batches.
    ch(url, f"INSERT INTO {src} SETTINGS input_format_parallel_parsing = 0, "
            "max_insert_threads = 1 FORMAT ArrowStream", sink.getvalue().to_pybytes())
    body = ch(url, f"SELECT * FROM {src} SETTINGS max_threads = 1 FORMAT Native")
    # The order is what makes this the client's workload: check it at a few rows.
    for i in (0, table.num_rows // 2, table.num_rows - 1):
        got = ch(url, f"SELECT trace_id FROM {src} LIMIT 1 OFFSET {i} "
                      "SETTINGS max_threads = 1 FORMAT TSVRaw").decode().strip()
        if got != table.column("trace_id")[i].as_py():
            raise RuntimeError(f"the Memory table did not keep the client's order: row {i} "
                               f"has trace_id {got!r}")
    ch(url, f"DROP TABLE {src}")
    return body


def curl_insert(url: str, server, path: Path, rows: int) -> tuple[float, float]:
    """Time curl --data-binary of a Native file into the truncated table; (seconds, CH CPU s)."""
    ch(url, f"TRUNCATE TABLE {TABLE}")
    query = urllib.parse.quote(f"INSERT INTO {TABLE} FORMAT Native")
    cpu0 = cpu_seconds(server.proc.pid) if server else 0
    start = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "--data-binary", f"@{path}",
                    f"{url}/?query={query}"], check=True, stdout=subprocess.DEVNULL)
    el = time.perf_counter() - start
    ch_cpu = (cpu_seconds(server.proc.pid) - cpu0) if server else float("nan")
    check_count(url, rows, "curl")
    return el, ch_cpu


def check_count(url: str, rows: int, side: str) -> None:
    """Raises (the bench exits 1) unless the table holds exactly ``rows`` rows."""
    n = int(ch(url, f"SELECT count() FROM {TABLE}"))
    if n != rows:
        raise RuntimeError(f"row count mismatch: after {side}, {TABLE} has {n} rows, "
                           f"expected {rows}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sluice-bin", default=os.environ.get("SLUICE_BIN")
                    or str(Path.home() / ".cache/sluice-target/release/sluice"))
    ap.add_argument("--wal-compression",
                    default=os.environ.get("SLUICE__WAL__COMPRESSION",
                                           SLUICE_DEFAULTS["wal.compression"]))
    ap.add_argument("--sorted-too", action="store_true",
                    help="also time curl of a file already sorted by the table's ORDER BY")
    args = ap.parse_args()
    if args.rows < 1 or args.reps < 1:
        ap.error("--rows and --reps must be at least 1")
    require_file(args.sluice_bin, "sluice binary",
                 "build it: cargo build --release -p sluice, or --sluice-bin")
    require_tool("curl", "apt-get install curl")
    # clickhouse.compression of each sluice run; the first is the default, the target's.
    default_comp = SLUICE_DEFAULTS["clickhouse.compression"]
    runs = {f"sluice-{c}": c for c in (default_comp, "none")}
    target_run = f"sluice-{default_comp}"

    table = gen_logs(args.rows)
    batches = table.to_batches(max_chunksize=BATCH_ROWS)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-chbench-"))
    server = None
    sluices: dict = {}  # label -> Proc
    clients: dict = {}  # label -> SluiceClient
    settings: dict = {}
    times: dict = {}
    try:
        url = os.environ.get("SLUICE_BENCH_CH_URL")
        if not url:
            server = ThrowawayClickHouse(workdir)
            url = server.url
        print(f"ClickHouse: {url} ({ch(url, 'SELECT version()').decode().strip()})", flush=True)
        ch(url, f"DROP TABLE IF EXISTS {TABLE}")
        ch(url, DDL)
        for label, comp in runs.items():
            env = dict(os.environ,
                       SLUICE__SERVER__GRPC_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__HTTP_ADDR="127.0.0.1:0",
                       SLUICE__SERVER__DATA_DIR=str(workdir / f"data-{comp}"),
                       SLUICE__WAL__FSYNC="true",
                       SLUICE__WAL__COMPRESSION=args.wal_compression,
                       SLUICE__CLICKHOUSE__COMPRESSION=comp,
                       SLUICE__CLICKHOUSE__URL=url)
            settings[label] = describe_settings(env)
            print(f"{label}: {settings[label]}", flush=True)
            sluices[label] = Proc([args.sluice_bin, "serve"], env, "SLUICE_READY",
                                  workdir / f"sluice-{comp}.log")
            clients[label] = SluiceClient(f"grpc://{sluices[label].addrs['grpc']}")
            clients[label].register_table({"name": TABLE, "sinks": ["clickhouse"],
                                           "columns": COLUMNS})
        native = workdir / "rows.native"
        native.write_bytes(native_in_client_order(url, table))
        native_sorted = workdir / "rows.sorted.native"
        for rep in range(1, args.reps + 1):
            for label, client in clients.items():
                sluice = sluices[label]
                ch(url, f"TRUNCATE TABLE {TABLE}")
                cpu0 = (cpu_seconds(sluice.proc.pid),
                        cpu_seconds(server.proc.pid) if server else 0)
                start = time.perf_counter()
                client.write(TABLE, batches)
                acked = time.perf_counter() - start
                wait_sink_idle(sluice.addrs["http"], sink="clickhouse")
                el = time.perf_counter() - start
                cpu = (cpu_seconds(sluice.proc.pid) - cpu0[0],
                       (cpu_seconds(server.proc.pid) - cpu0[1]) if server else float("nan"))
                check_count(url, args.rows, label)
                times.setdefault(label, []).append(el)
                print(f"  rep {rep} {label:<11} {el:7.3f} s {args.rows / el / 1e6:6.2f} M rows/s "
                      f"(all acked at {acked:.3f} s; CPU s: sluice {cpu[0]:.2f}, "
                      f"ClickHouse {cpu[1]:.2f})", flush=True)
            curl_runs = [("curl", native)]
            if args.sorted_too:
                if not native_sorted.exists():
                    native_sorted.write_bytes(ch(url, f"SELECT * FROM {TABLE} FORMAT Native"))
                curl_runs.append(("curl-sorted", native_sorted))
            for side, path in curl_runs:
                el, ch_cpu = curl_insert(url, server, path, args.rows)
                times.setdefault(side, []).append(el)
                print(f"  rep {rep} {side:<11} {el:7.3f} s {args.rows / el / 1e6:6.2f} M rows/s "
                      f"(CPU s: ClickHouse {ch_cpu:.2f})", flush=True)
        for client in clients.values():
            client.close()
    except BaseException:
        for label, proc in sluices.items():
            print(f"--- {label} log (tail) ---\n{proc.tail()}", file=sys.stderr)
        raise
    finally:
        for proc in sluices.values():
            proc.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    print()
    print(f"rows per run: {args.rows:,} (logs shape), best of {args.reps}, every count checked")
    for label in runs:
        print(f"{label}: {settings[label]}")
    for side in times:
        extra = ""
        if side in runs:
            extra = (f"  sluice / curl = {best['curl'] / best[side]:.2f}"
                     + (" (default compression: the target's run)" if side == target_run
                        else " (for information)"))
        print(f"{side:<11} {args.rows / best[side] / 1e6:6.2f} M rows/s{extra}")
    ratio = best["curl"] / best[target_run]
    ok = ratio >= 0.9
    print(f"target {target_run} (clickhouse.compression default {default_comp}) / curl "
          f">= 0.9: {'met' if ok else 'NOT met'} ({ratio:.2f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
