#!/usr/bin/env bash
# End-to-end Flight ingest benchmark: builds the release binary, then compares Sluice
# (fsync on) with a discarding pyarrow Flight server on the same pre-generated rows.
#
#   bench/run.sh [--rows N] [--reps N] [--limit-only]    # args go to bench/flight_bench.py
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
exec "$VENV/bin/python" bench/flight_bench.py "$@"
