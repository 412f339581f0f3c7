#!/usr/bin/env bash
# Benchmarks: build the release binary, then
#   bench/run.sh [flight] [--rows N] [--reps N] [--limit-only]   Flight ingest into the
#       embedded default vs a discarding pyarrow Flight server (bench/flight_bench.py)
#   bench/run.sh pg [--rows N] [--reps N] [--pool-size N]   Flight into PostgreSQL end to
#       end (default settings, and a tuned WAL) vs N parallel psql \copy (binary) streams,
#       N = sluice's postgres.pool_size (default 4), plus the 1-stream figure, and pyarrow +
#       ADBC adbc_ingest, N streams and 1 (bench/pg_bench.py)
#   bench/run.sh ch [--rows N] [--reps N]               Flight into ClickHouse end to end, with
#       clickhouse.compression lz4 (the default) and none, vs curl --data-binary of the same
#       rows as a Native file (bench/ch_bench.py)
#   bench/run.sh bomb [--rows N] [--reps N]             Flight ingest with and without hostile
#       queries running, and /healthz latency (bench/sql_bomb.py)
#   bench/run.sh tsdb [--rows N] [--reps N] [--pool-size N]   Flight into a TimescaleDB
#       hypertable vs a plain table and N parallel psql \copy, and 1 (bench/tsdb_bench.py)
#   bench/run.sh otlp [--rows N] [--reps N] [--parallel N] [--gzip]   log records over
#       OTLP/HTTP protobuf, OTLP/gRPC and REST NDJSON into the embedded default, beside
#       Flight DoPut of the same rows and a discarding endpoint (bench/otlp_bench.py)
#   bench/run.sh rollup [--points N] [--series N] [--reps N]   metric points into
#       PostgreSQL with rollups into ClickHouse metrics_1m on and off (bench/rollup_bench.py)
#   bench/run.sh all [--rows N] [--reps N]              every bench above in turn, stopping
#       at the first that fails
# A bench exits non-zero when its target is missed, when a row count read back differs from
# the rows sent, or when something it needs is missing; so does this script (set -e, and
# the bench's own exit status otherwise).
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
[ -x "$SLUICE_BIN" ] || { echo "no sluice binary at $SLUICE_BIN" >&2; exit 1; }

need_psql() {
    command -v psql >/dev/null 2>&1 || { echo "psql is needed (apt-get install postgresql-client)" >&2; exit 1; }
}

# Runs one bench; its exit status is this function's (and, under set -e, the script's).
bench() {
    local which="$1"
    shift
    case "$which" in
        flight)
            "$VENV/bin/python" bench/flight_bench.py "$@"
            ;;
        tsdb)
            need_psql
            "$VENV/bin/python" bench/tsdb_bench.py "$@"
            ;;
        pg)
            "$VENV/bin/python" -c 'import adbc_driver_postgresql' >/dev/null 2>&1 \
                || "$VENV/bin/pip" install -q --disable-pip-version-check adbc-driver-postgresql adbc-driver-manager
            need_psql
            "$VENV/bin/python" bench/pg_bench.py "$@"
            ;;
        ch)
            "$VENV/bin/python" -c 'import chdb' >/dev/null 2>&1 \
                || "$VENV/bin/pip" install -q --disable-pip-version-check chdb-core
            command -v curl >/dev/null 2>&1 || { echo "curl is needed (apt-get install curl)" >&2; exit 1; }
            "$VENV/bin/python" bench/ch_bench.py "$@"
            ;;
        bomb)
            "$VENV/bin/python" bench/sql_bomb.py "$@"
            ;;
        rollup)
            "$VENV/bin/python" -c 'import chdb' >/dev/null 2>&1 \
                || "$VENV/bin/pip" install -q --disable-pip-version-check chdb-core
            need_psql
            "$VENV/bin/python" bench/rollup_bench.py "$@"
            ;;
        otlp)
            "$VENV/bin/python" -c 'import grpc, opentelemetry.proto' >/dev/null 2>&1 \
                || "$VENV/bin/pip" install -q --disable-pip-version-check grpcio opentelemetry-proto
            "$VENV/bin/python" bench/otlp_bench.py "$@"
            ;;
    esac
}

case "${1:-}" in
    flight|pg|ch|bomb|tsdb|otlp|rollup)
        which="$1"
        shift
        bench "$which" "$@"
        ;;
    all)
        shift
        for which in flight pg ch bomb tsdb otlp rollup; do
            echo "==> bench $which" >&2
            if ! bench "$which" "$@"; then
                echo "==> bench $which FAILED; stopping" >&2
                exit 1
            fi
        done
        echo "==> every bench met its targets" >&2
        ;;
    ""|-*)
        bench flight "$@"
        ;;
    *)
        echo "unknown bench '$1' (flight, pg, ch, bomb, tsdb, otlp, rollup, all)" >&2
        exit 2
        ;;
esac
