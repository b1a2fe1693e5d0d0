"""``make demo``'s SSH certificate authority (docs/ssh-certificates.md): a user CA and a host CA in
``.demo/ssh-ca`` (kept across runs), the demo VM's host key signed for the instance name, and the
lines sshd and the relay need, so that the demo VM has no authorized_keys at all."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["relay_ssh_section", "sshd_lines"]

HOST_CERT_DAYS = 30


def _keygen(path: Path, comment: str) -> Path:
    if not path.exists():  # kept across runs: certificates and known_hosts stay valid
        binary = shutil.which("ssh-keygen") or "ssh-keygen"
        argv = [binary, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
        subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    return path


def _cas(state: Path) -> tuple[Path, Path]:
    directory = state / "ssh-ca"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return (
        _keygen(directory / "user_ca", "identity-tunnel-demo-user-ca"),
        _keygen(directory / "host_ca", "identity-tunnel-demo-host-ca"),
    )


def sshd_lines(state: Path, host_key: Path, instance: str) -> list[str]:
    """sshd_config lines: trust the relay's user CA only (no authorized_keys), and present the
    host key signed by the host CA for ``instance`` (re-signed on every start)."""
    user_ca, host_ca = _cas(state)
    binary = shutil.which("ssh-keygen") or "ssh-keygen"
    argv = [binary, "-q", "-s", str(host_ca), "-h", "-I", f"{instance} demo host",
            "-n", instance, "-V", f"-5m:+{HOST_CERT_DAYS}d", f"{host_key}.pub"]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    return [
        f"TrustedUserCAKeys {user_ca}.pub",
        "AuthorizedKeysFile none",
        f"HostCertificate {host_key}-cert.pub",
    ]


def relay_ssh_section(state: Path) -> str:
    """The relay's ``ssh:`` block (YAML)."""
    user_ca, host_ca = _cas(state)
    return (
        f"ssh: {{user_ca_key_file: {user_ca}, host_ca_key_file: {host_ca}, "
        "certificate_ttl: 3600}\n"
    )
