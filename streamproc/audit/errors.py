"""The audit package's exceptions: every failure to write, read or open a trail.

Kept in one module below the others so that events, the chain, the verifier and the
sinks can all raise them without importing each other.
"""

from __future__ import annotations

from streamproc.errors import StreamprocError


class AuditError(StreamprocError):
    """Base class for audit failures."""


class AuditAttributeError(AuditError, ValueError):
    """An event attribute is not allowed.  Names the key, never echoes the value."""


class AuditChainError(AuditError):
    """An existing audit file does not verify; appending to it would hide the break."""


class AuditSinkError(AuditError):
    """A sink could not durably accept an event.

    ``accepted`` (set by :meth:`AuditLog.emit`) is how many sinks did take it: when it is
    non-zero the event is part of the chain and must not be emitted again.
    """

    accepted: int = 0


class AuditUnavailable(AuditError):
    """No audit trail is configured, or it cannot be opened: the caller must not proceed."""
