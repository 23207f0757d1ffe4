"""The consent check of :meth:`Pipeline.process <streamproc.pipeline.core.Pipeline.process>`.

For every record and every destination whose audience has a purpose with a legal basis,
:class:`ConsentGate` says whether the record may flow there or why it is withheld
(:func:`streamproc.policy.consent.decide`).  The subject is the audience's subject field
(:func:`~streamproc.pipeline.plan.subject_of`, as ``date_shift`` finds it); its token in
the consent domain (:meth:`PseudonymKeys.consent_key
<streamproc.crypto.pseudonym.PseudonymKeys.consent_key>`) keys the table.  A record without
a subject (no subject field in its schema, or a null value) cannot be evaluated and is
withheld from every gated audience (``no_subject``): fail closed, whatever the basis.

The table is anything with ``get(key)`` and ``versions`` (a
:class:`~streamproc.policy.consent.ConsentState`, kept current by the runtime's
consent-topic consumer); the gate only reads it, so the pipeline stays free of Kafka.
Lookups see the table as it is at that moment: a withdrawal applied by the consumer is
honoured by every record evaluated afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from streamproc.crypto.pseudonym import PseudonymKeys, make_tokenizer
from streamproc.policy.consent import NO_SUBJECT, ConsentRecord, decide, latest, record_key
from streamproc.policy.model import Audience, Policy, Purpose

DEFAULT_DOMAIN = "consent"


class ConsentLookup(Protocol):
    """What the gate reads: the current record of a key, and the key versions present."""

    def get(self, key: bytes) -> ConsentRecord | None: ...

    @property
    def versions(self) -> frozenset[int]: ...


class ConsentGate:
    """Decides, per (audience, subject), whether a record may flow (see the module doc)."""

    def __init__(self, policy: Policy, table: ConsentLookup, keys: PseudonymKeys, domain: str = DEFAULT_DOMAIN) -> None:
        self.table = table
        self.keys = keys
        self.domain = domain
        #: audience -> its purpose (only audiences that have one with a basis are gated).
        self.purposes: Mapping[str, Purpose] = {
            a: p for a in policy.audiences if (p := policy.basis_of(a)) is not None
        }
        self._tokenizers: dict[int, Callable[[bytes], str]] = {}
        self._versions: frozenset[int] = frozenset()
        self._ordered: list[int] = []

    def gated(self, audience: Audience | str) -> Purpose | None:
        """The purpose an audience's records are evaluated under (``None``: not gated)."""
        return self.purposes.get(audience if isinstance(audience, str) else audience.name)

    def _tokenizer(self, version: int) -> Callable[[bytes], str]:
        tok = self._tokenizers.get(version)
        if tok is None:
            v, key = self.keys.consent_key(self.domain, version)
            tok = self._tokenizers[version] = make_tokenizer(v, key)
        return tok

    def tokens(self, subject: bytes) -> list[tuple[int, str]]:
        """The subject's consent token under every master version present in the table."""
        versions = self.table.versions
        if versions is not self._versions:  # a new version appeared (rare): re-sort once
            self._versions, self._ordered = versions, sorted(versions)
        return [(v, self._tokenizer(v)(subject)) for v in self._ordered]

    def record(self, tokens: list[tuple[int, str]], purpose: str) -> ConsentRecord | None:
        if len(tokens) == 1:  # one master version in the table: the common case
            return self.table.get(record_key(tokens[0][1], purpose))
        return latest((v, self.table.get(record_key(t, purpose))) for v, t in tokens)

    def reason(self, purpose: Purpose, subject: bytes | None, tokens: list[tuple[int, str]] | None = None) -> str | None:
        """``None`` (may flow) or the withheld reason for one record and one purpose."""
        if subject is None:
            return NO_SUBJECT
        if tokens is None:
            tokens = self.tokens(subject)
        return decide(purpose.opt_in, self.record(tokens, purpose.name))


__all__ = ["DEFAULT_DOMAIN", "ConsentGate", "ConsentLookup"]
