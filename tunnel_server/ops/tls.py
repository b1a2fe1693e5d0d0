"""TLS for the relay listener: load a certificate, or make a self-signed one for development."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..access.device import require_device_certificates
from ..config import ConfigError, TlsConfig


def write_self_signed(cert_file: Path, key_file: Path, *, days: int = 30) -> None:
    """A P-256 certificate for localhost, 127.0.0.1 and ::1; the key file is created 0600."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "identity-tunnel development")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def check_tls(config: TlsConfig, key: str = "tls") -> None:
    """What ``check-config`` does: load the pair as ``serve`` would (ConfigError otherwise),
    except a self-signed pair not made yet (``serve`` writes it at start)."""
    if config.self_signed and not (config.cert_file.exists() and config.key_file.exists()):
        return
    server_context(config, key)


def server_context(config: TlsConfig, key: str = "tls") -> ssl.SSLContext:
    """The listener's TLS context. A missing, unreadable or mismatched file is a ConfigError
    naming the config key (``key``: where this TLS section is in the file) and the path."""
    missing = not (config.cert_file.exists() and config.key_file.exists())
    if config.self_signed and missing:
        try:
            write_self_signed(config.cert_file, config.key_file)
        except OSError as exc:
            raise ConfigError(
                f"{key}.cert_file: cannot write a self-signed certificate to "
                f"{config.cert_file}: {exc.strerror}"
            ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(context, config, key)
    if config.device_ca is not None:
        try:
            require_device_certificates(
                context, config.device_ca, require=config.require_device_cert
            )
        except OSError as exc:
            raise ConfigError(
                f"{key}.device_ca: cannot read {config.device_ca}: {exc.strerror}"
            ) from None
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{key}.device_ca: {config.device_ca} holds no usable CA certificate "
                f"({exc.reason or exc.strerror})"
            ) from None
    context.set_alpn_protocols(["http/1.1"])
    return context


def _load_pair(context: ssl.SSLContext, config: TlsConfig, key: str) -> None:
    for name, path in (("cert_file", config.cert_file), ("key_file", config.key_file)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{key}.{name}: cannot read {path}: {exc.strerror}") from None
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(
                f"{key}.key_file: {config.key_file} is not the key of {key}.cert_file "
                f"({config.cert_file})"
            ) from None
        raise ConfigError(
            f"{key}.cert_file: {config.cert_file} and {config.key_file} are not a PEM "
            f"certificate and its key ({exc.reason or 'unreadable'})"
        ) from None
