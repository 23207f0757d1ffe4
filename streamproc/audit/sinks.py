"""Sinks: where the canonical event lines go (a file, a Kafka topic, memory).

Every sink receives the identical bytes (:class:`~streamproc.audit.AuditLog` builds each
event once), so the chain read back from the topic verifies exactly like the file.

* :class:`FileSink`: JSON lines, ``O_APPEND``, configurable fsync, resumes and verifies the
  chain on restart, one writer at a time through ``flock``, keeps the exported signed head
  in ``<file>.head`` and refuses a file that no longer reaches it.
* :class:`KafkaSink`: a producer-like object, key = stream id (one partition per stream).
* :class:`MemorySink`: tests, and a ring buffer for a status endpoint.

Also here: reading the heads exported to an audit topic (:func:`read_topic_heads`) and the
deliberate rotation of a file (:func:`rotate_file`).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from streamproc.audit.chain import Anchor, Head, is_head_record
from streamproc.audit.errors import AuditChainError, AuditSinkError, AuditUnavailable
from streamproc.audit.verify import BreakKind, _first_stream, read_lines, verify
from streamproc.errors import ConfigError


def head_file_for(path: str | os.PathLike[str]) -> Path:
    """Where a :class:`FileSink` keeps its exported head: ``<file>.head``, beside the log."""
    p = Path(path)
    return p.with_name(p.name + ".head")


class Fsync(enum.StrEnum):
    ALWAYS = "always"
    """fsync after every event (default: audit events are rare and must survive a crash)."""
    INTERVAL = "interval"
    """fsync at most every ``fsync_interval`` seconds, and on flush/close."""
    NEVER = "never"
    """Leave it to the OS (tests, or a file on a filesystem that is itself replicated)."""


class FileSink:
    """JSON lines in a file opened ``O_APPEND`` with mode 0600, one writer at a time.

    On open, the existing content is verified from the genesis (or from ``start``, for a
    file that continues a rotated one); a file that does not verify is refused with
    :class:`AuditChainError`, because appending to it would bury the break under valid
    events.  An exclusive ``flock`` keeps two processes from interleaving two chains.
    Each event is written with a single ``write(2)``, which ``O_APPEND`` makes atomic with
    respect to other appenders.

    The sink also keeps the chain's last exported signed head in ``<file>.head``
    (:meth:`export_head`, atomically replaced).  On open, a file that no longer reaches
    that head -- emptied, deleted or cut short -- is refused: a writer never silently
    restarts a chain.  ``wait`` is how long to wait for another writer's lock (short-lived
    tools share one file) before giving up.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: Fsync | str = Fsync.ALWAYS,
        fsync_interval: float = 1.0,
        start: Anchor | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: float = 0.0,
        known_head: Head | None = None,
    ) -> None:
        self.path = Path(path)
        self.head_path = head_file_for(self.path)
        self.known_head = known_head
        """A head exported elsewhere (the audit topic), used when ``<file>.head`` is gone."""
        self.start_path = self.path.with_name(self.path.name + ".start")
        try:
            self.fsync = Fsync(fsync)
        except ValueError:
            raise ConfigError(
                f"audit fsync must be one of {[f.value for f in Fsync]}, not {fsync!r}"
            ) from None
        self.fsync_interval = fsync_interval
        self.start = start
        self._clock = clock
        self._last_sync = clock()
        self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600
        )
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                busy = exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
                if busy and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(self._fd)
                if busy:
                    raise AuditSinkError(
                        f"audit file {self.path} is in use by another writer"
                    ) from None
                raise

    def head(self, stream: str, hmac_key: bytes | None) -> Anchor | None:
        """Verify the file and return its last event.

        Without ``start``, a file whose first event is not ``seq`` 0 (a sink added to a
        running chain, or a rotated file) is verified from its first event on: this check
        only guards against appending to a broken chain; ``streamproc audit verify``
        checks the start against the genesis or an ``--anchor``.
        """
        if self.start is None:
            rotated = self._read_start(stream, hmac_key)
            if rotated is not None:  # `streamproc audit rotate`: continue after the old file
                self.start = rotated.anchor
        exported = self._exported_head(stream, hmac_key)
        items = read_lines(self.path)
        if not items:
            if exported is not None and (self.start is None or exported.seq > self.start.seq):
                raise AuditChainError(
                    f"audit file {self.path} is empty, but its exported head "
                    f"({self._head_source()}) shows chain {exported.stream!r} reached seq "
                    f"{exported.seq}: refusing to start a new chain; the next event must be "
                    f"seq {exported.seq + 1}. Restore the file from a copy (to continue the "
                    "chain in a new file deliberately, use `streamproc audit rotate`)"
                )
            return self.start
        owner = _first_stream(items[0])
        if owner is not None and owner != stream:
            raise AuditChainError(
                f"audit file {self.path} holds the chain of another writer ({owner!r}), not "
                f"{stream!r}: a different --instance (or group id) on the same audit.file. "
                "Give each instance its own audit file, or run with the same --instance"
            )
        from_genesis = True
        if self.start is None:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                from_genesis = json.loads(items[0].data)["seq"] == 0  # type: ignore[arg-type]
        result = verify(
            items, hmac_key=hmac_key, anchor=self.start, stream=stream, from_genesis=from_genesis
        )
        if not result.ok:
            legacy = any(
                b.kind is BreakKind.MISSING_GENESIS and b.index == 0 and b.seq == 0
                for b in result.breaks
            )
            hint = (
                "\n(a file written before chains began with chain_started: verify it with "
                "the version that wrote it, move it aside and start a new file)"
                if legacy
                else ""
            )
            raise AuditChainError(
                f"audit file {self.path} does not verify; refusing to append "
                f"(run: streamproc audit verify {self.path})\n{result.report()}{hint}"
            )
        if exported is not None:
            reach = verify(
                items,
                anchor=self.start,
                stream=stream,
                from_genesis=from_genesis,
                expect_head=exported,
            )
            if not reach.ok:
                raise AuditChainError(
                    f"audit file {self.path} ends at seq {result.head_seq}, but its exported "
                    f"head ({self._head_source()}) shows the chain reached seq {exported.seq}: "
                    f"events were removed; refusing to append (the next event must be seq "
                    f"{exported.seq + 1}). Restore the file from a copy"
                )
        return result.anchor

    def _read_start(self, stream: str, hmac_key: bytes | None) -> Head | None:
        """The head ``<file>.start`` says this file continues (written by ``audit rotate``)."""
        try:
            h = Head.from_json(self.start_path.read_bytes().strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            raise AuditChainError(f"{self.start_path} is not an exported audit head") from None
        if hmac_key is not None and not h.signed_by(hmac_key):
            raise AuditChainError(f"{self.start_path} is not signed by the audit key")
        if h.stream != stream:
            raise AuditChainError(
                f"{self.start_path} continues the chain of another writer ({h.stream!r}), "
                f"not {stream!r}"
            )
        return h

    def _exported_head(self, stream: str, hmac_key: bytes | None) -> Head | None:
        try:
            data = self.head_path.read_bytes()
        except FileNotFoundError:
            if self.start_path.exists():  # rotated deliberately: the .start head rules
                return None
            h = self.known_head
            if h is not None and hmac_key is not None and not h.signed_by(hmac_key):
                raise AuditChainError(
                    f"the exported head of {stream!r} on the audit topic is not signed by "
                    "the audit key: refusing to trust it or the file"
                ) from None
            return h if h is not None and h.stream == stream else None
        except OSError as exc:
            raise AuditChainError(f"cannot read {self.head_path} ({exc.strerror})") from None
        try:
            h = Head.from_json(data.strip())
        except ValueError:
            raise AuditChainError(f"{self.head_path} is not an exported audit head") from None
        if hmac_key is not None and not h.signed_by(hmac_key):
            raise AuditChainError(
                f"{self.head_path} is not signed by the audit key: refusing to trust the file"
            )
        if h.stream != stream:
            raise AuditChainError(
                f"audit file {self.path} holds the chain of another writer ({h.stream!r}), "
                f"not {stream!r} (per {self.head_path.name}): a different --instance (or "
                "group id) on the same audit.file. Give each instance its own audit file, "
                "or run with the same --instance"
            )
        return h

    def _head_source(self) -> str:
        return str(self.head_path) if self.head_path.exists() else "the audit topic"

    def export_head(self, head: Head) -> None:
        """Atomically replace ``<file>.head`` (write, fsync, rename) with ``head``.

        The log is synced first, so after a crash the head on disk never claims events the
        log lost (which would make the next writer refuse a file that was not tampered with).
        """
        self._sync()
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, head.to_json() + b"\n")
                if self.fsync is not Fsync.NEVER:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.head_path)
        except OSError as exc:
            raise AuditSinkError(
                f"cannot write the audit head {self.head_path}: {exc.strerror}"
            ) from None

    def write(self, line: bytes) -> None:
        try:
            n = os.write(self._fd, line)
        except OSError as exc:
            raise AuditSinkError(
                f"cannot append to audit file {self.path}: {exc.strerror}"
            ) from None
        if n != len(line):
            raise AuditSinkError(
                f"short write to audit file {self.path} ({n} of {len(line)} bytes)"
            )
        self._dirty = True
        now = self._clock()
        if self.fsync is Fsync.ALWAYS or (
            self.fsync is Fsync.INTERVAL and now - self._last_sync >= self.fsync_interval
        ):
            self._sync(now)

    def _sync(self, now: float | None = None) -> None:
        if self._dirty and self.fsync is not Fsync.NEVER:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise AuditSinkError(
                    f"cannot fsync audit file {self.path}: {exc.strerror}"
                ) from None
        self._dirty = False
        self._last_sync = self._clock() if now is None else now

    def flush(self) -> None:
        self._sync()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self._sync()
            finally:
                os.close(self._fd)  # releases the flock
                self._fd = -1


