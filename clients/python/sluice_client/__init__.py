"""A small Arrow Flight client for Sluice.

Sluice takes Arrow record batches over Arrow Flight (``DoPut``), keeps a registry
of table schemas (``DoAction``) and answers SQL (``DoGet`` with the SQL text as
the ticket). This module wraps those calls in :class:`SluiceClient`; everything
else about the wire format is plain ``pyarrow.flight``.

Example::

    import pyarrow as pa
    from sluice_client import SluiceClient

    client = SluiceClient("grpc://127.0.0.1:50051")
    client.register_table({"name": "cpu", "columns": [
        {"name": "time", "type": "timestamp"},
        {"name": "host", "type": "string"},
        {"name": "value", "type": "double"}]})
    acks = client.write("cpu", table)           # one ack dict per batch, once durable
    print(client.query("SELECT count(*) FROM cpu"))
"""

from __future__ import annotations

import json
import threading
from typing import Any, Iterable, Iterator, List, Optional, Union

import pyarrow as pa
import pyarrow.flight as flight

__all__ = ["SluiceClient", "DEFAULT_LOCATION", "DEFAULT_MAX_CHUNKSIZE"]
__version__ = "0.1.0"

#: Where ``sluice serve`` listens for Arrow Flight by default.
DEFAULT_LOCATION = "grpc://127.0.0.1:50051"
#: Rows per record batch when :meth:`SluiceClient.write` has to split a table.
DEFAULT_MAX_CHUNKSIZE = 65536

BatchSource = Union[pa.Table, pa.RecordBatch, pa.RecordBatchReader, Iterable[pa.RecordBatch]]


