"""A throw-away certificate authority for local TLS servers (test broker, OpenBao, benchmarks).

Why here and not in the tests: the Kafka test broker (:mod:`streamproc.devkafka`), the
OpenBao test server and the benchmarks all need certificates that a client can verify with
hostname checks *on*, issued by a CA the client pins.  Nothing is committed: the CA and every
leaf key are generated when asked for (with ``cryptography``), live only in memory and in
files the caller puts in a temporary directory (mode 0600 for private keys).

Example::

    from streamproc.devtls import DevCA

    ca = DevCA()                                   # fresh CA key + self-signed certificate
    leaf = ca.issue("broker", hosts=("127.0.0.1", "localhost"))
    ca_file = ca.write_ca(tmp / "ca.pem")          # what clients pin (ssl.ca.location)
    key_file = leaf.write_keystore(tmp / "broker.pem")  # PKCS#8 key + chain, one PEM file

A second, unrelated ``DevCA()`` is the right tool to prove that a client trusting a
different CA is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Long enough for any test run or benchmark, short enough to never matter outside one.
_VALIDITY = datetime.timedelta(days=2)
#: RSA rather than EC: every TLS stack we talk to (JDK PEM keystores, OpenSSL in
#: librdkafka, Go in OpenBao) loads it without per-curve caveats.
_KEY_BITS = 2048


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` readable by the owner only (it holds a private key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


@dataclasses.dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate, its private key and the issuing CA's certificate (all PEM)."""

    cert_pem: bytes
    key_pem: bytes  # unencrypted PKCS#8
    ca_pem: bytes

    @property
    def chain_pem(self) -> bytes:
        return self.cert_pem + self.ca_pem

    def write_keystore(self, path: str | os.PathLike[str]) -> Path:
        """Key + chain in one PEM file (Kafka's ``ssl.keystore.type=PEM`` layout), mode 0600."""
        return _write_private(Path(path), self.key_pem + self.chain_pem)

    def write_pair(
        self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
    ) -> tuple[Path, Path]:
        """Chain and key as two files (the layout OpenBao, nginx and friends want)."""
        cp = Path(cert_path)
        cp.parent.mkdir(parents=True, exist_ok=True)
        cp.write_bytes(self.chain_pem)
        return cp, _write_private(Path(key_path), self.key_pem)


class DevCA:
    """A self-signed CA that issues server/client certificates with IP and DNS SANs."""

    def __init__(self, name: str = "streamproc dev CA") -> None:
        self._key = _key()
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return _pem(self._cert)

    def write_ca(self, path: str | os.PathLike[str]) -> Path:
        """The CA certificate (public) as PEM: what a client pins as its only trust anchor."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.cert_pem)
        return p

    def issue(
        self,
        common_name: str,
        hosts: Sequence[str] = ("127.0.0.1", "localhost"),
        *,
        server: bool = True,
        client: bool = True,
    ) -> IssuedCert:
        """A leaf certificate for ``hosts`` (IP addresses become IP SANs, the rest DNS SANs)."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        usages = [
            u
            for u, on in (
                (ExtendedKeyUsageOID.SERVER_AUTH, server),
                (ExtendedKeyUsageOID.CLIENT_AUTH, client),
            )
            if on
        ]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return IssuedCert(_pem(cert), key_pem, self.cert_pem)
