"""Writes the seed corpus of the put_decode fuzz target: valid DoPut streams of several
shapes, framed as the target reads them ([u16 header len][u16 body len][header][body]).

    .venv/bin/python flight-schema/fuzz/seed.py
"""
import datetime as dt
import pathlib
import struct

import pyarrow as pa

OUT = pathlib.Path(__file__).parent / "corpus" / "put_decode"


def frame(messages):
    out = b""
    for header, body in messages:
        out += struct.pack("<HH", len(header), len(body)) + header + body
    return out


def stream(batch):
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    reader = pa.ipc.MessageReader.open_stream(sink.getvalue())
    msgs = []
    for m in reader:
        msgs.append((m.metadata.to_pybytes(), m.body.to_pybytes() if m.body is not None else b""))
    return msgs


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    t = pa.array([dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 2), None], pa.timestamp("us", tz="UTC"))
    shapes = {
        "ints": pa.record_batch({"t": t, "n": pa.array([1, None, 3], pa.int64())}),
        "strings": pa.record_batch({"t": t, "s": pa.array(["a", None, "ccc"])}),
        "dict": pa.record_batch({"t": t, "d": pa.array(["x", "y", "x"]).dictionary_encode()}),
        "lists": pa.record_batch({"t": t, "l": pa.array([[1.5], [], None], pa.list_(pa.float64()))}),
        "map": pa.record_batch({"t": t, "m": pa.array([[("k", "v")], [], None], pa.map_(pa.string(), pa.string()))}),
        "struct": pa.record_batch({"t": t, "st": pa.array([{"a": 1}, None, {"a": 2}])}),
        "bools": pa.record_batch({"t": t, "b": pa.array([True, False, None])}),
        "decimal": pa.record_batch({"t": t, "x": pa.array([1, 2, None], pa.decimal128(10, 2))}),
        "view": pa.record_batch({"t": t, "v": pa.array(["p", "q", None], pa.string_view())}),
    }
    for name, batch in shapes.items():
        (OUT / name).write_bytes(frame(stream(batch)))


if __name__ == "__main__":
    main()
