"""An ack means durable: acked rows survive a restart, graceful or not (WAL replay)."""

from __future__ import annotations

import time

import pytest

from sluice_client import SluiceClient
from test_tour import CALL, cpu_rows, cpu_schema

N = 200_000


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_acked_rows_survive_restart(sluice_factory, tmp_path, how):
    table = "durable_cpu"
    base_us = (int(time.time()) - 1800) * 1_000_000
    data_dir = tmp_path / "data"

    first = sluice_factory(data_dir)
    with SluiceClient(first.flight_location) as client:
        client.register_table(cpu_schema(table))
        acks = client.write(table, cpu_rows(N, base_us), options=CALL)
    assert sum(a["rows"] for a in acks) == N
    last_seq = max(a["wal_seq"] for a in acks)

    if how == "sigterm":
        assert first.stop() == 0, first.log_tail()
    else:
        first.kill()

    second = sluice_factory(data_dir)
    with SluiceClient(second.flight_location) as client:
        assert client.get_table(table)["name"] == table
        t = client.query(f"SELECT count(*) AS n, sum(value) AS s FROM {table}", options=CALL)
        assert t.to_pylist() == [{"n": N, "s": N * (N - 1) / 4}], second.log_tail()

        # Writing goes on where it stopped: sequence numbers keep growing.
        more = client.write(table, cpu_rows(1000, base_us, start=N), options=CALL)
        assert min(a["wal_seq"] for a in more) > last_seq, (last_seq, more)
        t = client.query(f"SELECT count(*) AS n FROM {table}", options=CALL)
        assert t.column("n")[0].as_py() == N + 1000
