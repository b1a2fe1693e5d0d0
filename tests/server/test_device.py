"""Device identity from client certificates: real TLS handshakes on loopback against a device
CA made with trustme, device certificates issued with the documented profile."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel_server.access.device import (
    Device,
    DeviceCertificateError,
    device_attributes,
    device_from_certificate,
    peer_device,
    server_tls_context,
)

NOW = datetime.datetime.now(datetime.UTC)
FULL_PROFILE = [
    "urn:device:os:linux",
    "urn:device:managed:true",
    "urn:device:encrypted:true",
]


@dataclass
class Issued:
    cert: x509.Certificate
    cert_file: Path
    key_file: Path

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def issue(
    ca: trustme.CA,
    directory: Path,
    *,
    common_names: Sequence[str] = ("laptop-7f3a",),
    emails: Sequence[str] = ("alice@example.com",),
    uris: Sequence[str] = FULL_PROFILE,
    not_before: datetime.datetime = NOW - datetime.timedelta(hours=1),
    not_after: datetime.datetime = NOW + datetime.timedelta(days=30),
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    name: str = "device",
) -> Issued:
    """A device certificate as an operator's CA would issue it (see tunnel_server.device)."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    general: list[x509.GeneralName] = [x509.RFC822Name(e) for e in emails]
    general += [x509.UniformResourceIdentifier(u) for u in uris]
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_file = directory / f"{name}.pem"
    key_file = directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert, cert_file, key_file)