class ProducerLike(Protocol):
    def produce(self, topic: str, key: bytes | None = ..., value: bytes | None = ...) -> Any: ...

    def flush(self) -> Any: ...


class KafkaSink:
    """Events to a Kafka audit topic, record key = stream id.

    Give it its own idempotent, *non-transactional* producer (``acks=all``,
    ``enable.idempotence=true``): an aborted processing transaction must not take audit
    events with it.  With ``flush_each`` (default) every event is flushed before
    :meth:`AuditLog.emit` returns, so "audited before returned" holds for Kafka too.
    The sink cannot read back, so on restart the chain is resumed from another sink
    (a :class:`FileSink`) or an explicit ``anchor`` given to :class:`AuditLog`.
    """

    def __init__(self, producer: ProducerLike, topic: str, *, flush_each: bool = True) -> None:
        self.producer = producer
        self.topic = topic
        self.flush_each = flush_each
        self._key: bytes | None = None

    def head(self, stream: str, hmac_key: bytes | None) -> Anchor | None:
        self._key = stream.encode()
        return None

    def export_head(self, head: Head) -> None:
        """A head record on the topic, keyed like the stream's events (same partition)."""
        self.write(head.to_json())

    def write(self, line: bytes) -> None:
        try:
            self.producer.produce(self.topic, key=self._key, value=line.rstrip(b"\n"))
        except Exception as exc:  # confluent_kafka raises BufferError/KafkaException
            raise AuditSinkError(
                f"cannot produce to audit topic {self.topic!r}: {type(exc).__name__}"
            ) from None
        if self.flush_each:
            self.flush()

    def flush(self) -> None:
        left = self.producer.flush()
        if isinstance(left, int) and left > 0:
            raise AuditSinkError(f"{left} audit event(s) not delivered to topic {self.topic!r}")

    def close(self) -> None:
        self.flush()


