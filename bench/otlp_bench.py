#!/usr/bin/env python3
"""OTLP and REST log ingest benchmark: each door against Flight DoPut and a discarding endpoint.

In one run, with the same log records (``--rows``, 2,000,000 by default) sent into the
embedded default (the real release binary in a fresh data directory, default settings:
fsync on), every answer arriving only once its rows are durable:

1. **flight**: DoPut of the rows as Arrow batches of 65,536 rows into ``logs_events``,
   over ``--parallel`` streams (each a share of the batches, batches pipelined);
2. **otlp_http**: ``POST /v1/logs`` with pre-encoded protobuf
   ``ExportLogsServiceRequest`` bodies of ``--per-request`` records (8,192, the OpenTelemetry
   Collector's batch size), ``--parallel`` requests in flight;
3. **otlp_grpc**: the same bodies to ``LogsService/Export`` on the gRPC port;
4. **rest**: ``POST /write/logs`` with pre-encoded NDJSON bodies of the same records;

and, as each protocol's own limit, the same bodies sent by the same client code to an
endpoint that reads every request and discards it (``discard``: a gRPC server and a
keep-alive HTTP/1.1 server in a subprocess that answer an empty success).

The records: 8 services x 64 hosts (one resource per request), levels, messages of 60-100
characters, random trace and span ids, two attributes (``user``, ``status`` as an int).
In ``logs_events`` they are the same rows whichever way they come: the Flight batches
carry the ``labels`` the OTLP mapping makes (the attributes plus ``resource.service.name``
and ``resource.host.name``). Bodies are not compressed by default. ``--gzip`` gzips the
HTTP bodies beforehand and turns on gRPC's own gzip, which grpcio applies in the client
on every call: on 2 cores that client is then the limit (about 0.2 M rows/s even to the
discarding endpoint), so gRPC figures with ``--gzip`` measure the client.
The client pre-encodes a pool of distinct bodies (``--distinct`` records) and sends them
round-robin until ``--rows`` are sent.

Reported: rows/s and MB/s (payload bytes) per door, best of ``--reps`` (the doors run
alternately rep by rep), the ratios to Flight and to the discarding endpoint, sluice's
peak RSS, and the CPU time (user + system) sluice used per million rows (the least of
the reps: steadier than wall time on a shared machine, and it includes the background
work, WAL and Parquet archive, done while the run lasted). Targets: OTLP (HTTP and gRPC) >= 0.4 x Flight and >= 0.5 x its discard
figure; REST NDJSON >= 0.3 x Flight. Every answer must be a full success (an OTLP
partial success or a REST row count that differs is a failure), and at the end each
door's sluice must hold exactly the rows sent (``count(*)`` over SQL). Exit status 1 when
a target is missed or a count differs.

Usage: ``bench/run.sh otlp`` (builds the release binary first), or
``python bench/otlp_bench.py [--rows N] [--reps N] [--parallel N] [--sluice-bin PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import http.client
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flight_bench as fb  # noqa: E402  (Proc, settings, the client path)
from sluice_client import SluiceClient  # noqa: E402

LOGS_EXPORT = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
FLIGHT_BATCH = 65536
SERVICES = [f"svc-{n}" for n in ("api", "auth", "billing", "search", "cart", "mail", "queue", "web")]
HOSTS = [f"host-{i:03d}.dc1.example.net" for i in range(64)]
LEVELS = ["INFO"] * 10 + ["DEBUG"] * 3 + ["WARN"] * 2 + ["ERROR"]
SEVERITY = {"INFO": 9, "DEBUG": 5, "WARN": 13, "ERROR": 17}
TARGETS = {"otlp_http": ("flight", 0.4), "otlp_grpc": ("flight", 0.4), "rest": ("flight", 0.3)}
DISCARD_TARGET = 0.5


# -- the records and their three encodings --------------------------------------------------------


def gen_records(n: int, per_request: int, seed: int = 3):
    """``n`` records as request-sized groups: [(service, host, [record...])]; a record is
    (time_ns, level, message, trace_id bytes, span_id bytes, user, status)."""
    rng = random.Random(seed)
    messages = fb.log_messages(rng)
    base = time.time_ns() - n * 1_000_000
    groups = []
    for start in range(0, n, per_request):
        records = [(base + i * 1_000_000, rng.choice(LEVELS), rng.choice(messages),
                    rng.randbytes(16), rng.randbytes(8), f"u{rng.randrange(10_000)}",
                    rng.choice((200, 200, 200, 404, 500)))
                   for i in range(start, min(n, start + per_request))]
        groups.append((rng.choice(SERVICES), rng.choice(HOSTS), records))
    return groups


def otlp_body(service, host, records) -> bytes:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.extend([KeyValue(key="service.name", value=AnyValue(string_value=service)),
                                   KeyValue(key="host.name", value=AnyValue(string_value=host))])
    sl = rl.scope_logs.add()
    sl.log_records.extend(
        LogRecord(time_unix_nano=t, severity_text=level, severity_number=SEVERITY[level],
                  body=AnyValue(string_value=msg), trace_id=tid, span_id=sid,
                  attributes=[KeyValue(key="user", value=AnyValue(string_value=user)),
                              KeyValue(key="status", value=AnyValue(int_value=status))])
        for t, level, msg, tid, sid, user, status in records)
    return req.SerializeToString()


def ndjson_body(service, host, records) -> bytes:
    lines = []
    for t, level, msg, tid, sid, user, status in records:
        lines.append(json.dumps({
            "timestamp": t // 1_000_000, "service": service, "host": host, "level": level,
            "trace_id": tid.hex(), "span_id": sid.hex(), "message": msg,
            "labels": {"user": user, "status": str(status), "resource.service.name": service,
                       "resource.host.name": host}}))
    return ("\n".join(lines) + "\n").encode()


def arrow_table(groups) -> pa.Table:
    cols = {k: [] for k in ("timestamp", "service", "host", "level", "trace_id", "span_id",
                            "message", "labels")}
    for service, host, records in groups:
        for t, level, msg, tid, sid, user, status in records:
            cols["timestamp"].append(t)
            cols["service"].append(service)
            cols["host"].append(host)
            cols["level"].append(level)
            cols["trace_id"].append(tid.hex())
            cols["span_id"].append(sid.hex())
            cols["message"].append(msg)
            cols["labels"].append([("user", user), ("status", str(status)),
                                   ("resource.service.name", service),
                                   ("resource.host.name", host)])
    schema = pa.schema([("timestamp", pa.timestamp("ns", tz="UTC")), ("service", pa.string()),
                        ("host", pa.string()), ("level", pa.string()), ("trace_id", pa.string()),
                        ("span_id", pa.string()), ("message", pa.string()),
                        ("labels", pa.map_(pa.string(), pa.string()))])
    return pa.table(cols, schema=schema)


# -- the discarding endpoints (run in their own process) ------------------------------------------


def serve_discard() -> None:
    import grpc

    def export(request, context):
        return b""  # an empty ExportLogsServiceResponse: full success

    server = grpc.server(ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_receive_message_length", 256 << 20)])
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.logs.v1.LogsService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})
    server.add_generic_rpc_handlers((handler,))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                             b"Content-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)
        http_port = srv.sockets[0].getsockname()[1]
        print(f"DISCARD_READY grpc=127.0.0.1:{grpc_port} http=127.0.0.1:{http_port}", flush=True)
        await srv.serve_forever()

    asyncio.run(main())


# -- the client -------------------------------------------------------------------------------


def plan(bodies, rows_per_body, total_rows):
    """Indexes into ``bodies`` (round-robin) until ``total_rows`` rows are covered."""
    out, rows, i = [], 0, 0
    while rows < total_rows:
        out.append(i % len(bodies))
        rows += rows_per_body[i % len(bodies)]
        i += 1
    return out


def drive(order, parallel, make_sender, check):
    """Sends ``order`` (body indexes) from ``parallel`` threads, each with its own sender
    (``make_sender()`` returns ``send(i) -> (status, body)``); returns the seconds taken.
    The first failed answer (``check`` says why) stops every thread and is raised."""
    lock = threading.Lock()
    it = iter(order)
    errors = []

    def worker():
        send, close = make_sender()
        try:
            while not errors:
                with lock:
                    i = next(it, None)
                if i is None:
                    break
                problem = check(i, *send(i))
                if problem:
                    errors.append(problem)
        except Exception as e:  # noqa: BLE001 (reported below, with the others)
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            close()

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return time.perf_counter() - start


def send_http(addr, path, content_type, gz, bodies, order, parallel, check):
    """POSTs ``bodies[i]`` for i in ``order`` over ``parallel`` keep-alive connections."""
    host, port = addr.rsplit(":", 1)
    headers = {"Content-Type": content_type}
    if gz:
        headers["Content-Encoding"] = "gzip"

    def make_sender():
        conn = http.client.HTTPConnection(host, int(port), timeout=120)

        def send(i):
            conn.request("POST", path, body=bodies[i], headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()

        return send, conn.close

    return drive(order, parallel, make_sender, check)


def send_grpc(addr, gz, bodies, order, parallel, check):
    """Calls LogsService/Export with ``bodies[i]`` (pre-encoded) for i in ``order``."""
    import grpc

    channel = grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 256 << 20),
                                                   ("grpc.max_receive_message_length", 256 << 20)],
                                    compression=grpc.Compression.Gzip if gz else None)
    call = channel.unary_unary(LOGS_EXPORT)  # bytes in, bytes out: pre-encoded bodies

    def make_sender():
        def send(i):
            try:
                return 200, call(bodies[i], timeout=120)
            except grpc.RpcError as e:
                return e.code(), f"gRPC {e.code()}: {e.details()}".encode()

        return send, lambda: None

    try:
        return drive(order, parallel, make_sender, check)
    finally:
        channel.close()


def otlp_check(i, status, data):
    """A full success: 200 and an empty response (no partial_success)."""
    if status != 200:
        return f"OTLP answered {status}: {data[:300]!r}"
    if data:
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
        resp = ExportLogsServiceResponse.FromString(data)
        if resp.HasField("partial_success") and resp.partial_success.rejected_log_records:
            return f"partial success: {resp.partial_success}"
    return None


def flight_once(location, table_batches, parallel):
    shares = [table_batches[i::parallel] for i in range(parallel)]
    clients = [SluiceClient(location) for _ in range(parallel)]
    results = [None] * parallel

    def run(k):
        results[k] = clients[k].write("logs_events", shares[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(parallel) if shares[k]]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for c in clients:
        c.close()
    acked = sum(a.get("rows", 0) for r in results if r for a in r)
    sent = sum(b.num_rows for b in table_batches)
    if acked != sent:
        raise RuntimeError(f"flight: {acked} rows acked of {sent}")
    return elapsed


# -- main -------------------------------------------------------------------------------------


def start_sluice(binary, workdir, name):
    data_dir = workdir / f"data-{name}"
    env = dict(os.environ, SLUICE__SERVER__GRPC_ADDR="127.0.0.1:0",
               SLUICE__SERVER__HTTP_ADDR="127.0.0.1:0", SLUICE__SERVER__DATA_DIR=str(data_dir))
    return fb.Proc([binary, "serve"], env, "SLUICE_READY", workdir / f"sluice-{name}.log"), \
        fb.describe_settings(env)


def cpu_seconds(proc) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{proc.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_rows(proc) -> int:
    c = SluiceClient(f"grpc://{proc.addrs['grpc']}")
    try:
        return c.query("SELECT count(*) AS n FROM logs_events").column("n")[0].as_py()
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=4, help="requests (or DoPut streams) in flight")
    ap.add_argument("--per-request", type=int, default=8192, help="log records per OTLP/REST body")
    ap.add_argument("--distinct", type=int, default=262_144, help="distinct records pre-encoded")
    ap.add_argument("--gzip", action="store_true", help="gzip every OTLP/REST body")
    ap.add_argument("--doors", default="flight,otlp_http,otlp_grpc,rest")
    ap.add_argument("--sluice-bin", default=os.environ.get("SLUICE_BIN")
                    or str(Path.home() / ".cache/sluice-target/release/sluice"))
    ap.add_argument("--discard-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.discard_server:
        serve_discard()
        return 0
    doors = args.doors.split(",")
    fb.require_file(args.sluice_bin, "sluice binary",
                    "build it: cargo build --release -p sluice, or --sluice-bin")

    distinct = min(args.distinct, args.rows)
    print(f"encoding {distinct:,} distinct records in bodies of {args.per_request:,} ...", flush=True)
    groups = gen_records(distinct, args.per_request)
    rows_per_body = [len(r) for _, _, r in groups]
    otlp = [otlp_body(*g) for g in groups]
    ndjson = [ndjson_body(*g) for g in groups]
    otlp_plain = otlp  # gRPC compresses on its own (channel compression) with --gzip
    if args.gzip:
        otlp = [gzip.compress(b, 1) for b in otlp]
        ndjson = [gzip.compress(b, 1) for b in ndjson]
    table = arrow_table(groups)
    order = plan(otlp, rows_per_body, args.rows)
    total = sum(rows_per_body[i] for i in order)
    # Flight sends the same rows: the distinct table repeated like the bodies are.
    whole, rest = divmod(total, distinct)
    flight_table = pa.concat_tables([table] * whole + ([table.slice(0, rest)] if rest else []))
    flight_batches = flight_table.combine_chunks().to_batches(max_chunksize=FLIGHT_BATCH)
    sizes = {
        "otlp": sum(len(otlp[i]) for i in order),
        "rest": sum(len(ndjson[i]) for i in order),
        "flight": sum(b.nbytes for b in flight_batches),
    }
    print(f"  {total:,} rows per door: OTLP {len(order)} bodies, {sizes['otlp'] / 1e6:.0f} MB; "
          f"NDJSON {sizes['rest'] / 1e6:.0f} MB; Flight {len(flight_batches)} batches, "
          f"{sizes['flight'] / 1e6:.0f} MB", flush=True)

    def rest_check(i, status, data):
        if status != 200:
            return f"REST answered {status}: {data[:300]!r}"
        got = json.loads(data).get("rows")
        return None if got == rows_per_body[i] else f"REST acked {got} rows of {rows_per_body[i]}"

    workdir = Path(tempfile.mkdtemp(prefix="sluice-otlp-bench-"))
    procs = {}
    times = {}
    cpu = {}  # door -> sluice CPU seconds per rep (user + system)
    settings = None
    mismatches = []
    peak = {}
    try:
        procs["discard"] = fb.Proc([sys.executable, __file__, "--discard-server"],
                                   dict(os.environ), "DISCARD_READY", workdir / "discard.log")
        for door in doors:
            procs[door], settings = start_sluice(args.sluice_bin, workdir, door)
        print(f"sluice: {args.sluice_bin} ({settings}), one fresh server per door", flush=True)
        d = procs["discard"].addrs

        def run(door, side):
            """Seconds to send every row through `door` to sluice or the discard endpoint."""
            p = procs[door].addrs if side == "sluice" else d
            if door == "flight":
                return flight_once(f"grpc://{p['grpc']}", flight_batches, args.parallel)
            if door == "otlp_http":
                return send_http(p["http"], "/v1/logs", "application/x-protobuf", args.gzip,
                                 otlp, order, args.parallel, otlp_check)
            if door == "otlp_grpc":
                return send_grpc(p["grpc"], args.gzip, otlp_plain, order, args.parallel,
                                 otlp_check)
            return send_http(p["http"], "/write/logs", "application/x-ndjson", args.gzip,
                             ndjson, order, args.parallel,
                             rest_check if side == "sluice" else otlp_check)

        for rep in range(1, args.reps + 1):
            for door in doors:
                sides = ["sluice"] if door == "flight" else ["discard", "sluice"]
                for side in sides:
                    cpu0 = cpu_seconds(procs[door]) if side == "sluice" else 0.0
                    t = run(door, side)
                    times.setdefault((door, side), []).append(t)
                    extra = ""
                    if side == "sluice":
                        used = cpu_seconds(procs[door]) - cpu0
                        cpu.setdefault(door, []).append(used)
                        extra = f"  sluice CPU {used / (total / 1e6):5.2f} s per M rows"
                    print(f"  rep {rep}  {door:<10} {side:<8} {t:7.3f} s "
                          f"{total / t / 1e6:7.2f} M rows/s{extra}", flush=True)
        for door in doors:
            got, want = count_rows(procs[door]), total * args.reps
            print(f"  {door}: logs_events count(*) = {got:,} (expected {want:,}) "
                  f"{'ok' if got == want else 'MISMATCH'}", flush=True)
            if got != want:
                mismatches.append(f"{door}: count(*) = {got:,}, expected {want:,}")
            peak[door] = procs[door].peak_rss_kib()
    except BaseException:
        for name, p in procs.items():
            print(f"--- {name} log (tail) ---\n{p.tail()}", file=sys.stderr)
        raise
    finally:
        for p in procs.values():
            p.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    rate = {k: total / t for k, t in best.items()}
    print()
    print(f"rows per run: {total:,}; {args.parallel} in flight; OTLP/REST bodies of "
          f"{args.per_request:,} records{' (gzip)' if args.gzip else ''}; Flight batches of "
          f"{FLIGHT_BATCH:,} rows; best of {args.reps}")
    print(f"sluice settings: {settings}")
    print(f"{'door':<10} {'side':<8} {'M rows/s':>9} {'MB/s':>8} {'x flight':>9} {'x discard':>10} "
          f"{'peak RSS':>9} {'CPU s/M rows':>13}")
    for door in doors:
        nbytes = sizes["flight" if door == "flight" else "rest" if door == "rest" else "otlp"]
        for side in ("discard", "sluice"):
            if (door, side) not in rate:
                continue
            r = rate[door, side]
            xf = f"{r / rate['flight', 'sluice']:9.2f}" if side == "sluice" and ("flight", "sluice") in rate else " " * 9
            xd = f"{r / rate[door, 'discard']:10.2f}" if side == "sluice" and (door, "discard") in rate else " " * 10
            rss = f"{peak[door] / 1024:7.0f}Mi" if side == "sluice" and peak.get(door) else ""
            c = f"{min(cpu[door]) / (total / 1e6):13.2f}" if side == "sluice" and door in cpu else ""
            print(f"{door:<10} {side:<8} {r / 1e6:9.2f} {nbytes / best[door, side] / 1e6:8.0f} {xf} {xd} {rss:>9} {c}")
    ok = not mismatches
    for door, (ref, target) in TARGETS.items():
        if door not in doors or ref not in doors:
            continue
        ratio = rate[door, "sluice"] / rate[ref, "sluice"]
        met = ratio >= target
        ok &= met
        print(f"target {door} >= {target:.1f} x {ref}: {'met' if met else 'NOT met'} ({ratio:.2f})")
        if door.startswith("otlp"):
            ratio = rate[door, "sluice"] / rate[door, "discard"]
            met = ratio >= DISCARD_TARGET
            ok &= met
            print(f"target {door} >= {DISCARD_TARGET:.1f} x its discarding endpoint: "
                  f"{'met' if met else 'NOT met'} ({ratio:.2f})")
    for m in mismatches:
        print(f"FAIL: row count mismatch: {m}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
