"""Development certificates and cluster secret for the local compose cluster (never production).

Writes, into the directory given (a volume shared by the relays), once:

* ``ca.crt``: a throwaway CA (its key is never written: no further certificate can be issued);
* ``relay.crt`` / ``relay.key``: one P-256 certificate for every relay node, valid for the
  service names ``relay-1..3`` (node-to-node forwards verify them against ``ca.crt``), and
  ``localhost`` / ``127.0.0.1`` / ``::1`` (clients through HAProxy on the host);
* ``cluster-secret``: 48 random bytes, base64 (the shared HMAC key of ``cluster.secret_file``).

Runs with the relay image's Python (``cryptography`` is a relay dependency). Existing files are
kept, so restarting the cluster keeps the certificate the clients already trust.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAMES = ["relay-1", "relay-2", "relay-3", "relay", "localhost"]
ADDRESSES = ["127.0.0.1", "::1"]
FILES = ("ca.crt", "relay.crt", "relay.key", "cluster-secret")
RELAY_UID = RELAY_GID = 10001  # USER of deploy/container/Dockerfile
VALIDITY = datetime.timedelta(days=365)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def generate(directory: Path) -> bool:
    """Write the files unless they all exist; True when written."""
    if all((directory / name).exists() for name in FILES):
        return False
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("identity-tunnel compose dev CA"))
        .issuer_name(_name("identity-tunnel compose dev CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ADDRESSES]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("relay"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    contents = {
        "ca.crt": ca_cert.public_bytes(pem),
        "relay.crt": cert.public_bytes(pem) + ca_cert.public_bytes(pem),
        "relay.key": key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "cluster-secret": base64.b64encode(secrets.token_bytes(48)) + b"\n",
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        path = directory / name
        private = name in ("relay.key", "cluster-secret")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640 if private else 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        if os.geteuid() == 0:  # the init container runs as root to write the fresh volume
            os.chown(path, RELAY_UID, RELAY_GID)
    return True


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/certs")
    written = generate(target)
    print(f"{target}: {'written' if written else 'kept (already present)'}", file=sys.stderr)
