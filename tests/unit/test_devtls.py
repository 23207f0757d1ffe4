"""DevCA issues certificates that an independent verifier accepts for the right names only.

The verifier is ``cryptography``'s RFC 5280 path builder (``x509.verification``), not code
of ours, and a Python ``ssl`` handshake over a socketpair checks the same thing the way
an OpenSSL-based client (librdkafka) does: chain to the pinned CA and hostname/IP match.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from streamproc.devtls import DevCA


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA("unit test CA")


def _verify(ca_pem: bytes, leaf_pem: bytes, name: x509.verification.Subject) -> None:
    store = Store(x509.load_pem_x509_certificates(ca_pem))
    verifier = (
        PolicyBuilder()
        .store(store)
        .time(datetime.datetime.now(datetime.UTC))
        .build_server_verifier(name)
    )
    verifier.verify(x509.load_pem_x509_certificate(leaf_pem), [])


def test_leaf_verifies_for_its_ip_and_dns_names_only(ca: DevCA) -> None:
    leaf = ca.issue("broker", hosts=("127.0.0.1", "localhost"))
    _verify(ca.cert_pem, leaf.cert_pem, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    _verify(ca.cert_pem, leaf.cert_pem, x509.DNSName("localhost"))
    with pytest.raises(VerificationError):
        _verify(ca.cert_pem, leaf.cert_pem, x509.IPAddress(ipaddress.ip_address("127.0.0.2")))
    with pytest.raises(VerificationError):
        _verify(ca.cert_pem, leaf.cert_pem, x509.DNSName("example.com"))


def test_leaf_of_another_ca_is_rejected(ca: DevCA) -> None:
    other = DevCA("another CA").issue("broker", hosts=("127.0.0.1",))
    with pytest.raises(VerificationError):
        _verify(ca.cert_pem, other.cert_pem, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> None:
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=hostname) as c:
            c.sendall(b"x")
    finally:
        b.close()
        t.join(10)
        a.close()


def test_tls_handshake_with_pinned_ca_and_hostname_check(ca: DevCA, tmp_path: Path) -> None:
    leaf = ca.issue("broker", hosts=("127.0.0.1", "localhost"))
    keystore = leaf.write_keystore(tmp_path / "broker.pem")
    assert keystore.stat().st_mode & 0o777 == 0o600
    cert_file, key_file = leaf.write_pair(tmp_path / "chain.pem", tmp_path / "key.pem")
    assert key_file.stat().st_mode & 0o777 == 0o600
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(keystore)  # the one-file layout Kafka's PEM keystore reads
    client = ssl.create_default_context(cafile=str(ca.write_ca(tmp_path / "ca.pem")))
    assert client.check_hostname
    _handshake(server, client, "127.0.0.1")
    _handshake(server, client, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, client, "127.0.0.2")
    stranger = ssl.create_default_context(cafile=str(DevCA("x").write_ca(tmp_path / "x.pem")))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, stranger, "127.0.0.1")
    server2 = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server2.load_cert_chain(cert_file, key_file)
    _handshake(server2, client, "127.0.0.1")
