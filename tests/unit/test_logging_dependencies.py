"""Dependency loggers stay at WARNING whatever ``logging.level`` says, and key-shaped
values are redacted from message text (the moto-backed end-to-end check is in
tests/integration/test_kms_aws.py::test_debug_logging_never_shows_a_data_key)."""

from __future__ import annotations

import base64
import io
import logging
import os
from collections.abc import Iterator

import pytest

from streamproc.observability.logging import PINNED_LOGGERS, configure_logging

REQUIRED = ("botocore", "boto3", "urllib3", "hvac", "httpx", "httpcore", "confluent_kafka",
            "s3transfer", "requests")


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in REQUIRED}
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)
    logging.captureWarnings(False)


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_dependency_loggers_are_pinned_at_warning(fmt: str, restore_logging: None) -> None:
    assert set(REQUIRED) <= set(PINNED_LOGGERS)
    buf = io.StringIO()
    configure_logging("DEBUG", fmt, stream=buf)
    for name in REQUIRED:
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING, name
        assert not logging.getLogger(f"{name}.sub").isEnabledFor(logging.INFO), name
    logging.getLogger("streamproc.test").debug("own debug line")
    # Someone lowers a pinned logger after configuration: the handler still drops it.
    logging.getLogger("botocore.parsers").setLevel(logging.DEBUG)
    logging.getLogger("botocore.parsers").debug("Response body: dependency debug line")
    logging.getLogger("hvac.adapters").setLevel(logging.INFO)
    logging.getLogger("hvac.adapters").info("dependency info line")
    logging.getLogger("urllib3").warning("dependency warning line")
    text = buf.getvalue()
    assert "own debug line" in text
    assert "dependency warning line" in text
    assert "dependency debug line" not in text and "dependency info line" not in text


def test_key_material_in_message_text_is_redacted(restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging("DEBUG", "json", stream=buf)
    dek = os.urandom(32)
    b64 = base64.b64encode(dek).decode()
    url = base64.urlsafe_b64encode(dek).decode()
    log = logging.getLogger("streamproc.test")
    log.debug("Response body:\nb'{\"KeyId\": \"k\", \"Plaintext\": \"%s\"}'", b64)
    log.info("plaintext=%s and material: b'%s'", dek.hex(), b64)
    log.warning("bare key %s and urlsafe %s", b64, url)
    log.warning("X-Vault-Token: hvs.CAESIJ0abcdef, Authorization=Bearer-xyz")
    text = buf.getvalue()
    for shown in (b64, url, dek.hex(), "hvs.CAESIJ0abcdef", "Bearer-xyz"):
        assert shown not in text
    assert text.count("<redacted>") >= 6
    assert '\\"KeyId\\": \\"k\\"' in text  # the rest of the message survives


def test_key_material_in_a_streamproc_exception_message_is_redacted(restore_logging: None) -> None:
    from streamproc.errors import KmsError

    buf = io.StringIO()
    configure_logging("INFO", "json", stream=buf)
    b64 = base64.b64encode(os.urandom(32)).decode()
    try:
        raise KmsError(f"unexpected response {{'Plaintext': '{b64}'}}")
    except KmsError:
        logging.getLogger("streamproc.test").exception("kms failed")
    text = buf.getvalue()
    assert b64 not in text and "unexpected response" in text
