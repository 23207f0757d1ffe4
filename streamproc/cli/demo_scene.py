"""What the demo's Kafka scenes (consent, erasure) share, written once.

Each scene runs the real processor as a child process (``streamproc run``, its JSON log in
a file the scene reads to know when the worker applied a table update), produces orders
of two chosen customers, and matches every output to its source record through the
provenance reference (the demo holds the pseudonym master), so that a scene does not
depend on which fields a policy keeps.  The scenes differ only in what they do between
two phases of orders and in what they tabulate.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

TP = tuple[str, int, int]
"""A source record: (topic, partition, offset)."""


class SceneProcess:
    """``streamproc run --config CONFIG`` as a child process, its output in ``log_path``."""

    def __init__(self, scene: str, config_path: Path, log_path: Path) -> None:
        self.scene = scene
        self.log_path = log_path
        with open(log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamproc.cli.main", "run", "--config", str(config_path)],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def wait(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        """Until ``done()``; a processor that exits or a timeout is an error naming the log."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the {self.scene} scene's processor exited with {self.proc.returncode}; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.scene} scene: timed out waiting for {what}; see {self.log_path}")
            time.sleep(0.05)

    def log_events(self, message: str) -> list[dict[str, Any]]:
        """The processor's JSON log records whose ``message`` is ``message`` (so far)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and e.get("message") == message:
                out.append(e)
        return out

    def stop(self) -> None:
        """SIGTERM (the worker drains and commits), then SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def produce_orders(
    scene: str,
    producer: Any,
    sealer: Any,
    gen: Any,
    source: str,
    subjects: tuple[str, str],
    n: int,
    on_sent: Callable[[TP, str, dict[str, Any]], None],
) -> None:
    """``n`` orders alternating between ``subjects`` (keyed by the subject), each reported
    to ``on_sent(source record, subject, order)`` once acknowledged."""
    errors: list[str] = []
    for i in range(n):
        subject = subjects[i % 2]
        rec = gen.order()
        rec["customer_id"] = subject

        def done(err: Any, msg: Any, subject: str = subject, rec: dict[str, Any] = rec) -> None:
            if err is not None:
                errors.append(err.name())
            else:
                on_sent((msg.topic(), msg.partition(), msg.offset()), subject, rec)

        producer.produce(source, sealer.seal(rec), subject.encode(), on_delivery=done)
        producer.poll(0)
    if producer.flush(30) != 0 or errors:
        raise RuntimeError(f"{scene} scene: orders not acknowledged ({', '.join(errors) or 'timeout'})")


def outputs(consumer: Any, dests: Mapping[str, str], prov_keys: Mapping[str, bytes], source: str) -> list[tuple[str, TP, Any]]:
    """The outputs polled now, as (audience, source record, message): the source record
    from the output's provenance reference under its audience's key."""
    from streamproc.crypto.provenance import from_headers, resolve_reference

    out = []
    for msg in consumer.consume(100, 0.2):
        topic = msg.topic()
        if msg.error() or topic not in dests or msg.value() is None:
            continue
        audience = dests[topic]
        headers = [(str(h[0]), h[1] if isinstance(h[1], bytes) else b"") for h in msg.headers() or []]
        prov = from_headers(headers)
        assert prov.ref is not None
        out.append((audience, resolve_reference(prov_keys[audience], prov.ref, [source]), msg))
    return out


__all__ = ["TP", "SceneProcess", "outputs", "produce_orders"]
