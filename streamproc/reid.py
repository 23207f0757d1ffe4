"""Re-identification: reversing ``encrypt_deterministic`` fields, for one audience, audited.

Why an exported *audience key* and not the master
-------------------------------------------------
``encrypt_deterministic`` encrypts with AES-SIV under ``HKDF(master, audience)``.  The
pseudonym master derives every token, date-shift and deterministic key of every
audience, so it never leaves the processor's KMS.  An operator who may read the master
exports the one derived key an audience is entitled to (:func:`export_audience_key`)
into a small self-describing file; whoever holds that file can reverse that audience's
values, for that master version, and nothing else -- not tokens (one-way), not another
audience's ciphertexts (different key), not values of another domain (the domain is the
SIV associated data).

Why every call is audited first
-------------------------------
:meth:`Reidentifier.reidentify` writes an audit event (actor, audience, domain, field,
subject reference, reason, policy version, outcome) and only then returns the value.  If
the audit log cannot be written the value is not returned: re-identification fails
closed.  Failed attempts are audited too (``outcome`` = ``denied`` for requests refused
before any decryption, ``failed`` when decryption fails), and raise
:class:`~streamproc.crypto.pseudonym.ReidentificationError` without echoing the input.

Why the policy is not optional
------------------------------
The key file alone would reverse any domain of its audience.  A :class:`Reidentifier`
therefore needs the :class:`~streamproc.policy.model.Policy` the data was produced under,
and denies a domain that no ``encrypt_deterministic`` rule of the audience produces
(:func:`reidentifiable_domains`).  The command-line tools take it, the KMS identity of the
actor and the audit trail from the processor config (:func:`export_audience_key_audited`,
:func:`audit_refusal`, :func:`streamproc.audit.open_tool_log`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from streamproc.audit import (
    ATTRIBUTE_RULES,
    AuditAttributeError,
    AuditError,
    AuditLog,
    EventType,
    check_actor,
)
from streamproc.crypto import erasure
from streamproc.crypto.pseudonym import PseudonymKeys, ReidentificationError, siv_decrypt
from streamproc.errors import ConfigError, StreamprocError
from streamproc.policy.model import Policy

AUDIENCE_KEY_FORMAT = "streamproc-audience-key/1"
_AUDIENCE_RE = re.compile(r"[A-Za-z0-9_-]{1,100}")
_CIPHERTEXT_RE = re.compile(r"de(\d{1,9})_[A-Za-z0-9_-]+")

#: ``subject_keys(audience, key id) -> key`` for erasable (``ds1_``) values: the subject
#: key from the subject-key topic (:meth:`KeyDirectory.resolve
#: <streamproc.crypto.erasure.KeyDirectory.resolve>`).  Raises
#: :class:`~streamproc.crypto.erasure.SubjectForgotten` for a shredded key.
SubjectKeys = Callable[[str, str], bytes]


class SubjectForgottenError(ReidentificationError):
    """The value's subject was forgotten (``streamproc forget``): its key is shredded and
    the value cannot be re-identified by anyone.  ``reason`` is the audited error class."""

    reason = "subject_forgotten"
SIV_KEY_BYTES = 64


@dataclasses.dataclass(frozen=True)
class AudienceKey:
    """The AES-SIV key of one audience under one pseudonym-master version."""

    audience: str
    master_version: int
    key: bytes = dataclasses.field(repr=False)
    secret_id: str | None = None
    """Name of the master secret it was derived from (informational)."""

    def __post_init__(self) -> None:
        if not _AUDIENCE_RE.fullmatch(self.audience):
            raise ConfigError("audience key: audience names are letters, digits, '-' and '_'")
        if (
            isinstance(self.master_version, bool)
            or not isinstance(self.master_version, int)
            or self.master_version < 1
        ):
            raise ConfigError("audience key: master_version must be a positive integer")
        if len(self.key) != SIV_KEY_BYTES:
            raise ConfigError(f"audience key: key must be {SIV_KEY_BYTES} bytes (AES-SIV-256)")

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": AUDIENCE_KEY_FORMAT,
            "audience": self.audience,
            "master_version": self.master_version,
            "key": base64.b64encode(self.key).decode(),
        }
        if self.secret_id is not None:
            doc["secret_id"] = self.secret_id
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<audience key>") -> AudienceKey:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            raise ConfigError(f"{source}: not a JSON audience key file") from None
        if not isinstance(doc, dict) or doc.get("format") != AUDIENCE_KEY_FORMAT:
            raise ConfigError(f"{source}: not a {AUDIENCE_KEY_FORMAT} file")
        try:
            key = base64.b64decode(str(doc["key"]), validate=True)
            return cls(str(doc["audience"]), doc["master_version"], key, doc.get("secret_id"))
        except KeyError as exc:
            raise ConfigError(f"{source}: missing field {exc.args[0]!r}") from None
        except (binascii.Error, ValueError):
            raise ConfigError(f"{source}: field 'key' is not base64") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AudienceKey:
        """Read a key file, refusing one that group or others can read (like the keyring)."""
        p = Path(path)
        try:
            st = p.stat()
            data = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read audience key file {p} ({exc.strerror})") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"audience key file {p} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 or stricter"
            )
        return cls.from_bytes(data, str(p))


def export_audience_key(keys: PseudonymKeys, audience: str, version: int | None = None) -> bytes:
    """Serialize the re-identification key of ``audience`` (primary master version by default).

    The caller needs read access to the pseudonym master; the result grants exactly the
    power to reverse this audience's ``encrypt_deterministic`` values of that version.
    Write it with :func:`write_audience_key` (mode 0600).
    """
    v, key = keys.siv_key(audience, version)
    return AudienceKey(audience, v, key, keys.secret_id).to_bytes()


def write_audience_key(path: str | os.PathLike[str], blob: bytes) -> None:
    """Create the key file with mode 0600; refuses to overwrite an existing file."""
    AudienceKey.from_bytes(blob)  # never write something we could not read back
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a key file") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())


def _digest(value: str) -> str:
    """A short digest of the ciphertext, so an auditor holding a value can tell whether it
    was revealed, without the audit log containing the value itself."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def reidentifiable_domains(policy: Policy, audience: str) -> set[str] | None:
    """The domains in which ``audience``'s values may be re-identified, or ``None`` when the
    audience is not in the policy.

    A domain is re-identifiable when one of the audience's ``encrypt_deterministic`` rules
    produces it: the rule's explicit ``domain``, else its tag (the default domain).  A
    domain set only by a schema's ``streamproc.domain`` hint is not visible in the policy
    and is therefore refused: name it in the rule (``domain:``) to make it reversible.
    """
    aud = policy.audiences.get(audience)
    if aud is None:
        return None
    return {
        str(r.params.get("domain") or r.tag) for r in aud.rules if r.op == "encrypt_deterministic"
    }


