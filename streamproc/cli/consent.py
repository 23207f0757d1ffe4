"""``streamproc consent grant|withdraw|object|show``: a data subject's consent, by hand.

The same records as the application call (:class:`streamproc.client.consent.ConsentWriter`),
for support staff and tests: ``--subject`` is the identifier as it appears in the records'
subject field; it is turned into its consent-domain token here and never written, logged
or printed.  ``show`` reads the consent topic to its end (as a worker restores its table)
and prints, per purpose of the policy, the subject's last word and what every audience of
that purpose gets.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from streamproc.cli.options import config_option
from streamproc.errors import ConfigError, KmsError, PolicyError, TransientError


def _setup(config_path: str) -> tuple[Any, Any, Any]:
    """(config, policy, pseudonym keys) of a processor config with a ``consent:`` section."""
    from streamproc.config import load_config
    from streamproc.crypto.pseudonym import PseudonymKeys
    from streamproc.runtime.factory import build_kms, build_secret_source

    try:
        config = load_config(config_path)
        policy = config.load_policy()
        if config.consent is None:
            raise ConfigError(f"{config_path}: no consent: section (consent: {{topic: ...}})")
        if not policy.pseudonym_key:
            raise PolicyError(f"{policy.source}: consent needs keys.pseudonym")
        keys = PseudonymKeys(build_secret_source(config, build_kms(config)), policy.pseudonym_key)
    except (ConfigError, PolicyError, KmsError, TransientError) as exc:
        raise click.ClickException(str(exc)) from None
    return config, policy, keys


def _subject_option(f: Any) -> Any:
    return click.option("--subject", required=True, help="The subject's identifier, as in the records' subject field.")(f)


@click.group("consent")
def consent() -> None:
    """Record or show a data subject's consent, withdrawal or objection per purpose."""


def _writer_command(name: str, status_help: str) -> Any:
    @consent.command(name, help=status_help)
    @config_option()
    @_subject_option
    @click.option("--purpose", required=True, help="A purpose of the policy's purposes: section.")
    def command(config_path: str, subject: str, purpose: str) -> None:
        from streamproc.client.consent import ConsentWriteError, ConsentWriter

        config, policy, keys = _setup(config_path)
        cc = config.consent
        writer = ConsentWriter(config.producer_config(), cc.topic, keys, domain=cc.domain, purposes=policy.purposes)
        try:
            part, off = getattr(writer, "object" if name == "object" else name)(subject, purpose)
        except ConsentWriteError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            writer.close()
        click.echo(f"{name}: purpose {purpose!r} recorded in {cc.topic}[{part}]@{off}")

    return command


_writer_command("grant", "The subject grants consent for a purpose (or lifts an objection).")
_writer_command("withdraw", "The subject withdraws consent for a purpose.")
_writer_command("object", "The subject objects to a purpose (stops it on every legal basis).")


@consent.command("show")
@config_option()
@_subject_option
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to read the consent topic to its end.")
def show(config_path: str, subject: str, timeout: float) -> None:
    """Read the consent table and print the subject's state per purpose, and its effect."""
    from streamproc.operators.base import canonical_bytes
    from streamproc.pipeline.consent import ConsentGate
    from streamproc.runtime.consent import ConsentTable, ConsentUnavailable, KafkaConsentSource

    config, policy, keys = _setup(config_path)
    cc = config.consent
    try:
        source = KafkaConsentSource(config.consumer_config(), cc.topic, group_prefix=config.group_id)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    table = ConsentTable(source, topic=cc.topic)
    try:
        table.restore(timeout)
    except ConsentUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        source.close()
    gate = ConsentGate(policy, table.state, keys, cc.domain)
    subj = canonical_bytes(subject)
    tokens = gate.tokens(subj)
    click.echo(f"consent table {cc.topic}: {len(table.state)} records")
    for name, purpose in policy.purposes.items():
        rec = gate.record(tokens, name)
        when = "" if rec is None else " at " + dt.datetime.fromtimestamp(rec.at_ms / 1000, dt.UTC).isoformat(timespec="seconds")
        state = "no record" if rec is None else rec.status + when
        why = gate.reason(purpose, subj, tokens)
        effect = "flows" if why is None else f"withheld ({why})"
        audiences = ", ".join(a.name for a in policy.audiences.values() if a.purpose == name) or "-"
        click.echo(f"  {name} [{purpose.basis}]: {state}; audiences {audiences}: {effect}")
