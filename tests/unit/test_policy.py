"""The policy file: loading, precise errors (file, audience, tag), version, precedence."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamproc.crypto.pseudonym import PseudonymKeys
from streamproc.errors import PolicyError
from streamproc.pipeline.plan import Apply, Drop, Keep, RecordNode, build_plan
from streamproc.policy.model import load_policy, parse_policy
from streamproc.schema import avro
from streamproc.schema.avro import Record
from tests.unit.conftest import POLICY_FILE

BASE = textwrap.dedent(
    """\
    name: test-policy
    keys:
      pseudonym: pseudonym-master
    defaults:
      untagged: drop
      record_key: token
    audiences:
      analytics:
        tags:
          PUBLIC: keep
          EMAIL: {op: token, normalize: [lower, strip]}
          CARD_NUMBER: {op: mask, keep_last: 4}
      fraud:
        untagged: keep
        record_key: keep
        tags:
          EMAIL: encrypt_deterministic
    """
)


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error_for(tmp_path: Path, text: str) -> tuple[str, Path]:
    p = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(p)
    return str(info.value), p


# -- the shipped policy --------------------------------------------------------------------


def test_shipped_policy_loads() -> None:
    pol = load_policy(POLICY_FILE)
    assert pol.name == "acme-privacy"
    assert pol.source == str(POLICY_FILE)
    assert pol.pseudonym_key == "pseudonym-master"
    assert list(pol.audiences) == ["analytics", "fraud", "support"]
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", pol.version)
    analytics, fraud, support = (pol.audience(a) for a in ("analytics", "fraud", "support"))
    assert analytics.untagged == "drop"  # from defaults
    assert analytics.record_key.op == "token" and support.record_key.op == "keep"
    email = analytics.rule_for(("PII", "EMAIL"))
    assert email is not None and email.op == "token" and dict(email.params) == {"normalize": ["lower", "strip"]}
    assert fraud.rule_for(("EMAIL",)).op == "encrypt_deterministic"  # type: ignore[union-attr]
    birth = fraud.rule_for(("PII", "BIRTH_DATE"))
    assert birth is not None and birth.op == "date_shift" and dict(birth.params) == {"max_days": 30}
    assert support.rule_for(("PII", "STREET")).op == "keep"  # type: ignore[union-attr]
    assert analytics.rule_for(("NOT_A_TAG",)) is None
    assert pol.tags >= {"PUBLIC", "EMAIL", "CARD_NUMBER", "IP_ADDRESS", "BIRTH_DATE", "GEO"}
    assert "fraud" in fraud.description.lower()


def test_unknown_audience_is_named() -> None:
    pol = load_policy(POLICY_FILE)
    with pytest.raises(PolicyError) as info:
        pol.audience("marketing")
    assert str(info.value) == f"{POLICY_FILE}: no audience 'marketing' (have: analytics, fraud, support)"


# -- error paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("EMAIL: {op: token, normalize: [lower, strip]}", "EMAIL: hash",
         "audience 'analytics', tag 'EMAIL': unknown operator 'hash'; known: date_shift, dp_noise, drop, encrypt_deterministic, generalize, keep, mask, "
         "randomized_response, redact, token"),
        ("CARD_NUMBER: {op: mask, keep_last: 4}", "CARD_NUMBER: {op: mask, keep_last: -4}",
         "audience 'analytics', tag 'CARD_NUMBER': keep_last must be >= 0"),
        ("CARD_NUMBER: {op: mask, keep_last: 4}", "CARD_NUMBER: {op: mask, keep_last: four}",
         "audience 'analytics', tag 'CARD_NUMBER': parameter 'keep_last' must be int"),
        ("CARD_NUMBER: {op: mask, keep_last: 4}", "CARD_NUMBER: {op: mask, last: 4}",
         "audience 'analytics', tag 'CARD_NUMBER': unknown parameter(s) ['last']; allowed: ['char', 'fixed_length', 'keep_first', 'keep_last', 'on_failure', 'preserve']"),
        ("CARD_NUMBER: {op: mask, keep_last: 4}", "CARD_NUMBER: {keep_last: 4}",
         "audience 'analytics', tag 'CARD_NUMBER': rule needs 'op' (one of the operators)"),
        ("CARD_NUMBER: {op: mask, keep_last: 4}", "CARD_NUMBER: [mask, 4]",
         "audience 'analytics', tag 'CARD_NUMBER': rule must be an operator name or a mapping with 'op'"),
        ("EMAIL: encrypt_deterministic", "EMAIL: {op: generalize, to: week}",
         "audience 'fraud', tag 'EMAIL': 'to' must be hour, day, month or year"),
        ("EMAIL: encrypt_deterministic", "EMAIL: {op: token, normalize: [upper]}",
         "audience 'fraud', tag 'EMAIL': unknown normalization 'upper' (lower, strip, digits)"),
    ],
)
def test_rule_errors_name_file_audience_and_tag(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in BASE
    msg, p = error_for(tmp_path, BASE.replace(old, new))
    assert msg == f"{p}: {expected}"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("untagged: keep", "untagged: maybe", "audience 'fraud': 'untagged' must be keep or drop, not 'maybe'"),
        ("record_key: keep", "record_key: mask", "audience 'fraud': record_key must be one of ('keep', 'token', 'drop')"),
        ("record_key: keep", "record_key: hash",
         "audience 'fraud', tag '<record key>': unknown operator 'hash'; known: date_shift, dp_noise, drop, encrypt_deterministic, generalize, keep, mask, "
         "randomized_response, redact, token"),
        ("record_key: keep", "record_keys: keep", "audience 'fraud': unknown key(s) ['record_keys']"),
        ("  fraud:\n", "  fr@ud:\n", "audience 'fr@ud': audience names are letters, digits, '-' and '_'"),
        ("  fraud:\n    untagged: keep\n    record_key: keep\n    tags:\n      EMAIL: encrypt_deterministic\n",
         "  fraud: [keep]\n", "audience 'fraud': must be a mapping"),
        ("  fraud:\n    untagged: keep\n    record_key: keep\n    tags:\n      EMAIL: encrypt_deterministic\n",
         "  fraud:\n    tags: [EMAIL]\n", "audience 'fraud': 'tags' must map tag names to rules"),
    ],
)
def test_audience_errors_name_file_and_audience(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in BASE
    msg, p = error_for(tmp_path, BASE.replace(old, new))
    assert msg == f"{p}: {expected}"


def test_missing_pseudonym_key_names_audience_and_tag(tmp_path: Path) -> None:
    text = BASE.replace("keys:\n  pseudonym: pseudonym-master\n", "")
    msg, p = error_for(tmp_path, text)
    assert msg.startswith(f"{p}: audience 'analytics', tag 'EMAIL': token needs 'keys.pseudonym'")
    # without any keyed rule but with the default record_key (token), the record key is named
    text = BASE.replace("keys:\n  pseudonym: pseudonym-master\n", "").replace(
        "      EMAIL: {op: token, normalize: [lower, strip]}\n", "").replace(
        "      EMAIL: encrypt_deterministic\n", "      EMAIL: drop\n")
    msg, p = error_for(tmp_path, text)
    assert msg.startswith(f"{p}: audience 'analytics', tag '<record key>': token needs 'keys.pseudonym'")
    # with no keyed operator at all, no key is needed
    text = text.replace("record_key: token", "record_key: drop")
    assert load_policy(write(tmp_path, text)).pseudonym_key is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE + "extras: 1\n", "unknown top-level key(s) ['extras']"),
        (BASE.replace("defaults:\n  untagged: drop", "defaults:\n  untagged: drop\n  tags: {}"),
         "'defaults' may set only 'untagged', 'record_key' and 'on_failure'"),
        (BASE.replace("  pseudonym: pseudonym-master", "  pseudonym: pseudonym-master\n  kek: x"),
         "'keys' may set only 'pseudonym' and 'shared_domains'"),
        ("name: x\naudiences: {}\n", "'audiences' must be a non-empty mapping"),
        ("name: x\n", "'audiences' must be a non-empty mapping"),
        ("- just\n- a list\n", "a policy is a mapping with 'audiences'"),
        ("", "a policy is a mapping with 'audiences'"),
    ],
)
def test_top_level_errors_name_the_file(tmp_path: Path, text: str, expected: str) -> None:
    msg, p = error_for(tmp_path, text)
    assert msg == f"{p}: {expected}"


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    text = BASE.replace("CARD_NUMBER: {op: mask, keep_last: 4}", "CARD_NUMBER: {op: mask, keep_last: 4")
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "CARD_NUMBER" in s)
    msg, p = error_for(tmp_path, text)
    m = re.fullmatch(rf"{re.escape(str(p))}: not valid YAML at line (\d+)", msg)
    assert m is not None, msg
    assert line <= int(m.group(1)) <= line + 2
    # the message does not echo the document
    assert "keep_last" not in msg


def test_tab_indented_yaml_names_the_line(tmp_path: Path) -> None:
    msg, p = error_for(tmp_path, "name: x\naudiences:\n\tfraud: {}\n")
    assert msg == f"{p}: not valid YAML at line 3"


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(missing)
    assert str(info.value) == f"{missing}: cannot read (No such file or directory)"


# -- version -------------------------------------------------------------------------------


REFORMATTED = textwrap.dedent(
    """\
    # the same policy, formatted differently, with comments and another key order
    audiences:
      fraud: {record_key: keep, tags: {EMAIL: encrypt_deterministic}, untagged: keep}   # inline
      analytics:
        tags:
          PUBLIC: "keep"
          EMAIL:
            normalize:
              - lower
              - strip
            op: token
          CARD_NUMBER: {keep_last: 4, op: mask}
    defaults: {record_key: token, untagged: drop}
    keys: {pseudonym: "pseudonym-master"}
    name: 'test-policy'
    """
)


def test_version_is_stable_under_formatting_and_comments(tmp_path: Path) -> None:
    a = load_policy(write(tmp_path, BASE, "a.yaml"))
    b = load_policy(write(tmp_path, REFORMATTED, "b.yaml"))
    assert a.version == b.version
    assert a.version == parse_policy(yaml.safe_load(BASE)).version  # source path is not meaning


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("keep_last: 4", "keep_last: 3"),
        ("untagged: keep", "untagged: drop"),
        ("record_key: keep", "record_key: drop"),
        ("PUBLIC: keep", "PUBLIC: drop"),
        ("pseudonym: pseudonym-master", "pseudonym: other-master"),
        ("normalize: [lower, strip]", "normalize: [strip, lower]"),
        ("      PUBLIC: keep\n      EMAIL: {op: token, normalize: [lower, strip]}\n",
         "      EMAIL: {op: token, normalize: [lower, strip]}\n      PUBLIC: keep\n"),
    ],
    ids=["param", "untagged", "record_key", "op", "keys", "normalize-order", "rule-order"],
)
def test_version_changes_when_meaning_changes(tmp_path: Path, old: str, new: str) -> None:
    assert old in BASE
    a = load_policy(write(tmp_path, BASE, "a.yaml"))
    b = load_policy(write(tmp_path, BASE.replace(old, new), "b.yaml"))
    assert a.version != b.version


# -- precedence and unknown tags ---------------------------------------------------------------

SCHEMA = {
    "type": "record", "name": "T", "namespace": "t",
    "fields": [
        {"name": "email_pii", "type": "string", "confluent:tags": ["EMAIL", "PII"]},
        {"name": "pii_email", "type": "string", "confluent:tags": ["PII", "EMAIL"]},
        {"name": "secret", "type": "string", "confluent:tags": ["TOP_SECRET"]},
        {"name": "public", "type": "string", "confluent:tags": ["PUBLIC"]},
        {"name": "plain", "type": "string"},
    ],
}


def _plan_ops(doc: dict[str, Any], keys: PseudonymKeys) -> dict[str, str]:
    node = avro.parse(SCHEMA)
    assert isinstance(node, Record)
    plan = build_plan(node, parse_policy(doc).audience("a"), keys)
    assert isinstance(plan.root, RecordNode)
    return {
        f.name: ("keep" if isinstance(n, Keep) else "drop" if isinstance(n, Drop) else n.op if isinstance(n, Apply) else "?")
        for f, n in plan.root.fields
    }


def test_strictest_matching_rule_wins_whatever_the_file_order(shared_keys: PseudonymKeys) -> None:
    doc: dict[str, Any] = {"keys": {"pseudonym": "pseudonym-master"},
                           "audiences": {"a": {"untagged": "keep", "tags": {"PII": "drop", "EMAIL": "token", "PUBLIC": "keep"}}}}
    ops = _plan_ops(doc, shared_keys)
    assert ops["email_pii"] == ops["pii_email"] == "drop"
    # Before: the first rule in file order won, so listing EMAIL first made these fields
    # tokens although PII says drop.  The strictest rule wins in every order.
    doc["audiences"]["a"]["tags"] = {"EMAIL": "token", "PII": "drop", "PUBLIC": "keep"}
    ops = _plan_ops(doc, shared_keys)
    assert ops["email_pii"] == ops["pii_email"] == "drop"
    assert ops["public"] == "keep" and ops["plain"] == "keep"
    # keep never wins over anything: PUBLIC listed first still loses to EMAIL's token
    doc["audiences"]["a"]["tags"] = {"PUBLIC": "keep", "EMAIL": "token"}
    aud = parse_policy(doc).audience("a")
    assert aud.rule_for(("PUBLIC", "EMAIL")).op == "token"  # type: ignore[union-attr]
    assert aud.rule_for(("EMAIL", "PUBLIC")).op == "token"  # type: ignore[union-attr]


@pytest.mark.parametrize("order", [tuple(range(10)), tuple(reversed(range(10))), (3, 0, 9, 7, 1, 8, 6, 2, 5, 4)])
def test_strictness_order_is_total_and_documented(order: tuple[int, ...]) -> None:
    """Every pair of operators: the stricter one (docs/policy.md's order, restated here on
    purpose, as the contract) wins whatever the file order."""
    contract = ["keep", "date_shift", "generalize", "mask", "dp_noise", "randomized_response",
                "encrypt_deterministic", "token", "redact", "drop"]
    specs = {"keep": "keep", "date_shift": {"op": "date_shift"}, "generalize": {"op": "generalize", "prefix": 1},
             "mask": {"op": "mask", "keep_last": 1},
             "dp_noise": {"op": "dp_noise", "mechanism": "laplace", "epsilon": 1, "bounds": [0, 1]},
             "randomized_response": {"op": "randomized_response", "epsilon": 1},
             "encrypt_deterministic": "encrypt_deterministic",
             "token": "token", "redact": "redact", "drop": "drop"}
    assert set(contract) == set(get_operator_names())
    tags = {f"T{i}": specs[contract[i]] for i in order}
    aud = parse_policy({"keys": {"pseudonym": "k"}, "audiences": {"a": {"tags": tags}}}).audience("a")
    for i in range(10):
        for j in range(10):
            got = aud.rule_for((f"T{i}", f"T{j}"))
            assert got is not None and got.op == contract[max(i, j)]


def get_operator_names() -> list[str]:
    from streamproc.operators import REGISTRY

    return list(REGISTRY)


def test_unknown_tags_drop_and_untagged_follows_the_audience(shared_keys: PseudonymKeys) -> None:
    doc: dict[str, Any] = {"keys": {"pseudonym": "pseudonym-master"},
                           "audiences": {"a": {"untagged": "keep", "tags": {"PUBLIC": "keep"}}}}
    ops = _plan_ops(doc, shared_keys)
    assert ops == {"email_pii": "drop", "pii_email": "drop", "secret": "drop", "public": "keep", "plain": "keep"}
    doc["audiences"]["a"]["untagged"] = "drop"
    assert _plan_ops(doc, shared_keys)["plain"] == "drop"


def test_inapplicable_operator_is_a_policy_error_naming_field_and_tag(shared_keys: PseudonymKeys) -> None:
    doc = {"keys": {"pseudonym": "pseudonym-master"},
           "audiences": {"a": {"tags": {"PUBLIC": {"op": "generalize", "to": "year"}}}}}
    with pytest.raises(PolicyError) as info:
        _plan_ops(doc, shared_keys)
    assert str(info.value) == (
        "audience 'a', field 'public', tag 'PUBLIC': generalize does not apply to Avro type 'string' "
        "(applies to date, timestamp-micros, timestamp-millis)"
    )
