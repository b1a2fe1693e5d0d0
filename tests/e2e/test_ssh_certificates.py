"""Keyless SSH, relay side (issue 13), with a real OpenSSH server and asyncssh as the client: the
relay's CA issues a short-lived certificate for the login names the policy grants; an sshd that
trusts only that CA (no authorized_keys anywhere) accepts it through a tunnel, and refuses a login
not granted, an expired certificate, a revoked serial (KRL), a source address other than the
relay's, and a certificate from a CA it no longer trusts. Host certificates are verified without
a prompt; an unsigned host key is refused."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from tunnel_protocol.urls import SSH_PUBLIC_KEY_HEADER, InstanceTarget, certificate_query
from tunnel_server.access.policy import SshPermissions
from tunnel_server.access.ssh_ca import CertificateAuthority
from tunnel_server.app import RunningServer

from ..helpers import capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..server.test_relay import client_ssl, listening, options
from .sshd import SSH_KEYGEN, Sshd, keygen, missing_tools, running_sshd

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools())),
]


def ca_key(path: Path) -> Path:
    assert SSH_KEYGEN is not None
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    return path


async def tool(*argv: str) -> str:
    """Run a command line tool (``tunnel-server``: this interpreter's, or ssh-keygen) and return
    its stdout."""
    command = (
        [sys.executable, "-m", "tunnel_server", *argv[1:]]
        if argv[0] == "tunnel-server"
        else list(argv)
    )
    result = await asyncio.to_thread(
        subprocess.run, command, check=True, capture_output=True, text=True
    )
    return str(result.stdout)


def certificate(text: str) -> Any:
    """The fields of an OpenSSH certificate (asyncssh types them only on the concrete class)."""
    return asyncssh.import_certificate(text)


@dataclass
class Stack:
    relay: RunningServer
    sshd: Sshd
    tmp: Path
    issuer: TestIssuer
    krl: Path
    user_ca: Path
    audit: list[dict[str, Any]]

    @property
    def target(self) -> InstanceTarget:
        return InstanceTarget("p", "z", "vm1", "nic0", self.sshd.port)


@pytest.fixture
async def stack(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[Stack]:
    user_ca, host_ca = ca_key(tmp_path / "user_ca"), ca_key(tmp_path / "host_ca")
    data = relay_config_data(issuer, tmp_path)
    data["access"][0]["logins"] = ["{email_local}", "root"]
    data["access"].append(
        {"members": ["user:dave@example.com"], "instances": ["p/z/vm1"], "ports": ["1-65535"]}
    )  # dave may reach the VM, but is granted no login name
    data["ssh"] = {"user_ca_key_file": str(user_ca), "host_ca_key_file": str(host_ca),
                   "certificate_ttl": 600}  # fmt: skip
    config = tmp_path / "relay.yaml"
    config.write_text(json.dumps(data))
    trusted = tmp_path / "trusted_user_ca.pub"
    trusted.write_text(await tool("tunnel-server", "ssh", "ca-keys", str(config)))
    krl = tmp_path / "revoked.krl"
    krl.write_bytes(b"")  # sshd refuses every key while RevokedKeys names a missing file
    extra = [f"TrustedUserCAKeys {trusted}", f"RevokedKeys {krl}"]
    async with running_sshd(tmp_path / "sshd", extra=extra, authorized_keys=False) as sshd:
        async with start_relay(data) as relay:
            yield Stack(relay, sshd, tmp_path, issuer, krl, user_ca, capture_audit(relay))


async def request_certificate(
    stack: Stack, key: asyncssh.SSHKey, token: str | None = None
) -> tuple[int, str]:
    token = token or stack.issuer.mint(lifetime=900)
    url = stack.relay.url.replace("wss://", "https://") + certificate_query(stack.target)
    headers = {
        "Authorization": f"Bearer {token}",
        SSH_PUBLIC_KEY_HEADER: key.export_public_key().decode().strip(),
    }
    context = client_ssl(stack.tmp)
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers, ssl=context) as r:
        return r.status, await r.text()


async def login(
    stack: Stack,
    key: asyncssh.SSHKey,
    certificate: str,
    username: str = "root",
    via_tunnel: bool = True,
) -> str:
    """``whoami`` on the VM, through a tunnel (or straight to sshd), with the certificate."""
    cert = asyncssh.import_certificate(certificate)
    port = stack.sshd.port

    async def run(host: str, to: int) -> str:
        async with asyncssh.connect(
            host, to, username=username, client_keys=[(key, cert)], known_hosts=None,
            agent_path=None, config=None,
        ) as conn:  # fmt: skip
            result = await conn.run("whoami", check=True)
            return str(result.stdout).strip()

    if not via_tunnel:
        return await run("127.0.0.1", port)
    opts = options(stack.relay, stack.tmp, stack.issuer.mint(lifetime=900), port)
    async with listening(opts) as listener:
        return await run("127.0.0.1", listener.port)


async def test_a_relay_certificate_logs_in_with_no_authorized_keys(stack: Stack) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    status, text = await request_certificate(stack, key)
    assert status == 200, text
    cert = certificate(text)
    assert sorted(cert.principals) == ["alice", "root"]
    assert cert._key_id.startswith("user:alice@example.com ref=")
    # Never longer than the configured TTL.
    assert cert._valid_before - time.time() <= 600 + 5
    assert await login(stack, key, text) == "root"
    assert stack.sshd.accepted() == 1
    issued = [r for r in stack.audit if r["event"] == "ssh_certificate"]
    assert issued[-1]["principals"] == ["alice", "root"]
    assert issued[-1]["serial"] == cert._serial
    assert issued[-1]["key_fingerprint"] == key.get_fingerprint("sha256")
    assert cert._key_id.endswith(issued[-1]["reference"])


async def test_validity_never_outlives_the_token(stack: Stack) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    status, text = await request_certificate(stack, key, stack.issuer.mint(lifetime=120))
    assert status == 200
    assert certificate(text)._valid_before <= time.time() + 120 + 1


async def test_refusals_at_issuance(stack: Stack) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    mallory = stack.issuer.mint(sub="mallory", email="mallory@example.com")
    status, text = await request_certificate(stack, key, mallory)
    assert status == 403
    assert text.startswith("policy; ref=")
    dave = stack.issuer.mint(sub="dave", email="dave@example.com")
    status, text = await request_certificate(stack, key, dave)
    assert (status, text.split(";")[0]) == (403, "policy")  # reaches the VM, no login granted
    assert "grants no login names" in stack.audit[-1]["reason"]
    status, _ = await request_certificate(stack, key, "garbage")
    assert status == 401


async def test_a_login_name_not_granted_is_refused_by_sshd(stack: Stack) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    _, text = await request_certificate(stack, key)
    with pytest.raises(asyncssh.PermissionDenied):
        await login(stack, key, text, username="nobody")


def _sign(
    ca: CertificateAuthority, key: asyncssh.SSHKey, *, serial: int = 7, after: int = -60,
    before: int = 600, source: tuple[str, ...] = (),
) -> str:  # fmt: skip
    now = int(time.time())
    return ca.sign_user(
        key.export_public_key().decode(), key_id="test", serial=serial, principals=["root"],
        valid_after=now + after, valid_before=now + before, permissions=SshPermissions(),
        source_addresses=source,
    ).certificate  # fmt: skip


async def test_sshd_refuses_expired_revoked_foreign_and_misplaced_certificates(
    stack: Stack,
) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    ca = CertificateAuthority(asyncssh.read_private_key(stack.user_ca))
    assert await login(stack, key, _sign(ca, key)) == "root"  # the control: accepted
    refused = {
        "expired": _sign(ca, key, after=-900, before=-300),
        "elsewhere": _sign(ca, key, source=("192.0.2.7/32",)),  # only from the relay's egress
        "rotated out": _sign(
            CertificateAuthority(asyncssh.generate_private_key("ssh-ed25519")), key
        ),  # fmt: skip
    }
    for why, certificate in refused.items():
        with pytest.raises(asyncssh.PermissionDenied):
            await login(stack, key, certificate)
        assert why
    # A serial the KRL names (written by tunnel-server ssh krl) is refused from then on.
    revoked = _sign(ca, key, serial=4242)
    assert await login(stack, key, revoked) == "root"
    config = stack.tmp / "relay.yaml"
    await tool(
        "tunnel-server", "ssh", "krl", str(config), "--serial", "4242", "--output", str(stack.krl)
    )
    with pytest.raises(asyncssh.PermissionDenied):
        await login(stack, key, revoked)


async def test_revoking_a_user_revokes_their_live_certificates(stack: Stack) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    _, text = await request_certificate(stack, key)
    assert await login(stack, key, text, via_tunnel=False) == "root"
    serial = certificate(text)._serial
    stack.relay.revocations.revoke_user("user:alice@example.com")
    url = stack.relay.url.replace("wss://", "https://") + "/v1/ssh/krl"
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, ssl=client_ssl(stack.tmp)) as response,
    ):
        stack.krl.write_bytes(await response.read())
    listing = await tool("ssh-keygen", "-Q", "-l", "-f", str(stack.krl))
    assert f"serial: {serial}" in listing
    # The relay refuses her already; sshd (reached some other way) refuses the certificate too.
    with pytest.raises(asyncssh.PermissionDenied):
        await login(stack, key, text, via_tunnel=False)


async def test_host_certificates_are_verified_without_a_prompt(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    host_ca, user_ca = ca_key(tmp_path / "host_ca"), ca_key(tmp_path / "user_ca")
    config = tmp_path / "relay.yaml"
    data = relay_config_data(issuer, tmp_path)
    data["ssh"] = {"user_ca_key_file": str(user_ca), "host_ca_key_file": str(host_ca)}
    config.write_text(json.dumps(data))
    vm_key = keygen(tmp_path / "vm_host_key", "vm1")
    signed = await tool(
        "tunnel-server", "ssh", "sign-host", str(config), "--host-key",
        str(vm_key.with_suffix(".pub")), "--principal", "127.0.0.1",
    )  # fmt: skip
    cert_file = tmp_path / "vm_host_key-cert.pub"
    cert_file.write_text(signed)
    trusted = await tool("tunnel-server", "ssh", "ca-keys", str(config))
    authority = next(line for line in trusted.splitlines() if line.startswith("@cert-author"))
    known_hosts = asyncssh.import_known_hosts(authority.replace(" * ", " 127.0.0.1 ") + "\n")
    # A VM presenting only an unsigned host key: refused, no prompt (asyncssh offers only
    # certificate host key types when its known_hosts holds only a CA).
    async with running_sshd(tmp_path / "plain") as plain:
        with pytest.raises((asyncssh.Error, ConnectionError)):
            async with asyncssh.connect(
                "127.0.0.1", plain.port, username=plain.user, client_keys=[str(plain.client_key)],
                known_hosts=known_hosts, agent_path=None, config=None,
            ):  # fmt: skip
                pass
    extra = [f"HostKey {vm_key}", f"HostCertificate {cert_file}"]
    async with running_sshd(tmp_path / "signed", extra=extra) as vm:
        async with asyncssh.connect(
            "127.0.0.1", vm.port, username=vm.user, client_keys=[str(vm.client_key)],
            known_hosts=known_hosts, agent_path=None, config=None,
        ) as conn:  # fmt: skip
            assert (await conn.run("true")).exit_status == 0
