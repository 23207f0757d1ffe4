"""Create the compose stack's Kafka TLS material once: a private CA and the broker's key.

Run by the one-shot ``kafka-tls`` service of docker-compose.yml into the ``kafka-tls``
volume; nothing is committed.  The CA certificate (``ca.pem``) is all a client pins
(``ssl.ca.location``): a bundle that holds only the issuer of this cluster, so no other
CA's certificate is accepted for it (docs/deploy.md, "Pinning the cluster CA").  The
broker's certificate names ``kafka`` (the service) and ``localhost`` (the published port),
so clients keep hostname verification on.  RSA keys: the JDK's PEM keystore and
OpenSSL in librdkafka both load them without caveats.

Idempotent: existing material is kept (clients keep trusting the same CA across ``up``).

    python kafka_tls.py OUT_DIR [--owner UID:GID]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The service name, the published port's name, and loopback (the broker reaching itself
#: in a one-node test of this very file).
HOSTS = ("kafka", "localhost")
IPS = ("127.0.0.1",)
VALIDITY = datetime.timedelta(days=365)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make(out: Path, owner: tuple[int, int] | None) -> bool:
    """Write ca.pem (0644) and kafka-keystore.pem (key + chain, 0600); False if present."""
    ca_path, ks_path = out / "ca.pem", out / "kafka-keystore.pem"
    if ca_path.is_file() and ks_path.is_file():
        return False
    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("streamproc compose Kafka CA"))
        .issuer_name(_name("streamproc compose Kafka CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("kafka"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    *(x509.DNSName(h) for h in HOSTS),
                    *(x509.IPAddress(ipaddress.ip_address(i)) for i in IPS),
                ]
            ),
            False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(ks_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:  # Kafka's ssl.keystore.type=PEM: key, then the chain
        f.write(key_pem + leaf.public_bytes(pem) + ca.public_bytes(pem))
    ca_path.write_bytes(ca.public_bytes(pem))
    os.chmod(ca_path, 0o644)
    if owner is not None:  # the broker's user must read its key; nobody else may
        os.chown(ks_path, *owner)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--owner", help="UID:GID that owns the broker key (the broker's user)")
    args = ap.parse_args()
    owner = tuple(int(x) for x in args.owner.split(":")) if args.owner else None
    created = make(args.out, owner)  # type: ignore[arg-type]
    print(f"kafka TLS material {'created' if created else 'kept'} in {args.out}")


if __name__ == "__main__":
    main()