@dataclass
class Pki:
    directory: Path
    server_ca: trustme.CA
    device_ca: trustme.CA
    server_cert: Path
    server_key: Path
    device_ca_file: Path

    def server_context(self, *, require: bool, device_ca: bool = True) -> ssl.SSLContext:
        return server_tls_context(
            self.server_cert,
            self.server_key,
            self.device_ca_file if device_ca else None,
            require=require,
        )

    def client_context(
        self, device: Issued | None, maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.server_ca.configure_trust(context)
        context.maximum_version = maximum
        if device is not None:
            context.load_cert_chain(device.cert_file, device.key_file)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    server_ca = trustme.CA()
    server = server_ca.issue_cert("127.0.0.1")
    server_cert, server_key = tmp_path / "server.pem", tmp_path / "server.key"
    server.cert_chain_pems[0].write_to_path(str(server_cert))
    server.private_key_pem.write_to_path(str(server_key))
    device_ca = trustme.CA(organization_name="Example devices")
    device_ca_file = tmp_path / "device-ca.pem"
    device_ca.cert_pem.write_to_path(str(device_ca_file))
    return Pki(tmp_path, server_ca, device_ca, server_cert, server_key, device_ca_file)


@dataclass
class Handshake:
    devices: list[Device | None]  # one entry per connection that completed its handshake
    server_error: BaseException | None  # why the server refused the handshake
    client_error: BaseException | None  # what the client saw then


async def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> Handshake:
    """One TLS connection on loopback. The server accepts plain TCP and upgrades it with
    ``start_tls`` so that a refused handshake raises here, with OpenSSL's reason."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[asyncio.BaseTransport] = asyncio.Queue()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            cast(asyncio.Transport, transport).pause_reading()  # nothing read before TLS
            accepted.put_nowait(transport)

    result = Handshake([], None, None)

    async def serve() -> None:
        transport = await accepted.get()
        try:
            tls = await loop.start_tls(
                cast(asyncio.Transport, transport),
                transport.get_protocol(),
                server,
                server_side=True,
            )
        except (ssl.SSLError, ConnectionError) as exc:
            result.server_error = exc  # start_tls has closed the connection
            return
        assert tls is not None
        result.devices.append(peer_device(tls.get_extra_info("ssl_object")))
        tls.write(b"ok")
        tls.close()

    async def connect() -> None:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
            )
        except (ssl.SSLError, ConnectionError) as exc:  # TLS 1.2: refused in the handshake
            result.client_error = exc
            return
        try:
            # TLS 1.3 clients finish their handshake before the server checks their
            # certificate: the refusal arrives as an alert or EOF on the first read.
            data = await reader.read()
            if data != b"ok":
                result.client_error = ConnectionError(f"refused after the handshake: {data!r}")
        except (ssl.SSLError, ConnectionError) as exc:
            result.client_error = exc
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ssl.SSLError, ConnectionError):
                pass

    listener = await loop.create_server(Accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(serve())
            group.create_task(connect())
    finally:
        listener.close()
        await listener.wait_closed()
    return result


def assert_refused(result: Handshake, reason: str) -> None:
    assert result.devices == []
    assert result.client_error is not None
    assert reason in str(result.server_error)


# -- handshakes ------------------------------------------------------------------------------


@pytest.mark.parametrize("require", [True, False])
async def test_device_from_a_real_handshake(pki: Pki, require: bool) -> None:
    device_cert = issue(pki.device_ca, pki.directory)
    result = await handshake(pki.server_context(require=require), pki.client_context(device_cert))
    assert (result.server_error, result.client_error) == (None, None)
    assert result.devices == [
        Device(
            id="laptop-7f3a",
            owner="alice@example.com",
            os="linux",
            managed=True,
            encrypted=True,
            serial=format(device_cert.cert.serial_number, "x"),
            not_after=device_cert.cert.not_valid_after_utc,
        )
    ]


async def test_optional_mode_lets_clients_without_a_certificate_in(pki: Pki) -> None:
    result = await handshake(pki.server_context(require=False), pki.client_context(None))
    assert (result.server_error, result.client_error) == (None, None)
    assert result.devices == [None]


async def test_required_mode_refuses_clients_without_a_certificate(pki: Pki) -> None:
    result = await handshake(pki.server_context(require=True), pki.client_context(None))
    assert_refused(result, "peer did not return a certificate")


async def test_without_a_device_ca_no_certificate_is_asked_for(pki: Pki) -> None:
    device_cert = issue(pki.device_ca, pki.directory)
    result = await handshake(
        pki.server_context(require=False, device_ca=False), pki.client_context(device_cert)
    )
    assert (result.server_error, result.client_error) == (None, None)
    assert result.devices == [None]


@pytest.mark.parametrize("require", [True, False])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_certificate_from_another_ca_is_refused(
    pki: Pki, require: bool, version: ssl.TLSVersion
) -> None:
    """Even in optional mode: a presented certificate that fails verification ends the
    handshake (OpenSSL), it never degrades to "no device"."""
    other_ca = trustme.CA(organization_name="Somebody else")
    foreign = issue(other_ca, pki.directory, name="foreign")
    result = await handshake(
        pki.server_context(require=require), pki.client_context(foreign, maximum=version)
    )
    assert_refused(result, "unable to get local issuer certificate")


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        (NOW - datetime.timedelta(days=30), NOW - datetime.timedelta(minutes=1)),
        (NOW + datetime.timedelta(days=1), NOW + datetime.timedelta(days=30)),
    ],
    ids=["expired", "not-yet-valid"],
)
@pytest.mark.parametrize("require", [True, False])
async def test_a_certificate_outside_its_validity_is_refused(
    pki: Pki, require: bool, not_before: datetime.datetime, not_after: datetime.datetime
) -> None:
    stale = issue(pki.device_ca, pki.directory, not_before=not_before, not_after=not_after)
    result = await handshake(pki.server_context(require=require), pki.client_context(stale))
    expired = not_after < NOW
    assert_refused(result, "certificate has expired" if expired else "not yet valid")


async def test_a_server_only_certificate_is_refused(pki: Pki) -> None:
    """The device CA's TLS server certificates are not device identities (clientAuth EKU)."""
    server_only = issue(pki.device_ca, pki.directory, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    result = await handshake(pki.server_context(require=True), pki.client_context(server_only))
    assert_refused(result, "unsuitable certificate purpose")


async def test_a_verified_certificate_outside_the_profile_gives_no_device(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    odd = issue(pki.device_ca, pki.directory, uris=["urn:device:managed:yes"])
    with caplog.at_level(logging.WARNING, logger="tunnel.device"):
        result = await handshake(pki.server_context(require=False), pki.client_context(odd))
    assert (result.server_error, result.client_error) == (None, None)
    assert result.devices == [None]
    assert "'managed' must be true or false" in caplog.text


# -- the profile ---------------------------------------------------------------------------------


def test_missing_posture_fails_closed(pki: Pki) -> None:
    bare = issue(pki.device_ca, pki.directory, emails=(), uris=())
    device = device_from_certificate(bare.der)
    assert (device.id, device.owner, device.os, device.managed, device.encrypted) == (
        "laptop-7f3a",
        None,
        "",
        False,
        False,
    )


def test_unknown_fields_and_other_sans_are_ignored(pki: Pki) -> None:
    uris = [
        "urn:device:os:macos",
        "urn:device:compliance:2025-01",
        "spiffe://example.org/device/laptop",
        "URN:DEVICE:managed:true",
    ]
    device = device_from_certificate(issue(pki.device_ca, pki.directory, uris=uris).der)
    assert (device.os, device.managed, device.encrypted) == ("macos", True, False)


def test_owner_email_is_lower_cased(pki: Pki) -> None:
    device = device_from_certificate(
        issue(pki.device_ca, pki.directory, emails=["Alice@Example.COM"]).der
    )
    assert device.owner == "alice@example.com"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"common_names": ()}, "exactly one CN"),
        ({"common_names": ("a", "b")}, "exactly one CN"),
        ({"common_names": ("laptop 7f3a",)}, "not a valid device id"),
        ({"common_names": ("-laptop",)}, "not a valid device id"),
        ({"emails": ["a@example.com", "b@example.com"]}, "several owner emails"),
        ({"uris": ["urn:device:os:linux", "urn:device:os:windows"]}, "given twice"),
        ({"uris": ["urn:device:managed:true", "urn:device:managed:false"]}, "given twice"),
        ({"uris": ["urn:device:managed:yes"]}, "must be true or false"),
        ({"uris": ["urn:device:encrypted:TRUE"]}, "must be true or false"),
        ({"uris": ["urn:device:os:Linux"]}, "lower-case token"),
        ({"uris": ["urn:device:managed"]}, "without a value"),
    ],
)
def test_certificates_outside_the_profile(pki: Pki, fields: dict[str, Any], message: str) -> None:
    issued = issue(pki.device_ca, pki.directory, **fields)
    with pytest.raises(DeviceCertificateError, match=message):
        device_from_certificate(issued.der)


