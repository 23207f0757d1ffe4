"""``streamproc forget SUBJECT``: erasure by crypto-shredding, audited.

What it does, in order (docs/governance.md, "Erasure"):

1. opens the tools' audit trail (refuses to run without it) and reads the subject-key
   topic to its end;
2. writes one ``subject_forgotten`` audit event (the subject's token in the subject-key
   domain, or without ``erasure:`` in the consent domain; never the value);
3. writes the *forgotten marker* ``<token>/forgotten`` (no worker creates a key for the
   subject again: their later records are withheld from audiences with erasable rules),
   then a *shred record* over every key record of the subject (under every master version
   present): compaction deletes the keys, and every ``ds1_`` value made with them, in every
   topic and copy, becomes unreadable;
4. with ``consent:``, withdraws every purpose of the policy for the subject.

``SUBJECT`` is the identifier as it appears in the audience's ``subject:`` field; it is
turned into tokens here and never written, logged or printed.  Running it again is safe
(the same records again) and closes the log segments holding old key records once
``segment.ms`` has passed (see the bound in docs/governance.md).
"""

from __future__ import annotations

import time
from typing import Any

import click

from streamproc.cli.options import config_option
from streamproc.errors import ConfigError, KmsError, PolicyError, StreamprocError, TransientError


class ForgetError(StreamprocError):
    """A write of ``forget`` was not acknowledged (names the topic, never the subject)."""


def _produce_all(producer_config: dict[str, Any], topic: str, records: list[tuple[bytes, bytes]], timeout: float) -> None:
    """Produce ``records`` (idempotent, ``acks=all``) and wait for every acknowledgement."""
    from confluent_kafka import Producer

    conf = {**producer_config, "enable.idempotence": True, "acks": "all"}
    conf.pop("transactional.id", None)
    producer = Producer(conf)
    errors: list[str] = []
    acked = [0]

    def done(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err.name())
        else:
            acked[0] += 1

    for k, v in records:
        producer.produce(topic, key=k, value=v, on_delivery=done)
    producer.flush(timeout)
    if errors:
        raise ForgetError(f"subject-key topic {topic!r}: {errors[0]}")
    if acked[0] != len(records):
        raise ForgetError(f"subject-key topic {topic!r}: not acknowledged within {timeout:.0f}s")


def forget_subject(
    config: Any, policy: Any, keys: Any, subject: str, *, log: Any, reason: str, timeout: float = 60.0
) -> dict[str, Any]:
    """Forget ``subject`` (see the module doc); returns what was done (tokens, counts)."""
    from streamproc.audit import SubjectForgottenEvent
    from streamproc.crypto import erasure
    from streamproc.operators.base import canonical_bytes
    from streamproc.runtime.erasure import read_key_directory

    subj = canonical_bytes(subject)
    out: dict[str, Any] = {"shredded": 0, "audiences": [], "purposes": [], "token": None, "topic": None}
    records: list[tuple[bytes, bytes]] = []
    now = int(time.time() * 1000)
    if config.erasure is not None:
        topic = config.erasure.topic
        directory = read_key_directory(config, timeout=timeout)
        tokens = erasure.subject_tokens(keys, subj, directory.versions | {keys.primary_version})
        primary = tokens[keys.primary_version]
        records.append((erasure.record_key(primary, erasure.MARKER), erasure.marker_value(now)))
        mine = set(tokens.values())
        live = [r for r in directory.keys.values() if r.token in mine]
        done = [r for r in directory.shredded.values() if r.token in mine]  # written again: idempotent
        for r in [*live, *done]:
            records.append((erasure.record_key(r.token, r.suffix), erasure.shred_value(r.audience or "-", now)))
        out.update(token=primary, topic=topic, shredded=len(live), audiences=sorted({r.audience or "-" for r in live}))
    purposes = sorted(policy.purposes) if config.consent is not None else []
    out["purposes"] = purposes
    if out["token"] is None and config.consent is not None:
        # No subject-key topic: the audit event names the subject by the consent table's
        # token (the key its withdrawals are written under), never the identifier.
        from streamproc.client.consent import subject_token

        out["token"] = subject_token(keys, config.consent.domain, subject)
    log.emit(
        SubjectForgottenEvent(
            subject=out["token"], topic=out["topic"], audiences=out["audiences"], purposes=purposes,
            count=out["shredded"], reason=reason, outcome="success", policy_version=policy.version,
        )
    )  # fmt: skip
    try:
        if records:
            _produce_all(config.producer_config(), out["topic"], records, timeout)
        if purposes:
            from streamproc.client.consent import ConsentWriter

            cc = config.consent
            writer = ConsentWriter(config.producer_config(), cc.topic, keys, domain=cc.domain, purposes=policy.purposes)
            try:
                for p in purposes:
                    writer.withdraw(subject, p)
            finally:
                writer.close()
    except Exception as exc:
        log.emit(
            SubjectForgottenEvent(
                subject=out["token"], topic=out["topic"], reason=reason, outcome="failed",
                error=type(exc).__name__, policy_version=policy.version,
            )
        )  # fmt: skip
        raise
    return out


@click.command("forget")
@config_option("Processor config: its erasure: (subject-key topic), consent:, KMS and audit: sections.")
@click.option("--reason", required=True, help="Justification, e.g. the erasure request's ticket id (audited; no personal data).")
@click.option(
    "--actor", "note", envvar="STREAMPROC_ACTOR",
    help="Free-text note recorded beside the authenticated actor; it never replaces the identity.",
)  # fmt: skip
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to read the key topic and for acknowledgements.")
@click.argument("subject")
def forget(config_path: str, reason: str, note: str | None, timeout: float, subject: str) -> None:
    """Forget SUBJECT: shred their keys (every erasable value made with them becomes
    unreadable), stop new keys for them, withdraw their consent; audited.

    SUBJECT is the identifier as in the audience's subject field; it is never printed.
    """
    from streamproc.audit import AuditError, open_tool_log
    from streamproc.config import load_config
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.runtime.factory import build_kms, build_secret_source

    try:
        config = load_config(config_path)
        policy = config.load_policy()
        if config.erasure is None and config.consent is None:
            raise ConfigError(f"{config_path}: neither erasure: nor consent: is configured; nothing to forget")
        if not policy.pseudonym_key:
            raise PolicyError(f"{policy.source}: forget needs keys.pseudonym (subject tokens derive from it)")
        keys = PseudonymKeys(build_secret_source(config, build_kms(config)), policy.pseudonym_key)
    except (ConfigError, PolicyError, KmsError, TransientError) as exc:
        raise click.ClickException(str(exc)) from None
    if subject == "":
        raise click.ClickException("a subject is required")
    try:
        log = open_tool_log(config, note=note)
    except (AuditError, StreamprocError) as exc:
        raise click.ClickException(f"audit log unavailable, refusing to forget unaudited: {exc}") from None
    try:
        done = forget_subject(config, policy, keys, subject, log=log, reason=reason, timeout=timeout)
    except (StreamprocError, AuditError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        try:
            log.close()
        except AuditError as exc:
            click.echo(f"warning: closing the audit log: {exc}", err=True)
    if done["topic"] is not None:
        click.echo(
            f"forgot subject {done['token']} in {done['topic']}: forgotten marker written, "
            f"{done['shredded']} key(s) shredded (audiences: {', '.join(done['audiences']) or '-'})"
        )
    if done["purposes"]:
        click.echo(f"consent withdrawn for purposes: {', '.join(done['purposes'])}")
    click.echo("audited: subject_forgotten")


__all__ = ["ForgetError", "forget", "forget_subject"]