def reidentifiable_fields(
    policy: Policy, audience: str, schemas: Iterable[Any]
) -> dict[str, set[str]]:
    """Field path -> the domains in which ``audience``'s plan encrypts it deterministically.

    ``schemas`` are :class:`~streamproc.schema.registry.RegisteredSchema` objects (the
    processor's source schemas).  A field counts when the audience's rule for its tags
    (:meth:`~streamproc.policy.model.Audience.rule_for`, over the tags the linter sees,
    container tags included) is ``encrypt_deterministic``; its domain is the rule's
    ``domain``, else the field's ``streamproc.domain`` hint, else the tag -- as the plan
    compiler derives it.
    """
    from streamproc.schema.annotations import DOMAIN_HINT, leaves
    from streamproc.schema.avro import Record

    aud = policy.audiences.get(audience)
    out: dict[str, set[str]] = {}
    if aud is None:
        return out
    for rs in schemas:
        node = rs.node
        if not isinstance(node, Record):
            continue
        for leaf in leaves(node):
            rule = aud.rule_for(leaf.tags) if leaf.tags else None
            if rule is None or rule.op != "encrypt_deterministic":
                continue
            domain = str(
                rule.params.get("domain") or leaf.field.props.get(DOMAIN_HINT) or rule.tag
            )
            out.setdefault(leaf.path, set()).add(domain)
    return out


