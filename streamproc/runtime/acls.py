"""Least-privilege Kafka ACLs derived from the config: ``streamproc acls plan|apply``.

The ACLs a deployment needs follow from what the processor does, so they are computed
from the pipelines rather than written by hand (a hand-written list drifts: a new
destination gets no ACL, or a removed source keeps one).  ``acls:`` in the config only
names the principals; :func:`desired_acls` derives, for each:

* **processor**: ``READ`` on every source topic and on its consumer group (``group_id``;
  the consumer and ``send_offsets_to_transaction`` both need it), ``WRITE`` on every
  destination, dead-letter and audit topic, and -- for ``exactly_once`` -- ``WRITE`` on
  the transactional ids ``<group_id>-`` (``PREFIXED``: the id is
  ``<group_id>-<instance>-<index>``); ``DESCRIBE_CONFIGS`` on the topics whose retention
  it monitors (``topics.retention_check_interval_seconds`` > 0, governed topics only) and
  on every source, destination and dead-letter topic (the start-up record-size limit).
  Nothing on the cluster: since Kafka 3.0
  (KIP-679) an idempotent producer needs no ``IDEMPOTENT_WRITE`` once it may write a
  topic.  No explicit ``DESCRIBE``: Kafka's authorizers imply it from ``READ`` and
  ``WRITE`` on the same resource, so adding it would only be noise in the plan.
* **each audience's principal**: ``READ`` on that audience's sanitized topics only, and
  ``READ`` on groups starting with its ``group_prefix`` (``PREFIXED``).
  With ``consent:``, ``READ`` on the consent topic and on the groups ``<group_id>.consent-``
  (``PREFIXED``) of its table readers.
  With an audience ``budget:``, ``READ`` and ``WRITE`` on the budget changelog
  (``<group_id>.budget-changelog``) and ``READ`` on the groups ``<group_id>.state-``
  (``PREFIXED``) of its restore reader.
* **each producer principal**: ``WRITE`` on its source topics only (and on the consent
  topic when its ``topics`` name it: the application that records consent).

Nobody but the processor can write a sanitized topic, nobody but the audience can read
it, and nobody reads a source or dead-letter topic but the processor (dead letters are
for incident response, which uses an operator's own, audited credentials).

:func:`plan` compares that set with what the cluster has (``describe_acls``) and
classifies every existing ``ALLOW`` binding that touches the config's principals or
resources: needed and present, or *broader than needed* (``ALL`` operations, wildcard
or prefixed patterns that were not derived, principals the config does not name,
rights a principal does not need).  :func:`apply` creates what is missing; running it
again adds nothing.  ``prune`` also deletes what is broader (never by default: an ACL
someone else made is an operator's decision).

The derivation is pure (plain dataclasses, no client); only :func:`describe` and
:func:`apply` talk to the cluster, through confluent-kafka's Admin API.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamproc.config import Config
from streamproc.errors import ConfigError

#: Resource types and pattern types as Kafka names them (``kafka-acls.sh`` spelling).
TOPIC, GROUP, TRANSACTIONAL_ID, CLUSTER = "TOPIC", "GROUP", "TRANSACTIONAL_ID", "CLUSTER"
LITERAL, PREFIXED = "LITERAL", "PREFIXED"
ALLOW, DENY = "ALLOW", "DENY"


@dataclass(frozen=True, order=True)
class Acl:
    """One ACL binding.  ``why`` explains it in a plan and takes no part in equality."""

    principal: str
    resource_type: str
    pattern: str
    name: str
    operation: str
    host: str = "*"
    permission: str = ALLOW
    why: str = field(default="", compare=False)

    def describe(self) -> str:
        pattern = "" if self.pattern == LITERAL else f" ({self.pattern.lower()})"
        return (
            f"{self.principal} {self.permission} {self.operation} on {self.resource_type} "
            f"{self.name!r}{pattern}" + (f" from {self.host}" if self.host != "*" else "")
        )


@dataclass(frozen=True)
class Broader:
    """An existing binding that grants more than the config needs, and why."""

    acl: Acl
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class AclPlan:
    """What :func:`apply` would do: ``add``; ``present`` already; ``broader`` to review."""

    add: tuple[Acl, ...]
    present: tuple[Acl, ...]
    broader: tuple[Broader, ...]
    warnings: tuple[str, ...] = ()


def desired_acls(config: Config) -> list[Acl]:
    """The least-privilege set for ``config`` (sorted, no duplicates)."""
    acls = config.acls
    if acls is None:
        raise ConfigError(
            f"{config.path}: acls: is required to derive ACLs (name the processor, audience "
            "and producer principals; see docs/configuration.md)"
        )
    out: dict[Acl, Acl] = {}

    def add(principal: str, rtype: str, pattern: str, name: str, op: str, why: str) -> None:
        a = Acl(principal, rtype, pattern, name, op, why=why)
        out.setdefault(a, a)

    proc = acls.processor
    for i, p in enumerate(config.pipelines):
        for s in p.sources:
            add(proc, TOPIC, LITERAL, s, "READ", f"source of pipelines[{i}]")
        for d in p.destinations:
            add(proc, TOPIC, LITERAL, d.topic, "WRITE", f"destination ({d.audience})")
        add(proc, TOPIC, LITERAL, p.dead_letter_topic, "WRITE", f"dead letters of pipelines[{i}]")
    if config.audit is not None and config.audit.kafka_topic:
        add(proc, TOPIC, LITERAL, config.audit.kafka_topic, "WRITE", "audit trail")
    if config.consent is not None:
        # Every worker reads the whole consent table (assigned partitions, no offsets
        # committed) under a group id of its own, <group_id>.consent-<random>.
        add(proc, TOPIC, LITERAL, config.consent.topic, "READ", "consent table")
        add(proc, GROUP, PREFIXED, f"{config.group_id}.consent-", "READ", "consent table reader")
    if config.erasure is not None:
        # Every worker reads the whole subject-key table (like the consent table) and
        # writes the keys it creates in its batch transactions.
        add(proc, TOPIC, LITERAL, config.erasure.topic, "READ", "subject-key table")
        add(proc, TOPIC, LITERAL, config.erasure.topic, "WRITE", "subject keys, in the batch transaction")
        add(proc, GROUP, PREFIXED, f"{config.group_id}.erasure-", "READ", "subject-key table reader")
    changelog = config.budget_changelog_topic
    if changelog is not None:
        # The per-subject budgets: written in the worker's transactions, read back from the
        # beginning on partition assignment under <group_id>.state-<random> (no commits).
        add(proc, TOPIC, LITERAL, changelog, "WRITE", "budget changelog (state in the transaction)")
        add(proc, TOPIC, LITERAL, changelog, "READ", "budget changelog restore")
        add(proc, GROUP, PREFIXED, f"{config.group_id}.state-", "READ", "budget changelog reader")
    hold = config.risk_hold_topic
    if hold is not None:
        # Held records (risk action hold): written in the worker's transactions, restored
        # on assignment like the budget changelog (same reader group prefix).
        add(proc, TOPIC, LITERAL, hold, "WRITE", "risk-hold changelog (state in the transaction)")
        add(proc, TOPIC, LITERAL, hold, "READ", "risk-hold changelog restore")
        add(proc, GROUP, PREFIXED, f"{config.group_id}.state-", "READ", "risk-hold changelog reader")
    add(proc, GROUP, LITERAL, config.group_id, "READ", "consumer group and transactional offsets")
    if config.exactly_once:
        add(
            proc,
            TRANSACTIONAL_ID,
            PREFIXED,
            f"{config.group_id}-",
            "WRITE",
            "transactional.id <group_id>-<instance>-<index>",
        )
    # At start-up the worker derives its record-size limit from max.message.bytes of every
    # topic it reads or writes (DescribeConfigs; runtime/limits.py); READ/WRITE do not
    # imply DESCRIBE_CONFIGS, and without it the worker falls back to Kafka's default.
    for p in config.pipelines:
        for t in (*p.sources, *(d.topic for d in p.destinations), p.dead_letter_topic):
            add(proc, TOPIC, LITERAL, t, "DESCRIBE_CONFIGS", "record size limit")
    if config.topics.retention_check_interval_seconds > 0:
        # The worker's retention monitor (runtime/retention.py) describes the configs of
        # the governed topics with the processor's credentials; READ/WRITE do not imply
        # DESCRIBE_CONFIGS, and without it the drift metric stays unknown.
        from streamproc.runtime.retention import expected_retention

        for t in expected_retention(config, config.load_policy()):
            add(proc, TOPIC, LITERAL, t, "DESCRIBE_CONFIGS", "retention drift check")
        # ... and of the state topics (runtime/state_topics.py: compaction settings).
        from streamproc.runtime.state_topics import expected_state_configs

        for t in expected_state_configs(config):
            add(proc, TOPIC, LITERAL, t, "DESCRIBE_CONFIGS", "state topic drift check")
    for audience, a in acls.audiences.items():
        for p in config.pipelines:
            for d in p.destinations:
                if d.audience == audience:
                    add(a.principal, TOPIC, LITERAL, d.topic, "READ", f"audience {audience}")
        add(a.principal, GROUP, PREFIXED, a.group_prefix, "READ", f"groups of audience {audience}")
    for pr in acls.producers:
        for t in pr.topics:
            add(pr.principal, TOPIC, LITERAL, t, "WRITE", "producer")
    return sorted(out)


def _resources(config: Config, desired: Sequence[Acl]) -> list[tuple[str, str, str]]:
    """Every (type, pattern, name) the config's ACLs are about."""
    res = {(a.resource_type, a.pattern, a.name) for a in desired}
    res.update((TOPIC, LITERAL, t) for t in config.all_topics())
    return sorted(res)