class MemorySink:
    """Keeps lines in memory (tests, and a ring buffer for a status endpoint)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.heads: list[Head] = []

    def export_head(self, head: Head) -> None:
        self.heads.append(head)

    def head(self, stream: str, hmac_key: bytes | None) -> Anchor | None:
        if not self.lines:
            return None
        r = verify(self.lines, hmac_key=hmac_key, stream=stream)
        if not r.ok:
            raise AuditChainError(r.report())
        return r.anchor

    def write(self, line: bytes) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.lines]


class _AuditProducer:
    """A dedicated idempotent, non-transactional producer for :class:`KafkaSink`.

    Adds what ``KafkaSink`` cannot see through a bare ``Producer``: delivery failures
    (reported to a callback, not by ``flush()``) and a bounded ``flush`` (a broker outage
    must fail the audit write, not hang the caller).
    """

    def __init__(self, producer: Any, timeout: float = 30.0) -> None:
        self._p = producer
        self._timeout = timeout
        self._errors: list[str] = []

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None) -> None:
        self._p.produce(topic, key=key, value=value, on_delivery=self._done)

    def _done(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err.name()))

    def flush(self) -> int:
        left = int(self._p.flush(self._timeout))
        if self._errors:
            first, self._errors = self._errors[0], []
            raise AuditSinkError(f"audit event not delivered ({first})")
        return left


def read_topic_heads(
    consumer_conf: Mapping[str, Any],
    topic: str,
    *,
    timeout: float = 30.0,
    consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Head]:
    """The latest exported :class:`Head` of every stream on an audit topic.

    Reads every partition from its low to its high watermark (no consumer group, nothing
    committed).  A topic that does not exist yet has no heads.  Raises
    :class:`AuditUnavailable` when the topic cannot be read to its end within
    ``timeout``: a writer that cannot learn how far its chain had got must not start.
    """
    from confluent_kafka import KafkaError, TopicPartition

    if consumer_factory is None:
        from confluent_kafka import Consumer

        consumer_factory = Consumer
    c = consumer_factory(
        {
            **consumer_conf,
            "group.id": f"streamproc-audit-heads-{os.urandom(4).hex()}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
        }
    )
    heads: dict[str, Head] = {}
    deadline = time.monotonic() + timeout
    try:
        md = c.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or (
            md.error is not None and md.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
        ):
            return heads
        if md.error is not None:
            raise AuditUnavailable(f"cannot read audit topic {topic!r} ({md.error.name()})")
        todo: dict[int, int] = {}
        assign = []
        for p in md.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                todo[p] = high
                assign.append(TopicPartition(topic, p, low))
        c.assign(assign)
        while todo:
            if time.monotonic() > deadline:
                raise AuditUnavailable(
                    f"cannot read audit topic {topic!r} to its end within {timeout:.0f} s"
                )
            for m in c.consume(1000, 0.5):
                if m.error() is not None:
                    continue
                v, k = m.value(), m.key()
                if v is not None and is_head_record(v):
                    with contextlib.suppress(ValueError):
                        h = Head.from_json(v)
                        if k is not None and h.stream == k.decode("utf-8", "replace"):
                            old = heads.get(h.stream)
                            if old is None or h.seq >= old.seq:
                                heads[h.stream] = h
                part, off = m.partition(), m.offset()
                if part is not None and off is not None and off + 1 >= todo.get(part, 0):
                    todo.pop(part, None)
    except AuditUnavailable:
        raise
    except Exception as exc:  # KafkaException and friends: name the class only
        raise AuditUnavailable(
            f"cannot read audit topic {topic!r} ({type(exc).__name__})"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            c.close()
    return heads


def rotate_file(
    path: str | os.PathLike[str],
    *,
    hmac_key: bytes | None = None,
    new_hmac_key: bytes | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[Path, Head]:
    """Move a verified audit file aside so its chain continues in a fresh file.

    The deliberate counterpart of the writers' refusal to restart a chain: the file (and
    its ``.head``/``.start``) become ``<stem>.<UTC time><suffix>``, and ``<file>.start``
    holds the signed head the next writer continues from (seq + 1, same stream).  Holds
    the file's lock throughout, so it fails while a writer runs.  ``new_hmac_key`` signs
    the start head for a rotated audit key (the old file keeps verifying with the old one).
    Returns the moved file and the start head.
    """
    p = Path(path)
    items = read_lines(p) if p.exists() else []
    stream = _first_stream(items[0]) if items else None
    if stream is None:
        raise AuditChainError(f"{p} holds no events: nothing to rotate")
    sink = FileSink(p, fsync=Fsync.ALWAYS)
    try:
        anchor = sink.head(stream, hmac_key)  # verifies, also against its exported head
        if anchor is None:
            raise AuditChainError(f"{p} holds no events: nothing to rotate")
        head = Head.make(stream, anchor.seq, anchor.hash, new_hmac_key or hmac_key)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock()))
        old = p.with_name(f"{p.stem}.{stamp}{p.suffix}")
        if old.exists():
            raise AuditChainError(f"{old} already exists; try again in a second")
        for src, dst in (
            (sink.head_path, head_file_for(old)),
            (sink.start_path, old.with_name(old.name + ".start")),
        ):
            if src.exists():
                os.replace(src, dst)
        os.replace(p, old)
        tmp = sink.start_path.with_name(sink.start_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, head.to_json() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, sink.start_path)
    finally:
        sink.close()
    return old, head