class SluiceClient:
    """A connection to one Sluice server's Arrow Flight endpoint.

    :param location: a Flight location such as ``"grpc://127.0.0.1:50051"``.
    :param kwargs: passed to :class:`pyarrow.flight.FlightClient` (TLS options etc.).

    The client can be used as a context manager; :meth:`close` closes the channel.
    """

    def __init__(self, location: str = DEFAULT_LOCATION, **kwargs: Any) -> None:
        self.location = location
        self._client = flight.FlightClient(location, **kwargs)

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the underlying gRPC channel."""
        self._client.close()

    def __enter__(self) -> "SluiceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- schema registry (DoAction) ----------------------------------------------------------

    def _action(self, name: str, body: Optional[dict] = None) -> List[Any]:
        """Run a DoAction and decode every result body as JSON."""
        payload = json.dumps(body).encode() if body is not None else b""
        out = []
        for result in self._client.do_action(flight.Action(name, payload)):
            raw = result.body.to_pybytes()
            out.append(json.loads(raw) if raw else None)
        return out

    def register_table(self, schema: dict) -> dict:
        """Register (or evolve) a table from its schema JSON.

        ``schema`` is the registry form, e.g.
        ``{"name": "cpu", "columns": [{"name": "time", "type": "timestamp"}, ...]}``.
        Returns the server's answer, ``{"name": ..., "version": n}``. An incompatible
        change raises a :class:`pyarrow.flight.FlightError` (or ``pyarrow.ArrowInvalid``)
        saying why.
        """
        results = self._action("register_table", schema)
        if not results:
            raise flight.FlightServerError("register_table returned no result")
        return results[0]

    def get_table(self, name: str) -> dict:
        """Return the registered schema JSON of table ``name``."""
        results = self._action("get_table", {"name": name})
        if not results:
            raise flight.FlightServerError(f"get_table returned no result for {name!r}")
        return results[0]

    def list_tables(self) -> List[Any]:
        """Return the registered tables.

        The server may answer with one JSON array or one result per table; both come
        back as a flat list.
        """
        results = self._action("list_tables")
        if len(results) == 1 and isinstance(results[0], list):
            return results[0]
        return results

    # -- ingest (DoPut) ----------------------------------------------------------------------

    def write(
        self,
        table: str,
        data: BatchSource,
        max_chunksize: int = DEFAULT_MAX_CHUNKSIZE,
        options: Optional[flight.FlightCallOptions] = None,
    ) -> List[dict]:
        """Stream ``data`` into ``table`` with one DoPut call and wait for every ack.

        ``data`` is a :class:`pyarrow.Table` (split into batches of at most
        ``max_chunksize`` rows), a :class:`pyarrow.RecordBatch`, a
        :class:`pyarrow.RecordBatchReader` or any iterable of record batches sharing one
        schema.

        Sluice acknowledges each batch once it is durable with JSON
        ``{"request_id": n, "rows": n, "wal_seq": n}``; those dicts are returned in
        arrival order. Acks are read on a background thread while batches are written,
        so long streams cannot stall on a full ack channel.

        If the server rejects a batch, the call ends and the server's error is raised
        (``pyarrow.ArrowInvalid`` for ``InvalidArgument``, otherwise a
        :class:`pyarrow.flight.FlightError`); batches acknowledged before it stay
        written. The acks received before the failure are attached to the exception as
        ``exc.sluice_acks``.
        """
        schema, batches = _batches(data, max_chunksize)
        if schema is None:
            return []
        descriptor = flight.FlightDescriptor.for_path(table)
        writer, reader = self._client.do_put(descriptor, schema, options=options)

        acks: List[dict] = []
        read_error: List[BaseException] = []

        def drain() -> None:
            try:
                while True:
                    buf = reader.read()
                    if buf is None:
                        return
                    raw = buf.to_pybytes()
                    acks.append(json.loads(raw) if raw else {})
            except BaseException as exc:  # surfaced below, after close()
                read_error.append(exc)

        acker = threading.Thread(target=drain, name="sluice-acks", daemon=True)
        acker.start()

        write_error: Optional[BaseException] = None
        try:
            for batch in batches:
                writer.write_batch(batch)
        except BaseException as exc:
            write_error = exc
        try:
            writer.done_writing()
        except BaseException as exc:
            write_error = write_error or exc
        acker.join()

        close_error: Optional[BaseException] = None
        try:
            writer.close()
        except BaseException as exc:
            close_error = exc

        # The call's final status (from close) carries the server's message; a write
        # error is usually just "stream closed", so it only becomes the cause.
        err = close_error or (read_error[0] if read_error else None) or write_error
        if err is not None:
            try:
                err.sluice_acks = acks  # type: ignore[attr-defined]
            except Exception:
                pass
            if err is close_error and write_error is not None:
                raise err from write_error
            raise err
        return acks

    # -- query (DoGet) -----------------------------------------------------------------------

    def query(self, sql: str, options: Optional[flight.FlightCallOptions] = None) -> pa.Table:
        """Run ``sql`` and return the whole result as a :class:`pyarrow.Table`."""
        return self.query_reader(sql, options).read_all()

    def query_reader(
        self, sql: str, options: Optional[flight.FlightCallOptions] = None
    ) -> flight.FlightStreamReader:
        """Run ``sql`` and return the Flight stream reader, to consume batch by batch."""
        return self._client.do_get(flight.Ticket(sql.encode("utf-8")), options=options)


def _batches(data: BatchSource, max_chunksize: int):
    """Return ``(schema, iterator of batches)``; schema is None when there is nothing."""
    if isinstance(data, pa.Table):
        return data.schema, iter(data.to_batches(max_chunksize=max_chunksize))
    if isinstance(data, pa.RecordBatch):
        if data.num_rows > max_chunksize:
            return data.schema, iter(pa.Table.from_batches([data]).to_batches(max_chunksize))
        return data.schema, iter([data])
    if isinstance(data, pa.RecordBatchReader):
        return data.schema, iter(data)
    it: Iterator[pa.RecordBatch] = iter(data)
    try:
        first = next(it)
    except StopIteration:
        return None, iter(())

    def chain() -> Iterator[pa.RecordBatch]:
        yield first
        yield from it

    return first.schema, chain()
