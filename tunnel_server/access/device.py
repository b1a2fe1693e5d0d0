"""Device identity from client certificates (optional mTLS against a configured device CA).

The relay asks for a client certificate when a device CA is configured; OpenSSL verifies it
during the handshake (chain to the device CA, validity dates, the ``clientAuth`` purpose, strict
X.509), so a certificate that reaches ``device_from_certificate`` is trusted and only its
fields remain to be read. A presented certificate that fails verification aborts the handshake
in both modes; ``require=False`` only lets clients *without* a certificate in (device = None).

Certificate profile (what an operator's device CA issues)::

    Subject CN                      device id (required): [A-Za-z0-9][A-Za-z0-9._:@-]{0,127}
    SAN rfc822Name (email)          owner, at most one; lower-cased like token emails
    SAN URI urn:device:os:<os>      lower-case token: linux, macos, windows, ios, android, ...
    SAN URI urn:device:managed:<b>  true | false
    SAN URI urn:device:encrypted:<b>
    extendedKeyUsage                clientAuth

Missing posture fails closed: no ``managed``/``encrypted`` URI means False, no ``os`` URI means
"" and no email means no owner. A ``urn:device:`` key given twice, a malformed value, a missing
or repeated CN, or several emails make the certificate unusable (``DeviceCertificateError``;
``peer_device`` then reports no device). Unknown ``urn:device:`` keys and other SANs are
ignored, so a CA can add fields before the relay reads them.

With openssl::

    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \\
        -keyout device.key -subj "/CN=laptop-7f3a" -out device.csr
    cat > device.ext <<'EOF'
    basicConstraints = critical, CA:FALSE
    keyUsage = critical, digitalSignature
    extendedKeyUsage = clientAuth
    subjectAltName = email:alice@example.com, URI:urn:device:os:linux, \\
        URI:urn:device:managed:true, URI:urn:device:encrypted:true
    EOF
    openssl x509 -req -in device.csr -CA device-ca.pem -CAkey device-ca.key -days 90 \\
        -extfile device.ext -out device.pem

With step-ca, an X.509 template sets ``"subject": {"commonName": ...}``,
``"emailAddresses": [...]``, ``"uris": ["urn:device:os:linux", ...]`` and
``"extKeyUsage": ["clientAuth"]`` (typically filled from the MDM/SCEP provisioner's data).

Policy sees ``device_attributes(device)``: ``device.id``, ``device.owner``, ``device.os``,
``device.managed``, ``device.encrypted``, ``device.serial``. Revocation is not checked here (no
CRL/OCSP): deny a lost device by ``device.serial`` or ``device.id`` in policy, and keep device
certificates short-lived.
"""

from __future__ import annotations

import datetime
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

log = logging.getLogger("tunnel.device")

URN_PREFIX = "urn:device:"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_OS = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
_EMAIL = re.compile(r"[^@\s]{1,64}@[A-Za-z0-9.-]{1,253}")
_BOOLEAN = {"true": True, "false": False}

__all__ = [
    "URN_PREFIX",
    "Device",
    "DeviceCertificateError",
    "device_attributes",
    "device_from_certificate",
    "peer_device",
    "require_device_certificates",
    "server_tls_context",
]


class DeviceCertificateError(ValueError):
    """A verified certificate that does not follow the device profile (message says why)."""


@dataclass(frozen=True, slots=True)
class Device:
    """What the device CA vouches for. ``serial`` is lower-case hex without leading zeros."""

    id: str
    owner: str | None
    os: str
    managed: bool
    encrypted: bool
    serial: str
    not_after: datetime.datetime  # aware, UTC: tunnels can be re-decided when it passes


def device_from_certificate(der: bytes) -> Device:
    """Read the device profile from a DER certificate the TLS layer has already verified."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise DeviceCertificateError("not a DER certificate") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise DeviceCertificateError("the subject needs exactly one CN (the device id)")
    device_id = names[0].value
    if not isinstance(device_id, str) or not _ID.fullmatch(device_id):
        raise DeviceCertificateError("the CN is not a valid device id")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        emails: list[str] = []
        uris: list[str] = []
    else:
        emails = san.get_values_for_type(x509.RFC822Name)
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(emails) > 1:
        raise DeviceCertificateError("several owner emails")
    owner = emails[0].lower() if emails else None
    if owner is not None and not _EMAIL.fullmatch(owner):
        raise DeviceCertificateError("the owner email is malformed")
    fields: dict[str, str] = {}
    for uri in uris:
        if not uri.lower().startswith(URN_PREFIX):
            continue
        key, sep, value = uri[len(URN_PREFIX) :].partition(":")
        if not sep:
            raise DeviceCertificateError(f"device URI without a value: {uri!r}")
        if key in fields:
            # Two answers to one question: trusting either would be a guess.
            raise DeviceCertificateError(f"device field {key!r} given twice")
        fields[key] = value
    os_name = fields.get("os", "")
    if os_name and not _OS.fullmatch(os_name):
        raise DeviceCertificateError("the os is not a lower-case token")
    flags: dict[str, bool] = {}
    for key in ("managed", "encrypted"):
        value = fields.get(key, "false")
        if value not in _BOOLEAN:
            raise DeviceCertificateError(f"device field {key!r} must be true or false")
        flags[key] = _BOOLEAN[value]
    return Device(
        id=device_id,
        owner=owner,
        os=os_name,
        managed=flags["managed"],
        encrypted=flags["encrypted"],
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc,
    )


def device_attributes(device: Device) -> dict[str, str | bool]:
    """The ``device`` map of policy requests (CEL ``device.managed`` etc.; no owner: "")."""
    return {
        "id": device.id,
        "owner": device.owner or "",
        "os": device.os,
        "managed": device.managed,
        "encrypted": device.encrypted,
        "serial": device.serial,
    }


def peer_device(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Device | None:
    """The verified client device of a TLS connection, or None (no TLS, no certificate, or a
    certificate outside the profile). For a websockets ``ServerConnection``:
    ``peer_device(connection.transport.get_extra_info("ssl_object"))``."""
    if ssl_object is None:
        return None
    # getpeercert(binary_form=True) also returns certificates nobody verified (CERT_NONE).
    if ssl_object.context.verify_mode == ssl.CERT_NONE:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return device_from_certificate(der)
    except DeviceCertificateError as exc:
        log.warning("client certificate ignored: %s", exc)
        return None


def require_device_certificates(context: ssl.SSLContext, device_ca: Path, *, require: bool) -> None:
    """Make a server context ask for client certificates issued by ``device_ca`` (PEM, may
    hold several CAs): ``require`` refuses handshakes without one, otherwise they get no
    device. Certificates from other CAs, expired ones and non-``clientAuth`` ones are refused
    by OpenSSL in both modes."""
    context.load_verify_locations(cafile=device_ca)
    context.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL
    # RFC 5280 conformance checks (the Python 3.13 default for new contexts).
    context.verify_flags |= ssl.VERIFY_X509_STRICT


def server_tls_context(
    cert: Path, key: Path, device_ca: Path | None = None, require: bool = False
) -> ssl.SSLContext:
    """A TLS server context (TLS >= 1.2, ALPN http/1.1) with optional device mTLS."""
    if require and device_ca is None:
        raise ValueError("requiring device certificates needs a device CA")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    if device_ca is not None:
        require_device_certificates(context, device_ca, require=require)
    return context
