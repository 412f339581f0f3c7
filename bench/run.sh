#!/usr/bin/env bash
# Benchmarks: build the release binary, then
#   bench/run.sh [--rows N] [--reps N] [--limit-only]   Flight ingest into the embedded
#       default vs a discarding pyarrow Flight server (bench/flight_bench.py)
#   bench/run.sh pg [--rows N] [--reps N]               Flight into PostgreSQL end to end vs
#       psql \copy (binary) and pyarrow + ADBC adbc_ingest (bench/pg_bench.py)
#   bench/run.sh ch [--rows N] [--reps N]               Flight into ClickHouse end to end vs
#       curl --data-binary of the same rows as a Native file (bench/ch_bench.py)
#   bench/run.sh bomb [--rows N] [--reps N]             Flight ingest with and without hostile
#       queries running, and /healthz latency (bench/sql_bomb.py)
#   bench/run.sh tsdb [--rows N] [--reps N]             Flight into a TimescaleDB hypertable vs
#       a plain table and parallel psql \copy (bench/tsdb_bench.py)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}"
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
echo "==> cargo build --release -p sluice (target dir $CARGO_TARGET_DIR)" >&2
cargo build --release -p sluice

VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/pip" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import pyarrow.flight' >/dev/null 2>&1 \
    || "$VENV/bin/pip" install -q --disable-pip-version-check pyarrow

export SLUICE_BIN="${SLUICE_BIN:-$CARGO_TARGET_DIR/release/sluice}"
case "${1:-}" in
    tsdb)
        shift
        command -v psql >/dev/null 2>&1 || { echo "psql is needed (apt-get install postgresql-client)" >&2; exit 1; }
        exec "$VENV/bin/python" bench/tsdb_bench.py "$@"
        ;;
    pg)
        shift
        "$VENV/bin/python" -c 'import adbc_driver_postgresql' >/dev/null 2>&1 \
            || "$VENV/bin/pip" install -q --disable-pip-version-check adbc-driver-postgresql adbc-driver-manager
        command -v psql >/dev/null 2>&1 || { echo "psql is needed (apt-get install postgresql-client)" >&2; exit 1; }
        exec "$VENV/bin/python" bench/pg_bench.py "$@"
        ;;
    ch)
        shift
        "$VENV/bin/python" -c 'import chdb' >/dev/null 2>&1 \
            || "$VENV/bin/pip" install -q --disable-pip-version-check chdb-core
        exec "$VENV/bin/python" bench/ch_bench.py "$@"
        ;;
    bomb)
        shift
        exec "$VENV/bin/python" bench/sql_bomb.py "$@"
        ;;
    *)
        exec "$VENV/bin/python" bench/flight_bench.py "$@"
        ;;
esac
