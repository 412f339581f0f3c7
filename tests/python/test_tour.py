"""The README tour, end to end against the real binary, plus rejected-batch behaviour.

Register a table, stream 1,000,000 rows over Flight DoPut in 64k-row batches, check the
acks, then read the rows back over Flight (DoGet with SQL) and HTTP (/query, /schema).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest

N_ROWS = 1_000_000
N_HOSTS = 10
BATCH = 65536
STEP_US = 1000  # one row per millisecond
CALL = flight.FlightCallOptions(timeout=300)

CPU_SCHEMA = {
    "name": "cpu",
    "columns": [
        {"name": "time", "type": "timestamp"},
        {"name": "host", "type": "string"},
        {"name": "value", "type": "double"},
    ],
}


def cpu_schema(name: str) -> dict:
    return dict(CPU_SCHEMA, name=name)


def cpu_rows(n: int, base_us: int, start: int = 0) -> pa.Table:
    """Rows i in [start, start+n): time = base + i ms, host = host-(i % 10), value = i / 2."""
    i = pa.array(range(start, start + n), pa.int64())
    hosts = pa.array([f"host-{h}" for h in range(N_HOSTS)])
    return pa.table({
        "time": pc.add(pc.multiply(i, STEP_US), base_us).cast(pa.timestamp("us", tz="UTC")),
        "host": hosts.take(pc.remainder(i, N_HOSTS)),
        "value": pc.divide(i.cast(pa.float64()), 2.0),
    })


def as_us(column) -> list:
    """Timestamps of any unit/zone as integer microseconds since the epoch (UTC)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.type.tz is None:
        arr = arr.cast(pa.timestamp(arr.type.unit, tz="UTC"))
    return arr.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()


def iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def http_json(url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise AssertionError(f"{req.method} {url} -> {err.code}: {err.read()[:2000]!r}") from None


def table_names(tables) -> list:
    return [t if isinstance(t, str) else t.get("name") for t in tables]


def test_tour(sluice, client):
    # 1. register
    assert client.register_table(CPU_SCHEMA) == {"name": "cpu", "version": 1}
    assert client.get_table("cpu")["name"] == "cpu"
    names = table_names(client.list_tables())
    assert "cpu" in names and "logs_events" in names, names

    # 2. stream 1M rows in 64k batches
    base_us = (int(time.time()) - 3600) * 1_000_000
    data = cpu_rows(N_ROWS, base_us)
    acks = client.write("cpu", data, max_chunksize=BATCH, options=CALL)
    n_batches = -(-N_ROWS // BATCH)
    assert len(acks) == n_batches, acks
    assert sum(a["rows"] for a in acks) == N_ROWS
    assert [a["rows"] for a in acks] == [b.num_rows for b in data.to_batches(BATCH)]
    assert len({a["request_id"] for a in acks}) == n_batches, acks
    seqs = [a["wal_seq"] for a in acks]
    assert seqs == sorted(seqs) and seqs[-1] > seqs[0], f"wal_seq not increasing: {seqs}"

    # 3. query back over Flight
    t = client.query("SELECT count(*) AS n, sum(value) AS s, min(time) AS tmin, "
                     "max(time) AS tmax FROM cpu", options=CALL)
    assert t.num_rows == 1
    assert t.column("n")[0].as_py() == N_ROWS
    assert t.column("s")[0].as_py() == N_ROWS * (N_ROWS - 1) / 4  # sum of i/2, exact
    assert as_us(t.column("tmin")) == [base_us]
    assert as_us(t.column("tmax")) == [base_us + (N_ROWS - 1) * STEP_US]

    t = client.query("SELECT host, count(*) AS n FROM cpu GROUP BY host ORDER BY host",
                     options=CALL)
    assert t.to_pylist() == [{"host": f"host-{h}", "n": N_ROWS // N_HOSTS} for h in range(N_HOSTS)]

    cutoff = base_us + 1000 * STEP_US  # the first 1000 rows
    t = client.query(f"SELECT count(*) AS n, max(value) AS m FROM cpu WHERE time < '{iso(cutoff)}'",
                     options=CALL)
    assert t.to_pylist() == [{"n": 1000, "m": 999 / 2}]

    # 4. the same over HTTP
    status, rows = http_json(f"{sluice.http_url}/query",
                             {"sql": "SELECT count(*) AS n, sum(value) AS s FROM cpu "
                                     "WHERE host = 'host-3'"})
    assert status == 200
    # host-3 holds i = 3, 13, 23, ...: sum(i/2) = (100000 * 3 + 10 * sum(0..99999)) / 2
    want_sum = (100_000 * 3 + 10 * (99_999 * 100_000 // 2)) / 2
    assert len(rows) == 1 and rows[0]["n"] == 100_000 and float(rows[0]["s"]) == want_sum, rows

    status, schema = http_json(f"{sluice.http_url}/schema/cpu")
    assert status == 200
    assert schema["name"] == "cpu", schema
    cols = [(c["name"], c["type"]) for c in schema["columns"]]
    assert cols == [("time", "timestamp"), ("host", "string"), ("value", "double")], schema


def test_http_health_and_metrics(sluice):
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(sluice.http_url + path, timeout=30) as resp:
            assert resp.status == 200, path
    with urllib.request.urlopen(sluice.http_url + "/metrics", timeout=30) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    assert "sluice_" in text, text[:2000]


def _register_and_seed(client, table: str, base_us: int, n: int = 1000) -> None:
    client.register_table(cpu_schema(table))
    acks = client.write(table, cpu_rows(n, base_us), options=CALL)
    assert sum(a["rows"] for a in acks) == n


def _count(client, table: str) -> int:
    return client.query(f"SELECT count(*) AS n FROM {table}", options=CALL).column("n")[0].as_py()


def _assert_invalid_argument(err: BaseException, table: str, column: str) -> None:
    # gRPC INVALID_ARGUMENT surfaces in pyarrow as ArrowInvalid; other codes as FlightError.
    msg = str(err)
    assert isinstance(err, pa.ArrowInvalid), (
        f"expected InvalidArgument (pyarrow.ArrowInvalid), got {type(err).__name__}: {msg}")
    assert table in msg and column in msg, f"message should name {table!r} and {column!r}: {msg}"


@pytest.mark.parametrize("case", ["string_in_double", "extra_column"])
def test_bad_batch_is_rejected_and_earlier_rows_stay(client, case):
    table = f"bad_{case}"
    base_us = (int(time.time()) - 7200) * 1_000_000
    _register_and_seed(client, table, base_us)

    good = cpu_rows(10, base_us, start=5000)
    if case == "string_in_double":
        bad, column = good.set_column(2, "value", pa.array(["not-a-number"] * 10)), "value"
    else:
        bad, column = good.append_column("bogus_extra", pa.array([1] * 10, pa.int64())), "bogus_extra"

    with pytest.raises((pa.ArrowException, flight.FlightError)) as info:
        client.write(table, bad, options=CALL)
    _assert_invalid_argument(info.value, table, column)
    assert _count(client, table) == 1000


def test_rejected_batch_mid_stream_keeps_acked_batches(sluice, client):
    """Batch 1 is acked, batch 2 (null in the non-nullable time column) ends the call."""
    table = "bad_mid_stream"
    base_us = (int(time.time()) - 7200) * 1_000_000
    client.register_table(cpu_schema(table))

    first = cpu_rows(500, base_us).to_batches()[0]
    times = first.column(0).to_pylist()
    times[7] = None
    second = pa.RecordBatch.from_arrays(
        [pa.array(times, first.schema.field(0).type), first.column(1), first.column(2)],
        schema=first.schema)

    raw = flight.FlightClient(sluice.flight_location)
    writer, reader = raw.do_put(flight.FlightDescriptor.for_path(table), first.schema, CALL)
    writer.write_batch(first)
    ack = json.loads(reader.read().to_pybytes())  # blocks until batch 1 is durable
    assert ack["rows"] == 500

    with pytest.raises((pa.ArrowException, flight.FlightError)) as info:
        try:
            writer.write_batch(second)
            writer.done_writing()
            while reader.read() is not None:
                pass
        finally:
            writer.close()
    _assert_invalid_argument(info.value, table, "time")
    raw.close()
    assert _count(client, table) == 500