def _overlaps(existing: Acl, rtype: str, pattern: str, name: str) -> bool:
    """Whether ``existing`` grants anything on the resource (type, pattern, name)."""
    if existing.resource_type != rtype:
        return False
    if existing.pattern == LITERAL and existing.name == "*":
        return True
    if existing.pattern == LITERAL:
        return existing.name == name if pattern == LITERAL else existing.name.startswith(name)
    # existing is PREFIXED
    if pattern == LITERAL:
        return name.startswith(existing.name)
    return name.startswith(existing.name) or existing.name.startswith(name)


def plan(config: Config, existing: Iterable[Acl]) -> AclPlan:
    """Compare the derived set with ``existing`` bindings (pure; see the module doc)."""
    desired = desired_acls(config)
    assert config.acls is not None  # desired_acls checked
    principals = set(config.acls.principals())
    have = set(existing)
    resources = _resources(config, desired)
    wanted = set(desired)
    broader: list[Broader] = []
    for e in sorted(have):
        if e.permission != ALLOW or e in wanted:
            continue  # DENY only ever narrows
        touches = any(_overlaps(e, *r) for r in resources)
        if e.principal not in principals and not touches:
            continue  # someone else's ACL on someone else's resources
        reasons = []
        if e.principal.split(":", 1)[-1] == "*":
            reasons.append("wildcard principal (every user)")
        elif e.principal not in principals:
            reasons.append("principal not named in acls:")
        if e.operation == "ALL":
            reasons.append("operation ALL")
        if e.name == "*" and e.pattern == LITERAL:
            reasons.append("wildcard resource '*'")
        elif e.pattern == PREFIXED:
            reasons.append("prefixed pattern not derived from the config")
        if e.host != "*":
            reasons.append(f"host {e.host}")
        if e.resource_type == CLUSTER:
            reasons.append("cluster-level right")
        if not reasons or e.principal in principals:
            reasons.append("not needed by the config")
        broader.append(Broader(e, tuple(dict.fromkeys(reasons))))
    warnings = []
    served = {d.audience for p in config.pipelines for d in p.destinations}
    for audience in sorted(served - set(config.acls.audiences)):
        warnings.append(
            f"audience {audience!r} has no principal in acls.audiences: nobody can read its topics"
        )
    return AclPlan(
        add=tuple(a for a in desired if a not in have),
        present=tuple(a for a in desired if a in have),
        broader=tuple(broader),
        warnings=tuple(warnings),
    )