class Reidentifier:
    """Reverses one audience's deterministic ciphertexts, auditing every call.

    ``policy`` is the :class:`~streamproc.policy.model.Policy` under which the data was
    produced (the processor config's policy).  The check is always on: the audience must
    exist in it, have an ``encrypt_deterministic`` rule, and the requested domain must be
    one such a rule produces (:func:`reidentifiable_domains`); anything else is denied and
    audited.  ``actor`` defaults to the audit log's actor (an authenticated identity when
    the log comes from :func:`streamproc.audit.open_tool_log`).

    ``fields`` (:func:`reidentifiable_fields` over the source schemas) makes the check
    field-exact: the field must be one the audience's plan encrypts deterministically,
    in the requested domain (which may then come from a schema's domain hint).
    """

    def __init__(
        self,
        audience_key: AudienceKey | str | os.PathLike[str] | bytes,
        audit: AuditLog,
        policy: Policy,
        fields: Mapping[str, set[str]] | None = None,
        subject_keys: SubjectKeys | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            raise ConfigError(
                "re-identification needs the policy the data was produced under (a Policy); "
                "the policy check cannot be turned off"
            )
        if isinstance(audience_key, AudienceKey):
            self.key = audience_key
        elif isinstance(audience_key, bytes):
            self.key = AudienceKey.from_bytes(audience_key)
        else:
            self.key = AudienceKey.load(audience_key)
        self.audit = audit
        self.policy = policy
        self.policy_version = policy.version
        self.fields = fields
        #: Resolves erasable values' subject keys (``None``: no subject-key topic, and
        #: every ``ds1_`` value fails as an unknown key).
        self.subject_keys = subject_keys

    def _resolve(self, key_id: str) -> bytes:
        assert self.subject_keys is not None
        return self.subject_keys(self.audience, key_id)

    @property
    def audience(self) -> str:
        return self.key.audience

    def _refusal(
        self, value: str, domain: str, field: str, subject: str | None, reason: str
    ) -> str | None:
        """Why the request is refused before any decryption, or ``None``."""
        if not isinstance(value, str) or not (_CIPHERTEXT_RE.fullmatch(value) or erasure.is_erasable(value)):
            if isinstance(value, str) and value.startswith("tk"):
                return "token_not_reversible"
            return "not_ciphertext"
        if not ATTRIBUTE_RULES["domain"](domain):
            return "invalid_domain"
        if not ATTRIBUTE_RULES["field"](field):
            return "invalid_field"
        if subject is not None and not ATTRIBUTE_RULES["subject"](subject):
            return "invalid_subject"
        if not isinstance(reason, str) or not reason.strip():
            return "missing_reason"
        if not ATTRIBUTE_RULES["reason"](reason):
            return "invalid_reason"
        domains = reidentifiable_domains(self.policy, self.audience)
        if domains is None:
            return "audience_not_in_policy"
        if not domains:
            return "audience_has_no_encrypt_deterministic"
        if self.fields is not None:
            if field not in self.fields:
                return "field_not_reidentifiable"
            if domain not in self.fields[field]:
                return "domain_not_in_policy"
            return None
        if domain not in domains:
            return "domain_not_in_policy"
        return None

    _MESSAGES = {
        "token_not_reversible": "value is a token; tokens are one-way and cannot be re-identified",
        "not_ciphertext": "value is not a deterministic ciphertext (de<version>_... or ds1_<key id>_...)",
        "invalid_domain": "domain must be an identifier",
        "invalid_field": "field must be a field path such as customer.email",
        "invalid_subject": "subject must be a token (tk<v>_...), a ciphertext (de<v>_...) or a record "
        "reference (topic:partition:offset), never a plaintext",
        "missing_reason": "a reason (ticket or justification) is required",
        "invalid_reason": "reason must be short printable text without personal data (no e-mail "
        "addresses or long digit runs); cite a ticket",
        "audience_not_in_policy": "the key's audience is not in the policy",
        "audience_has_no_encrypt_deterministic": "the key's audience has no encrypt_deterministic rule in the policy",
        "domain_not_in_policy": "no encrypt_deterministic rule of the key's audience produces this domain "
        "in the policy (a rule's `domain`, else its tag)",
        "field_not_reidentifiable": "the key's audience does not encrypt this field deterministically in "
        "any source schema (check the field path, e.g. customer.email)",
    }

    def reidentify_bytes(
        self,
        value: str,
        domain: str,
        *,
        actor: str | None = None,
        field: str,
        subject: str | None = None,
        reason: str,
    ) -> bytes:
        """Like :meth:`reidentify` but returns the raw canonical bytes (for ``bytes`` fields)."""
        return self._run(
            value, domain, actor=actor, field=field, subject=subject, reason=reason, text=False
        )

    def reidentify(
        self,
        value: str,
        domain: str,
        *,
        actor: str | None = None,
        field: str,
        subject: str | None = None,
        reason: str,
    ) -> str:
        """Return the plaintext of ``value`` after auditing the request.

        ``subject`` is a token or record reference naming whose data this is -- never a
        plaintext.  Exactly one audit event is written per call, whatever the outcome.
        Numbers, booleans, dates and timestamps come back as their canonical text (``42``,
        ``true``, days or epoch units), enums as their symbol.
        """
        out = self._run(
            value, domain, actor=actor, field=field, subject=subject, reason=reason, text=True
        )
        assert isinstance(out, str)
        return out

    def _run(
        self,
        value: str,
        domain: str,
        *,
        actor: str | None,
        field: str,
        subject: str | None,
        reason: str,
        text: bool,
    ) -> Any:
        try:
            who = check_actor(self.audit.actor if actor is None else actor)
        except AuditAttributeError:
            who, actor_bad = "unknown", True
        else:
            actor_bad = False
        digest = _digest(value) if isinstance(value, str) else None
        refusal = (
            "invalid_actor" if actor_bad else self._refusal(value, domain, field, subject, reason)
        )
        safe = {
            "audience": self.audience,
            "policy_version": self.policy_version,
            "key_version": self.key.master_version,
            "domain": domain if ATTRIBUTE_RULES["domain"](domain) else None,
            "field": field if ATTRIBUTE_RULES["field"](field) else None,
            "subject": subject
            if subject is not None and ATTRIBUTE_RULES["subject"](subject)
            else None,
            "reason": reason if ATTRIBUTE_RULES["reason"](reason) else None,
            "value_digest": digest,
        }
        if refusal is not None:
            self._audit(who, safe, "denied", refusal)
            msg = self._MESSAGES.get(refusal, "actor must be an identifier")
            raise ReidentificationError(f"re-identification denied: {msg}")
        if erasure.is_erasable(value):
            return self._run_erasable(who, safe, value, domain, text)
        value_version = int(_CIPHERTEXT_RE.fullmatch(value).group(1))  # type: ignore[union-attr]
        if value_version != self.key.master_version:
            self._audit(who, safe, "denied", "version_mismatch")
            raise ReidentificationError(
                f"re-identification denied: the value was encrypted under pseudonym master version "
                f"{value_version}, but this key is for version {self.key.master_version} of audience "
                f"{self.audience!r}; export the key for that version "
                f"(streamproc keys export-audience --audience {self.audience} --version {value_version})"
            )
        return self._open(
            who, safe, lambda: siv_decrypt(self.key.key, domain, value), text,
            f"in domain {domain!r} (wrong audience, domain or a modified value)",
        )

    def _open(self, who: str, safe: dict[str, Any], decrypt: Callable[[], bytes], text: bool, mismatch: str) -> Any:
        """Decrypt, decode when ``text``, audit the outcome: one ending for both value formats
        (``mismatch`` completes the message of a value that does not open)."""
        try:
            plain = decrypt()
            result: Any = plain.decode("utf-8") if text else plain
        except ReidentificationError:
            self._audit(who, safe, "failed", "decrypt_failed")
            raise ReidentificationError(
                f"re-identification failed: the value is not a ciphertext of audience {self.audience!r} "
                f"{mismatch}"
            ) from None
        except UnicodeDecodeError:
            self._audit(who, safe, "failed", "not_text")
            raise ReidentificationError(
                "re-identification failed: the plaintext is binary; use reidentify_bytes"
            ) from None
        self._audit(who, safe, "success", None)
        return result

    def _run_erasable(self, who: str, safe: dict[str, Any], value: str, domain: str, text: bool) -> Any:
        """An erasable ``ds1_`` value: its subject key from the key topic, then AES-SIV."""
        safe = {**safe, "key_version": None}  # a subject key has no master version
        if self.subject_keys is None:
            self._audit(who, safe, "denied", "no_subject_key_topic")
            raise ReidentificationError(
                "re-identification denied: the value is erasable (ds1_...) and no subject-key topic is "
                "configured (the processor config's erasure: section)"
            )
        try:
            key = self._resolve(erasure.key_id_of(value))
        except erasure.SubjectForgotten:
            self._audit(who, safe, "failed", SubjectForgottenError.reason)
            raise SubjectForgottenError(
                "re-identification failed: the value's subject was forgotten (streamproc forget); "
                "its key is shredded and the value can no longer be reversed"
            ) from None
        except erasure.SubjectKeyUnavailable:
            self._audit(who, safe, "failed", "subject_key_unavailable")
            raise ReidentificationError(
                "re-identification failed: the value's subject key does not open (tampered key record, "
                "or no unwrap right on the audience's KEK)"
            ) from None
        except ReidentificationError:
            self._audit(who, safe, "failed", "unknown_subject_key")
            raise ReidentificationError(
                f"re-identification failed: no subject key of audience {self.audience!r} in the subject-key "
                "topic has this value's key id (another audience's value, or not made by this processor)"
            ) from None
        return self._open(
            who, safe, lambda: erasure.decrypt(key, domain, value), text,
            f"in domain {domain!r} (wrong domain or a modified value)",
        )

    def _audit(self, actor: str, attrs: dict[str, Any], outcome: str, error: str | None) -> None:
        try:
            self.audit.reidentification(actor=actor, outcome=outcome, error=error, **attrs)
        except AuditError as exc:
            raise ReidentificationError(
                f"re-identification refused: the audit log could not be written ({type(exc).__name__})"
            ) from None


# -- the audited paths used by the command-line tools ---------------------------------------------


class ExportRefused(ConfigError):
    """An audience-key export was refused (policy, existing file) or could not be audited."""


def _safe(key: str, value: Any) -> Any:
    return value if value is not None and ATTRIBUTE_RULES[key](value) else None


def audit_refusal(
    audit: AuditLog,
    *,
    error: str,
    audience: str | None = None,
    domain: str | None = None,
    field: str | None = None,
    subject: str | None = None,
    reason: str | None = None,
    policy_version: str | None = None,
) -> None:
    """One ``reidentification`` event with ``outcome: denied`` for a request refused before
    a :class:`Reidentifier` exists (a key file others can read, an unreadable key).

    docs/keys.md promises one event per attempt; a refusal is an attempt.  Raises
    :class:`ReidentificationError` when the event cannot be written.
    """
    try:
        audit.reidentification(
            actor=audit.actor,
            audience=_safe("audience", audience),
            outcome="denied",
            error=error,
            domain=_safe("domain", domain),
            field=_safe("field", field),
            subject=_safe("subject", subject),
            reason=_safe("reason", reason),
            policy_version=_safe("policy_version", policy_version),
        )
    except AuditError as exc:
        raise ReidentificationError(
            f"re-identification refused: the audit log could not be written ({type(exc).__name__})"
        ) from None


def export_audience_key_audited(
    keys: PseudonymKeys | Callable[[], PseudonymKeys],
    audience: str,
    out: str | os.PathLike[str],
    *,
    audit: AuditLog,
    policy: Policy,
    kms: str,
    secret_id: str,
    version: int | None = None,
) -> AudienceKey:
    """The only export path: policy check, ``audience_key_exported`` event, then the file.

    Every attempt writes one event (``outcome`` ``success``, ``denied`` when the policy or
    an existing file refuses it, ``failed`` when the master cannot be read or the file
    cannot be written -- then a second event follows the success one).  The event is
    written *before* the file exists; if it cannot be written, no file is created.
    ``keys`` may be a callable, so a master that cannot be read is audited too.
    """
    base = {
        "kms": _safe("kms", kms) or "unknown",
        "key_id": _safe("key_id", secret_id),
        "audience": _safe("audience", audience),
    }

    def event(outcome: str, error: str | None = None, key_version: int | None = None) -> None:
        try:
            audit.emit(
                EventType.AUDIENCE_KEY_EXPORTED,
                {
                    **base,
                    "outcome": outcome,
                    "error": error,
                    "key_version": key_version,
                    "policy_version": policy.version,
                },
            )
        except AuditError as exc:
            raise ExportRefused(
                f"export refused: the audit log could not be written ({type(exc).__name__})"
            ) from None

    domains = reidentifiable_domains(policy, audience)
    if base["audience"] is None or domains is None:
        event("denied", "audience_not_in_policy")
        raise ExportRefused(f"export refused: no audience {audience!r} in {policy.source}")
    if not domains:
        event("denied", "audience_has_no_encrypt_deterministic")
        raise ExportRefused(
            f"export refused: audience {audience!r} has no encrypt_deterministic rule in "
            f"{policy.source}; its values cannot be re-identified"
        )
    if Path(out).exists():
        event("denied", "file_exists")
        raise ExportRefused(f"{out} already exists; refusing to overwrite a key file")
    try:
        pk = keys() if callable(keys) else keys
        blob = export_audience_key(pk, audience, version)
    except StreamprocError as exc:
        event("failed", "secret_unavailable")
        raise ExportRefused(f"export failed: {exc}") from None
    exported = AudienceKey.from_bytes(blob)
    event("success", key_version=exported.master_version)
    try:
        write_audience_key(out, blob)
    except (ConfigError, OSError) as exc:
        event("failed", "write_failed", exported.master_version)
        what = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ExportRefused(f"export failed: cannot write {out} ({what})") from None
    return exported