def test_not_a_certificate() -> None:
    with pytest.raises(DeviceCertificateError, match="not a DER certificate"):
        device_from_certificate(b"\x30\x03\x02\x01\x00")


def test_device_attributes(pki: Pki) -> None:
    device = device_from_certificate(issue(pki.device_ca, pki.directory).der)
    assert device_attributes(device) == {
        "id": "laptop-7f3a",
        "owner": "alice@example.com",
        "os": "linux",
        "managed": True,
        "encrypted": True,
        "serial": device.serial,
    }
    bare = device_from_certificate(issue(pki.device_ca, pki.directory, emails=()).der)
    assert device_attributes(bare)["owner"] == ""


def test_peer_device_never_trusts_an_unverified_certificate(pki: Pki) -> None:
    """getpeercert(binary_form=True) returns certificates even under CERT_NONE."""
    der = issue(pki.device_ca, pki.directory).der

    class Unverified:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

        def getpeercert(self, binary_form: bool = False) -> bytes:
            return der

    Unverified.context.check_hostname = False
    Unverified.context.verify_mode = ssl.CERT_NONE
    assert peer_device(cast(ssl.SSLObject, Unverified())) is None
    assert peer_device(None) is None


def test_requiring_device_certificates_needs_a_ca(pki: Pki) -> None:
    with pytest.raises(ValueError, match="needs a device CA"):
        server_tls_context(pki.server_cert, pki.server_key, None, require=True)
