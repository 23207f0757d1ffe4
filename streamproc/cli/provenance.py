"""``streamproc provenance resolve``: where a sanitized record came from.

Sanitized records carry no source coordinates, only an audience-keyed reference in the
``streamproc.prov`` header (see :mod:`streamproc.crypto.provenance`): coordinates in
clear would let two audiences join their outputs.  The lineage team, which may read the
pseudonym master named by the policy, resolves references here::

    streamproc provenance resolve --config streamproc.yaml --audience analytics REF...
    kcat ... -f '%h\\n' | streamproc provenance resolve --config streamproc.yaml

Each argument (or stdin line) is a bare reference, with ``--audience`` (and ``--version``
for an older master), or a whole header value ``f=1;a=...;k=...;r=...``, which names its
audience and master version itself.  Output: ``<ref> <topic> <partition> <offset>``, or a
JSON line per reference with ``--json``.  A reference that does not resolve under the
audience's key is reported (exit 1) without echoing it.

Every call is audited (a ``provenance_resolved`` event in the tools' chain of the config's
``audit:`` section: actor, audiences, count, ``--reason``) *before* anything resolves, and
refused when the audit cannot be written: the source offsets lead to the plaintext.
"""

from __future__ import annotations

import json
import os
import sys

import click

from streamproc.cli.options import config_option
from streamproc.errors import ConfigError, StreamprocError


@click.group("provenance")
def provenance() -> None:
    """Lineage of sanitized records (audience-keyed provenance references)."""


class Resolver:
    """Resolves references for the audiences of one processor config (cached keys).

    The same code as ``streamproc provenance resolve``; tests use it to prove that every
    output maps to exactly one source offset.
    """

    def __init__(self, config_path: str | os.PathLike[str]) -> None:
        from streamproc.config import load_config
        from streamproc.crypto.pseudonym import PseudonymKeys
        from streamproc.runtime.factory import build_kms, build_secret_source

        config = load_config(config_path)
        self.policy = config.load_policy()
        if not self.policy.pseudonym_key:
            raise ConfigError(f"{config.policy}: no keys.pseudonym: outputs carry no provenance reference")
        self.keys = PseudonymKeys(build_secret_source(config, build_kms(config)), self.policy.pseudonym_key)
        self.topics = config.source_topics
        self._cache: dict[tuple[str, int | None], bytes] = {}

    def resolve(self, audience: str, ref: str, version: int | None = None) -> tuple[str, int, int]:
        """``(topic, partition, offset)``; raises ProvenanceError / StreamprocError."""
        from streamproc.crypto.provenance import resolve_reference

        key = self._cache.get((audience, version))
        if key is None:
            self.policy.audience(audience)  # PolicyError for an unknown audience
            key = self._cache[(audience, version)] = self.keys.provenance_key(audience, version)[1]
        return resolve_reference(key, ref, self.topics)

    def resolve_header(self, value: bytes | str) -> tuple[str, int, int]:
        """Resolve a whole ``streamproc.prov`` value (it names audience and version)."""
        from streamproc.crypto.provenance import ProvenanceError, parse_header

        prov = parse_header(value)
        if prov.ref is None:
            raise ProvenanceError("header carries no reference (policy without keys.pseudonym)")
        return self.resolve(prov.audience, prov.ref, prov.key_version)


@provenance.command(
    "resolve",
    # A reference is base64url: one in 32 starts with "-".  Unknown "options" are therefore
    # references, and "-h" is not a help flag here (a reference may start with it).
    context_settings={"ignore_unknown_options": True, "help_option_names": ["--help"]},
)
@config_option("Processor config (kms, policy, pipelines, audit).")
@click.option("--audience", help="Audience of bare references (a header value names its own).")
@click.option("--version", "version", type=click.IntRange(1), help="Pseudonym master version (header k=).")
@click.option("--reason", help="Why (a ticket id), recorded in the audit event. No personal data.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per reference.")
@click.argument("refs", nargs=-1, type=click.UNPROCESSED)
def resolve(
    config_path: str,
    audience: str | None,
    version: int | None,
    reason: str | None,
    as_json: bool,
    refs: tuple[str, ...],
) -> None:
    """Resolve REFS (or stdin lines) to source topic, partition and offset (audited)."""
    from streamproc.audit import AuditError, EventType, open_tool_log
    from streamproc.config import load_config
    from streamproc.crypto.provenance import ProvenanceError, parse_header

    items = list(refs) or [line.strip() for line in sys.stdin if line.strip()]
    # Parse first, so the audit event names every audience before anything is resolved.
    parsed: list[tuple[str, int | None, str] | None] = []
    for item in items:
        if "=" in item:  # a whole streamproc.prov value (possibly after "streamproc.prov=")
            try:
                prov = parse_header(item.split("streamproc.prov=", 1)[-1].split(",", 1)[0])
            except ProvenanceError as exc:
                click.echo(f"streamproc: {exc}", err=True)
                parsed.append(None)
                continue
            parsed.append((prov.audience, prov.key_version, prov.ref or ""))
        elif audience is None:
            raise click.UsageError("a bare reference needs --audience")
        else:
            parsed.append((audience, version, item))
    try:
        resolver = Resolver(config_path)
        # Lineage leads from an audience's record to its source, where the plaintext is:
        # every resolution is audited first, and nothing resolves when that fails.
        log = open_tool_log(load_config(config_path))
    except AuditError as exc:
        raise click.ClickException(f"audit trail unavailable, refusing to resolve: {exc}") from None
    except StreamprocError as exc:
        raise click.ClickException(str(exc)) from None
    failed = sum(p is None for p in parsed)
    try:
        audiences = sorted({p[0] for p in parsed if p is not None})
        attrs: dict[str, object] = {"audiences": audiences, "count": len(items), "outcome": "success"}
        if reason is not None:
            attrs["reason"] = reason
        log.emit(EventType.PROVENANCE_RESOLVED, attrs)
        for p in parsed:
            if p is None:
                continue
            aud, ver, ref = p
            try:
                topic, partition, offset = resolver.resolve(aud, ref, ver)
            except (ProvenanceError, StreamprocError) as exc:
                click.echo(f"streamproc: audience {aud!r}: {exc}", err=True)
                failed += 1
                continue
            if as_json:
                click.echo(json.dumps({"ref": ref, "audience": aud, "topic": topic, "partition": partition, "offset": offset}))
            else:
                click.echo(f"{ref} {topic} {partition} {offset}")
        if failed:
            log.emit(
                EventType.PROVENANCE_RESOLVED,
                {"audiences": audiences, "count": failed, "outcome": "failed", "error": "unresolved"},
            )
    except AuditError as exc:
        raise click.ClickException(f"audit trail unavailable, refusing to resolve: {exc}") from None
    finally:
        log.close()
    if failed:
        raise click.exceptions.Exit(1)
