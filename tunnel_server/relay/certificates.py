"""SSH user certificates issued on the relay listener (docs/ssh-certificates.md): an
authenticated member offers a public key it just made and names a target; the policy decides the
login names (``Admission.authorize_logins``); the CA signs the key for them, for at most
``ssh.certificate_ttl`` and never past the token's expiry; every issuance is audited with the
serial and a reference that the certificate's key id carries. The relay remembers the
certificates still valid, so that revoking a user revokes theirs too (``krl``)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from tunnel_protocol.urls import Target

from ..access.device import Device
from ..access.identity import Identity
from ..access.ssh_ca import CertificateAuthority, UserCertificate
from ..audit import AuditLog
from ..config import SshConfig
from .admission import Admission

# Certificates start this many seconds in the past: a VM whose clock is a little behind still
# accepts a fresh one.
CLOCK_SLACK = 60


@dataclass(frozen=True, slots=True)
class _Issued:
    principal: str
    issued_at: float
    valid_before: int


class CertificateIssuer:
    def __init__(
        self,
        *,
        admission: Admission,
        ca: CertificateAuthority,
        settings: SshConfig,
        revoked_at: Callable[[str], float | None],
        audit: AuditLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.admission = admission
        self.ca = ca
        self.settings = settings
        self._revoked_at = revoked_at
        self.audit = audit
        self.clock = clock
        self._issued: dict[int, _Issued] = {}

    def issue(
        self,
        identity: Identity,
        target: Target,
        public_key: str,
        source_ip: str | None,
        device: Device | None,
    ) -> UserCertificate:
        """Raises Refused (the policy grants no login here) or KeyRefused (not a key)."""
        binding, logins = self.admission.authorize_logins(identity, target, source_ip, device)
        now = self.clock()
        valid_before = int(min(now + self.settings.certificate_ttl, identity.expires_at))
        reference = secrets.token_hex(6)
        serial = secrets.randbits(63) or 1
        certificate = self.ca.sign_user(
            public_key,
            key_id=f"{identity.principal} ref={reference}",
            serial=serial,
            principals=logins,
            valid_after=int(now) - CLOCK_SLACK,
            valid_before=valid_before,
            permissions=binding.ssh,
            source_addresses=[str(net) for net in self.settings.source_addresses],
        )
        self._remember(serial, _Issued(identity.principal, now, valid_before))
        self.audit.record(
            "ssh_certificate",
            decision="allow",
            principal=identity.principal,
            source_ip=source_ip,
            resource=self.admission.inventory.resource_for(target),
            binding=binding.name,
            key_fingerprint=certificate.fingerprint,
            serial=serial,
            principals=list(logins),
            valid_after=certificate.valid_after,
            valid_before=valid_before,
            reference=reference,
        )
        return certificate

    def _remember(self, serial: int, issued: _Issued) -> None:
        now = self.clock()
        for old in [s for s, i in self._issued.items() if i.valid_before <= now]:
            del self._issued[old]
        self._issued[serial] = issued

    def revoked_serials(self) -> list[int]:
        """Certificates still valid whose user was revoked after they were issued."""
        now = self.clock()
        serials = []
        for serial, issued in self._issued.items():
            revoked = self._revoked_at(issued.principal)
            if revoked is not None and issued.issued_at <= revoked and issued.valid_before > now:
                serials.append(serial)
        return serials

    def status(self, principal: str, issued_at: float, valid_before: float) -> str:
        """``valid``, ``expired`` or ``revoked`` (its user was revoked after it was issued:
        in the KRL while it lives), for any certificate this cluster issued."""
        if valid_before <= self.clock():
            return "expired"
        revoked = self._revoked_at(principal)
        return "revoked" if revoked is not None and issued_at <= revoked else "valid"

    def krl(self) -> bytes:
        """The KRL of this node's live revoked certificates (sshd ``RevokedKeys``)."""
        return self.ca.krl(self.revoked_serials(), version=int(self.clock()))

    def ca_document(self) -> str:
        """What VMs and clients trust: ``TrustedUserCAKeys`` lines, then the host CA's
        ``@cert-authority`` line for known_hosts (when there is a host CA)."""
        lines = self.ca.trusted_user_ca_keys()
        known_hosts = self.ca.known_hosts_line()
        if known_hosts is not None:
            lines.append(known_hosts)
        return "\n".join(lines) + "\n"
