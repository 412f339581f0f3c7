"""pytest fixtures: start the real ``sluice`` binary on loopback port 0.

The binary comes from ``$SLUICE_BIN``, else ``$CARGO_TARGET_DIR`` (default
``~/.cache/sluice-target``) ``/debug/sluice``, else ``.../release/sluice``. It runs with a
fresh temporary data directory, prints ``SLUICE_READY grpc=... http=...`` on stdout once
listening, and is stopped with SIGTERM (SIGKILL after 15 s) when the session ends.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "clients" / "python"))

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def sluice_bin() -> Path:
    """Where the sluice binary under test is."""
    if os.environ.get("SLUICE_BIN"):
        return Path(os.environ["SLUICE_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or Path.home() / ".cache" / "sluice-target")
    for profile in ("debug", "release"):
        if (target / profile / "sluice").exists():
            return target / profile / "sluice"
    return target / "debug" / "sluice"


@dataclass
class SluiceServer:
    """A running sluice process and its addresses."""

    proc: subprocess.Popen
    grpc_addr: str
    http_addr: str
    data_dir: Path
    log_path: Path

    @property
    def flight_location(self) -> str:
        return f"grpc://{self.grpc_addr}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_addr}"

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> int:
        """SIGTERM, wait up to 15 s (then SIGKILL and fail); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"sluice did not exit within {STOP_TIMEOUT}s of SIGTERM; "
                                     f"log tail:\n{self.log_tail()}")
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown work at all."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_sluice(data_dir: Path, log_path: Path, **env_extra: str) -> SluiceServer:
    """Start ``sluice serve`` on port 0 with ``data_dir``; return once it printed SLUICE_READY.

    stderr (and stdout, prefixed) go to ``log_path``. ``SLUICE__WAL__FSYNC`` defaults to
    false (tests survive process crashes, not power loss); ``env_extra`` overrides.
    """
    binary = sluice_bin()
    if not binary.exists():
        pytest.fail(f"sluice binary not found at {binary}; build it with "
                    "`cargo build -p sluice` or set SLUICE_BIN")
    env = dict(os.environ,
               SLUICE__SERVER__GRPC_ADDR="127.0.0.1:0",
               SLUICE__SERVER__HTTP_ADDR="127.0.0.1:0",
               SLUICE__SERVER__DATA_DIR=str(data_dir))
    env.setdefault("SLUICE__WAL__FSYNC", "false")
    env.update(env_extra)
    log = open(log_path, "ab")
    proc = subprocess.Popen([str(binary), "serve"], env=env, stdout=subprocess.PIPE, stderr=log)
    log.close()  # the child has its own descriptor

    # Keep reading stdout for the process' whole life so the pipe never fills up.
    lines: "queue.Queue[bytes]" = queue.Queue()

    def pump():
        with open(log_path, "ab") as out:
            for line in proc.stdout:
                out.write(b"[stdout] " + line)
                out.flush()
                lines.put(line)
        lines.put(b"")

    threading.Thread(target=pump, name="sluice-stdout", daemon=True).start()

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(left, 0.01)).decode(errors="replace")
        except queue.Empty:
            line = None
        if line and line.startswith("SLUICE_READY "):
            addrs = dict(kv.split("=", 1) for kv in line.split()[1:])
            return SluiceServer(proc, addrs["grpc"], addrs["http"], data_dir, log_path)
        if line == "" or left <= 0:
            proc.kill()
            proc.wait()
            tail = log_path.read_bytes()[-4000:].decode(errors="replace")
            pytest.fail(f"sluice did not print SLUICE_READY within {READY_TIMEOUT}s "
                        f"(exit code {proc.returncode}); log tail:\n{tail}")


@pytest.fixture(scope="session")
def sluice(tmp_path_factory):
    """One sluice for the whole session, in a fresh data directory."""
    base = tmp_path_factory.mktemp("sluice")
    server = start_sluice(base / "data", base / "sluice.log")
    yield server
    code = server.stop()
    # A crash during the session shows up here rather than as a mystery elsewhere.
    assert code == 0, f"sluice exited with {code} after SIGTERM; log tail:\n{server.log_tail()}"


@pytest.fixture
def sluice_factory(tmp_path):
    """Start extra servers (e.g. to restart on the same data dir); all stopped at the end."""
    started = []

    def start(data_dir: Path = tmp_path / "data", **env_extra: str) -> SluiceServer:
        log_path = tmp_path / f"sluice-{len(started)}.log"
        server = start_sluice(data_dir, log_path, **env_extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def client(sluice):
    """A :class:`sluice_client.SluiceClient` connected to the session's server."""
    from sluice_client import SluiceClient

    with SluiceClient(sluice.flight_location) as c:
        yield c
