"""The SSH certificate authority (docs/ssh-certificates.md): the user CA signs short-lived user
certificates, the previous user CA stays published (trusted) through a rotation, the host CA signs
VMs' host keys, and a key revocation list (KRL) names the serials of revoked certificates.
asyncssh does the key and certificate work; the KRL is written in OpenSSH's format
(PROTOCOL.krl), which ``ssh-keygen -Q`` and sshd's ``RevokedKeys`` read."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from ..schema import ConfigError
from .policy import SshPermissions

# Signature algorithms accepted for CA keys: Ed25519 (the default), ECDSA, RSA with SHA-2.
_RSA_SHA2 = "rsa-sha2-512"
CA_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                "ecdsa-sha2-nistp521", "ssh-rsa")  # fmt: skip
_KRL_MAGIC = b"SSHKRL\n\0"
_KRL_FORMAT_VERSION = 1
_KRL_SECTION_CERTIFICATES = 1
_KRL_SECTION_CERT_SERIAL_LIST = 0x20


class KeyRefused(ValueError):
    """A public key offered for signing that is not one (or not of an accepted type)."""


def load_ca_key(path: Path, key: str) -> asyncssh.SSHKey:
    """A CA private key from a file (OpenSSH or PKCS#8; a Kubernetes Secret mounted as a file);
    ConfigError naming the config ``key`` otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    try:
        private = asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"{key}: {path} is not an SSH private key ({exc})") from None
    if private.get_algorithm() not in CA_KEY_TYPES:
        raise ConfigError(f"{key}: {path} is a {private.get_algorithm()} key (use Ed25519)")
    return private


@dataclass(frozen=True)
class UserCertificate:
    certificate: str  # OpenSSH format, one line
    serial: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    fingerprint: str  # of the user's key (SHA256:...)


class CertificateAuthority:
    def __init__(
        self,
        user_key: asyncssh.SSHKey,
        *,
        previous_user_keys: Sequence[asyncssh.SSHKey] = (),
        host_key: asyncssh.SSHKey | None = None,
    ) -> None:
        self.user_key = user_key
        self.previous_user_keys = tuple(previous_user_keys)
        self.host_key = host_key

    def _sig_alg(self, key: asyncssh.SSHKey) -> str | tuple[()]:
        return _RSA_SHA2 if key.get_algorithm() == "ssh-rsa" else ()

    # -- what VMs and clients trust ---------------------------------------------------------------

    def trusted_user_ca_keys(self) -> list[str]:
        """Lines for sshd's ``TrustedUserCAKeys`` file: the signing CA, then the previous ones
        (kept trusted until every certificate they signed has expired)."""
        lines = [_public(self.user_key, "tunnel-user-ca")]
        lines += [_public(k, "tunnel-user-ca-previous") for k in self.previous_user_keys]
        return lines

    def known_hosts_line(self, hosts: str = "*") -> str | None:
        """The ``@cert-authority`` line clients put in known_hosts (None without a host CA)."""
        if self.host_key is None:
            return None
        return f"@cert-authority {hosts} {_public(self.host_key, 'tunnel-host-ca')}"

    # -- signing ---------------------------------------------------------------------------------

    def sign_user(
        self,
        public_key: str,
        *,
        key_id: str,
        serial: int,
        principals: Sequence[str],
        valid_after: int,
        valid_before: int,
        permissions: SshPermissions,
        source_addresses: Sequence[str] = (),
    ) -> UserCertificate:
        user_key = _import_public(public_key)
        cert = self.user_key.generate_user_certificate(
            user_key,
            key_id,
            serial=serial,
            principals=list(principals),
            valid_after=valid_after,
            valid_before=valid_before,
            source_address=list(source_addresses) or None,
            permit_x11_forwarding=permissions.x11_forwarding,
            permit_agent_forwarding=permissions.agent_forwarding,
            permit_port_forwarding=permissions.port_forwarding,
            permit_pty=permissions.pty,
            permit_user_rc=False,
            sig_alg=self._sig_alg(self.user_key),
            comment=key_id,
        )
        return UserCertificate(
            certificate=cert.export_certificate("openssh").decode().strip(),
            serial=serial,
            key_id=key_id,
            principals=tuple(principals),
            valid_after=valid_after,
            valid_before=valid_before,
            fingerprint=user_key.get_fingerprint("sha256"),
        )

    def sign_host(
        self, public_key: str, *, principals: Sequence[str], validity: int, serial: int
    ) -> str:
        """A host certificate for a VM's host key (``tunnel-server ssh sign-host``)."""
        if self.host_key is None:
            raise ConfigError("ssh.host_ca_key_file: no host CA is configured")
        host_key = _import_public(public_key)
        now = int(time.time())
        cert = self.host_key.generate_host_certificate(
            host_key,
            f"host {','.join(principals)}",
            serial=serial,
            principals=list(principals),
            valid_after=now - 300,
            valid_before=now + validity,
            sig_alg=self._sig_alg(self.host_key),
        )
        return str(cert.export_certificate("openssh").decode().strip())

    # -- revocation ------------------------------------------------------------------------------

    def krl(self, serials: Iterable[int], *, version: int, comment: str = "") -> bytes:
        """A KRL revoking these serials of certificates signed by every user CA."""
        revoked = sorted(set(serials))
        listing = b"".join(struct.pack(">Q", serial) for serial in revoked)
        sections = b""
        for ca in (self.user_key, *self.previous_user_keys):
            blob = _string(ca.public_data) + _string(b"")  # ca key, reserved
            if revoked:
                blob += bytes([_KRL_SECTION_CERT_SERIAL_LIST]) + _string(listing)
            sections += bytes([_KRL_SECTION_CERTIFICATES]) + _string(blob)
        header = (
            _KRL_MAGIC
            + struct.pack(">IQQQ", _KRL_FORMAT_VERSION, version, int(time.time()), 0)
            + _string(b"")  # reserved
            + _string(comment.encode())
        )
        return header + sections


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _public(key: asyncssh.SSHKey, comment: str) -> str:
    kind, blob = key.export_public_key("openssh").decode().split()[:2]
    return f"{kind} {blob} {comment}"


def _import_public(text: str) -> asyncssh.SSHKey:
    try:
        key = asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError):
        raise KeyRefused("not an OpenSSH public key") from None
    if isinstance(key, asyncssh.SSHCertificate) or key.get_algorithm() not in (
        *CA_KEY_TYPES,
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ):
        raise KeyRefused(f"keys of type {key.get_algorithm()} are not accepted")
    return key