def render(p: AclPlan, *, applied: bool = False, pruned: bool = False) -> list[str]:
    """The plan as text lines, Terraform style (``+`` add, ``=`` present, ``!`` broader)."""
    lines = []
    for a in p.add:
        lines.append(f"  + {a.describe()}    # {a.why}")
    for a in p.present:
        lines.append(f"  = {a.describe()}")
    for b in p.broader:
        verb = "deleted" if pruned else "broader than needed"
        lines.append(
            f"  {'-' if pruned else '!'} {b.acl.describe()}    # {verb}: {'; '.join(b.reasons)}"
        )
    for w in p.warnings:
        lines.append(f"  warning: {w}")
    added = "added" if applied else "to add"
    extra = "deleted" if pruned else "broader than needed (review; --prune deletes them)"
    lines.append(f"{len(p.add)} {added}, {len(p.present)} unchanged, {len(p.broader)} {extra}.")
    return lines


# -- the cluster (confluent-kafka Admin API) ------------------------------------------------------
def _enums() -> Any:
    from confluent_kafka import admin

    return admin


def to_binding(a: Acl) -> Any:
    """An :class:`~confluent_kafka.admin.AclBinding` for ``a``."""
    ad = _enums()
    rtype = "BROKER" if a.resource_type == CLUSTER else a.resource_type
    return ad.AclBinding(
        ad.ResourceType[rtype],
        a.name,
        ad.ResourcePatternType[a.pattern],
        a.principal,
        a.host,
        ad.AclOperation[a.operation],
        ad.AclPermissionType[a.permission],
    )


def from_binding(b: Any) -> Acl:
    rtype = b.restype.name
    return Acl(
        b.principal,
        CLUSTER if rtype == "BROKER" else rtype,
        b.resource_pattern_type.name,
        b.name,
        b.operation.name,
        b.host,
        b.permission_type.name,
    )


def describe(admin: Any, *, timeout: float = 30.0) -> list[Acl]:
    """Every ACL binding on the cluster (needs ``DESCRIBE`` on the cluster)."""
    ad = _enums()
    flt = ad.AclBindingFilter(
        ad.ResourceType.ANY,
        None,
        ad.ResourcePatternType.ANY,
        None,
        None,
        ad.AclOperation.ANY,
        ad.AclPermissionType.ANY,
    )
    got = admin.describe_acls(flt, request_timeout=timeout).result(timeout)
    return sorted(from_binding(b) for b in got)


def apply(config: Config, admin: Any, *, prune: bool = False, timeout: float = 30.0) -> AclPlan:
    """Create the missing ACLs (and with ``prune`` delete the broader ones); return the plan.

    Raises :class:`~confluent_kafka.KafkaException` with the broker's error (for example
    ``CLUSTER_AUTHORIZATION_FAILED`` for credentials that may not alter ACLs).
    """
    p = plan(config, describe(admin, timeout=timeout))
    if p.add:
        futures = admin.create_acls([to_binding(a) for a in p.add], request_timeout=timeout)
        for f in futures.values():
            f.result(timeout)
    if prune and p.broader:
        ad = _enums()
        filters = []
        for b in p.broader:
            x = to_binding(b.acl)
            filters.append(
                ad.AclBindingFilter(
                    x.restype,
                    x.name,
                    x.resource_pattern_type,
                    x.principal,
                    x.host,
                    x.operation,
                    x.permission_type,
                )
            )
        futures = admin.delete_acls(filters, request_timeout=timeout)
        for f in futures.values():
            f.result(timeout)
    return p


__all__ = [
    "Acl",
    "AclPlan",
    "Broader",
    "apply",
    "describe",
    "desired_acls",
    "from_binding",
    "plan",
    "render",
    "to_binding",
]
