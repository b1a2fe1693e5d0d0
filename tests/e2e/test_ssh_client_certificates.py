"""Keyless SSH, client side (issue 13), with real OpenSSH (ssh, sshd, ssh-agent) and asyncssh:
``tunnel-client ssh`` and plain ``ssh`` through a generated ssh-config log in to an sshd that
trusts only the relay's user CA (no authorized_keys anywhere), with the host certificate verified
against the relay's host CA and no prompt. Refused: a login name the policy does not grant, an
expired certificate, a revoked serial, a certificate used away from the relay's address, a CA
the VM no longer trusts, and a VM whose host key is not signed. The ephemeral key never reaches
the disk unencrypted."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

import tunnel_client
from tunnel_client.ssh_agent import running_agent
from tunnel_client.ssh_cert import Issued, ephemeral_key
from tunnel_server.app import RunningServer

from ..helpers import capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from .sshd import Sshd, keygen, missing_tools, running_sshd
from .test_openssh import RUN_TIMEOUT, Result
from .test_ssh_certificates import ca_key, tool

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools())),
]

CLIENT = [sys.executable, "-m", "tunnel_client"]


@dataclass
class Stack:
    relay: RunningServer
    vm: Sshd  # host key signed by the relay's host CA
    plain: Sshd  # unsigned host key
    rotated: Sshd  # trusts only a CA the relay does not sign with
    tmp: Path
    home: Path  # TUNNEL_CLIENT_HOME: the client's state and runtime files
    config: Path
    krl: Path
    token_file: Path
    issuer: TestIssuer
    audit: list[dict[str, Any]]

    def options(self, token_file: Path | None = None) -> list[str]:
        return [
            f"--server={self.relay.url}", "--project=p", "--zone=z",
            f"--access-token-file={token_file or self.token_file}",
            f"--ca-file={self.tmp / 'relay-cert.pem'}",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        # No TUNNEL_* settings, no agent of the user's: only what the test passes.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNEL_", "SSH_AUTH"))}
        return {**env, "TUNNEL_CLIENT_HOME": str(self.home)}

    async def run(self, argv: Sequence[str], env: dict[str, str] | None = None) -> Result:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env or self.env(),
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
        except TimeoutError:
            process.kill()
            out, err = await process.communicate()
            pytest.fail(f"{argv[:3]} timed out; stderr:\n{err.decode(errors='replace')}")
        assert process.returncode is not None
        return Result(process.returncode, out, err)

    async def ssh(self, destination: str, *remote: str, sshd: Sshd | None = None,
                  extra: Sequence[str] = (), token_file: Path | None = None,
                  ssh_options: Sequence[str] = ()) -> Result:  # fmt: skip
        """``tunnel-client ssh DESTINATION -- REMOTE``: no -i, no agent, no user config."""
        port = (sshd or self.vm).port
        return await self.run([
            *CLIENT, "ssh", destination, f"--port={port}", *self.options(token_file), *extra,
            "--", "-F", "none", "-o", "BatchMode=yes", *ssh_options, *remote,
        ])  # fmt: skip

    def sshd_log(self) -> str:
        return self.vm.log_text()


def _text(result: Result) -> str:
    return result.stderr.decode(errors="replace")


@pytest.fixture
async def stack(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[Stack]:
    user_ca, host_ca = ca_key(tmp_path / "user_ca"), ca_key(tmp_path / "host_ca")
    data = relay_config_data(issuer, tmp_path, instances={"vm1": 0, "plain": 0, "rotated": 0})
    data["access"][0]["logins"] = ["{email_local}", "root"]
    data["access"].append(
        {"members": ["user:dave@example.com"], "instances": ["p/z/vm1"], "ports": ["1-65535"]}
    )  # dave may reach the VM, but is granted no login name
    data["ssh"] = {
        "user_ca_key_file": str(user_ca), "host_ca_key_file": str(host_ca),
        "certificate_ttl": 600, "source_addresses": ["127.0.0.1/32"],
    }  # fmt: skip
    config = tmp_path / "relay.yaml"
    config.write_text(json.dumps(data))
    trusted = tmp_path / "trusted_user_ca.pub"
    trusted.write_text(await tool("tunnel-server", "ssh", "ca-keys", str(config)))
    krl = tmp_path / "revoked.krl"
    krl.write_bytes(b"")
    vm_key = keygen(tmp_path / "vm_host_key", "vm1")
    signed = tmp_path / "vm_host_key-cert.pub"
    signed.write_text(await tool(
        "tunnel-server", "ssh", "sign-host", str(config), "--host-key",
        str(vm_key.with_suffix(".pub")), "--principal", "vm1", "--principal", "rotated",
    ))  # fmt: skip
    other_ca = ca_key(tmp_path / "other_ca")
    token_file = tmp_path / "token"
    token_file.write_text(issuer.mint(lifetime=3600) + "\n")
    trust = [f"TrustedUserCAKeys {trusted}", f"RevokedKeys {krl}"]
    async with AsyncExitStack() as stack:
        vm = await stack.enter_async_context(running_sshd(
            tmp_path / "vm", authorized_keys=False,
            extra=[*trust, f"HostKey {vm_key}", f"HostCertificate {signed}"],
        ))  # fmt: skip
        plain = await stack.enter_async_context(
            running_sshd(tmp_path / "plain", authorized_keys=False, extra=trust)
        )
        rotated = await stack.enter_async_context(running_sshd(
            tmp_path / "rotated", authorized_keys=False,
            extra=[f"TrustedUserCAKeys {other_ca.with_suffix('.pub')}", f"HostKey {vm_key}",
                   f"HostCertificate {signed}"],
        ))  # fmt: skip
        relay = await stack.enter_async_context(start_relay(data))
        # Short: agent sockets live under it (pytest's tmp_path is too long for a socket path,
        # which would move them to the shared temporary directory).
        home = Path(tempfile.mkdtemp(prefix="tc-"))
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        yield Stack(relay, vm, plain, rotated, tmp_path, home, config, krl, token_file, issuer,
                    capture_audit(relay))  # fmt: skip


def direct(stack: Stack, key: Path, source: str) -> list[str]:
    """ssh straight to the VM (no relay) from ``source`` with the key and certificate files."""
    return ["ssh", "-F", "none", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-b", source, "-p", str(stack.vm.port),
            "root@127.0.0.1", "true"]  # fmt: skip


def _private_keys(home: Path) -> list[Path]:
    """Files under ``home`` that hold a private key in clear (OpenSSH or PEM)."""
    found = []
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink() and b"PRIVATE KEY" in path.read_bytes():
            found.append(path)
    return found


async def test_tunnel_client_ssh_logs_in_with_a_certificate_and_no_authorized_keys(
    stack: Stack,
) -> None:
    # While ssh runs, the remote side (the same machine) lists the client's runtime files:
    # the agent socket in a private directory, and no private key anywhere.
    probe = (
        f"find {stack.home} -type s -printf '%p %m\\n'; find {stack.home}/run/ssh -mindepth 1 "
        f"-maxdepth 1 -type d -printf '%p %m\\n'; grep -rlI -D skip 'PRIVATE KEY' {stack.home}; "
        "echo scanned; whoami"
    )
    result = (await stack.ssh("vm1", probe)).check()
    lines = result.stdout.decode().splitlines()
    assert lines[-2:] == ["scanned", "root"]
    sockets = [line for line in lines if line.endswith("agent.sock 600")]
    assert len(sockets) == 1, lines
    assert any(line.endswith(" 700") and "/run/ssh/ssh-" in line for line in lines), lines
    # Every line before "scanned" came from find: grep found no file with a private key.
    assert all(line.endswith((" 600", " 700")) for line in lines[:-2]), lines
    log = stack.sshd_log()
    assert "Accepted publickey for root" in log
    assert "ED25519-CERT" in log  # a certificate, not a key: there are no authorized_keys
    # The host certificate was verified with no prompt (BatchMode would refuse one), and the
    # client's known_hosts file holds only the relay's host CA line.
    (known_hosts,) = (stack.home / "ssh").glob("known_hosts-*")
    assert known_hosts.read_text().startswith("@cert-authority * ssh-ed25519 ")
    assert known_hosts.stat().st_mode & 0o777 == 0o600
    # On exit the agent is gone with its directory, and nothing holds a key.
    assert list((stack.home / "run" / "ssh").iterdir()) == []
    assert _private_keys(stack.home) == []


async def test_a_user_config_with_identities_only_still_uses_the_certificate(
    stack: Stack,
) -> None:
    config = stack.tmp / "user_ssh_config"
    config.write_text("Host *\n    IdentitiesOnly yes\n    IdentityFile /nonexistent/id\n")
    result = await stack.run([
        *CLIENT, "ssh", "vm1", f"--port={stack.vm.port}", *stack.options(), "--",
        "-F", str(config), "-o", "BatchMode=yes", "whoami",
    ])  # fmt: skip
    assert result.check().stdout == b"root\n"


async def test_without_a_host_ca_host_keys_are_checked_as_before(stack: Stack) -> None:
    certificates = stack.relay.relay.certificates
    assert certificates is not None
    certificates.ca.host_key = None  # the relay publishes no @cert-authority line now
    result = await stack.ssh("vm1", "whoami", extra=["--certificate"], ssh_options=[
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])  # fmt: skip
    assert result.check().stdout == b"root\n"
    assert "ED25519-CERT" in stack.sshd_log()
    assert not (stack.home / "ssh").exists()  # no known_hosts file without a host CA


async def test_sigterm_ends_ssh_and_cleans_up(stack: Stack) -> None:
    argv = [*CLIENT, "ssh", "vm1", f"--port={stack.vm.port}", *stack.options(), "--",
            "-F", "none", "-o", "BatchMode=yes", "echo ready; exec sleep 600"]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=stack.env(),
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(RUN_TIMEOUT):
        assert await process.stdout.readline() == b"ready\n"
        assert len(list((stack.home / "run" / "ssh").iterdir())) == 1  # the agent's directory
        process.terminate()
        await process.communicate()
    assert process.returncode != 0
    # The agent was stopped and its directory removed on the way out.
    assert list((stack.home / "run" / "ssh").iterdir()) == []


async def test_plain_ssh_through_the_generated_ssh_config(stack: Stack) -> None:
    config = stack.tmp / "ssh_config"
    (await stack.run([*CLIENT, "ssh-config", "vm1", *stack.options(), "--write", str(config)]))\
        .check()  # fmt: skip
    text = config.read_text()
    assert "--ssh-agent=" in text
    assert "IdentityAgent " in text
    assert "StrictHostKeyChecking yes" in text
    argv = ["ssh", "-F", str(config), "-o", "BatchMode=yes", "-p", str(stack.vm.port),
            "root@vm1", "echo", "hello"]  # fmt: skip
    for _ in range(2):  # a fresh certificate per connection
        result = (await stack.run(argv)).check()
        assert result.stdout == b"hello\n"
    assert stack.sshd_log().count("ED25519-CERT") >= 2
    issued = [r for r in stack.audit if r["event"] == "ssh_certificate"]
    assert len({r["serial"] for r in issued}) == 2
    # Tools that run OpenSSH with the config get a certificate the same way: scp.
    payload = stack.tmp / "payload"
    payload.write_bytes(os.urandom(4096))
    copy = ["scp", "-F", str(config), "-o", "BatchMode=yes", "-P", str(stack.vm.port),
            str(payload), f"root@vm1:{stack.tmp / 'copied'}"]  # fmt: skip
    (await stack.run(copy)).check()
    assert (stack.tmp / "copied").read_bytes() == payload.read_bytes()
    # A stale host CA line (the relay rotated its host CA since) is replaced by the
    # ProxyCommand before ssh reads the file: still no prompt, no failure.
    (known_hosts,) = (stack.home / "ssh").glob("known_hosts-*")
    current = known_hosts.read_text()
    stale = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    known_hosts.write_text(f"@cert-authority * {stale}")
    assert (await stack.run(argv)).check().stdout == b"hello\n"
    assert known_hosts.read_text() == current
    assert not any((stack.home / "run" / "ssh").glob("*.sock"))  # each agent removed its socket
    assert _private_keys(stack.home) == []


async def test_a_login_name_the_policy_does_not_grant_is_refused(stack: Stack) -> None:
    result = await stack.ssh("nobody@vm1", "true")
    assert result.returncode == 255, _text(result)
    assert "your certificate is for alice, root, not nobody" in _text(result)
    assert "Accepted publickey" not in stack.sshd_log()
    assert "Certificate invalid: name is not a listed principal" in stack.sshd_log()


async def test_a_member_granted_no_login_name(stack: Stack) -> None:
    dave = stack.tmp / "dave-token"
    dave.write_text(stack.issuer.mint(sub="dave", email="dave@example.com") + "\n")
    forced = await stack.ssh("vm1", "true", extra=["--certificate"], token_file=dave)
    assert forced.returncode == 1
    assert _text(forced).startswith("ERROR: No SSH certificate for dave@example.com to instance")
    assert "policy explain --reference" in _text(forced)
    # Auto: said on one line, then the user's own keys (there are none here: sshd refuses).
    auto = await stack.ssh("vm1", "true", token_file=dave)
    assert auto.returncode == 255
    assert "Using your own keys." in _text(auto)


async def test_an_expired_certificate_is_refused(stack: Stack) -> None:
    issuer = stack.relay.relay.certificates
    assert issuer is not None
    issuer.clock = lambda: time.time() - 3600  # issued an hour ago for 10 minutes
    # The client says so instead of letting sshd refuse it silently...
    result = await stack.ssh("vm1", "true")
    assert result.returncode == 1, _text(result)
    assert "expired or about to be" in _text(result)
    # ... and sshd refuses it, given one anyway.
    out = stack.tmp / "expired"
    written = await stack.run([*CLIENT, "ssh-cert", "vm1", f"--port={stack.vm.port}",
                               *stack.options(), "--out", str(out)])  # fmt: skip
    assert "WARNING: the certificate is expired" in _text(written.check())
    assert (await stack.run(direct(stack, out / "tunnel-vm1", "127.0.0.1"))).returncode == 255
    assert "Accepted publickey" not in stack.sshd_log()
    assert "Certificate invalid: expired" in stack.sshd_log()


async def test_a_certificate_from_a_ca_the_vm_dropped_is_refused(stack: Stack) -> None:
    result = await stack.ssh("rotated", "true", sshd=stack.rotated)
    assert result.returncode == 255, _text(result)
    log = stack.rotated.log_text()
    assert "Failed publickey for root" in log  # offered, after the host certificate passed
    assert "ED25519-CERT" in log
    assert "Accepted" not in log


async def test_an_unsigned_host_key_is_refused_with_a_clear_message(stack: Stack) -> None:
    result = await stack.ssh("plain", "true", sshd=stack.plain)
    assert result.returncode == 255
    assert "Host key verification failed." in _text(result)
    assert "did not present a host certificate signed by the relay's host CA" in _text(result)
    assert stack.plain.accepted() == 0


async def test_ssh_cert_for_other_tools_source_address_and_krl(stack: Stack) -> None:
    out = stack.tmp / "for-ansible"
    result = (
        await stack.run(
            [
                *CLIENT,
                "ssh-cert",
                "vm1",
                f"--port={stack.vm.port}",
                *stack.options(),
                "--out",
                str(out),
            ]
        )  # fmt: skip
    ).check()
    assert "Certificate for alice, root" in _text(result)
    key = out / "tunnel-vm1"
    for path in (key, out / "tunnel-vm1-cert.pub", out / "tunnel-vm1.pub"):
        assert path.stat().st_mode & 0o777 == 0o600
    serial = asyncssh.read_certificate(out / "tunnel-vm1-cert.pub")._serial  # type: ignore[attr-defined]

    # The relay's address (source-address 127.0.0.1/32) may use it; any other may not.
    (await stack.run(direct(stack, key, "127.0.0.1"))).check()
    elsewhere = await stack.run(direct(stack, key, "127.0.0.2"))
    assert elsewhere.returncode == 255
    assert "not from a permitted source address (127.0.0.2)" in stack.sshd_log()
    # Its serial in the VM's KRL: refused from then on.
    await tool("tunnel-server", "ssh", "krl", str(stack.config), "--serial", str(serial),
               "--output", str(stack.krl))  # fmt: skip
    revoked = await stack.run(direct(stack, key, "127.0.0.1"))
    assert revoked.returncode == 255
    assert stack.sshd_log().count("Accepted publickey") == 1


async def test_ssh_cert_to_stdout_and_into_an_agent(stack: Stack) -> None:
    argv = [*CLIENT, "ssh-cert", "vm1", f"--port={stack.vm.port}", *stack.options()]
    printed = (await stack.run(argv)).check().stdout.decode().splitlines()
    assert printed[0] == "-----BEGIN OPENSSH PRIVATE KEY-----"
    assert printed[-1].startswith("ssh-ed25519-cert-v01@openssh.com ")
    assert asyncssh.import_private_key("\n".join(printed[:-1]) + "\n")
    # --agent: into the user's running agent (here one of ours, started with a throw-away
    # certificate), then any ssh that uses the agent logs in with it; nothing is written.
    agent_dir = stack.tmp / "user-agent"
    async with running_agent(agent_dir / "agent.sock", _throwaway()) as socket_path:
        env = {**stack.env(), "SSH_AUTH_SOCK": str(socket_path)}
        added = (await stack.run([*argv, "--agent"], env=env)).check()
        assert added.stdout == b""
        assert "Added to the ssh-agent" in _text(added)
        login = ["ssh", "-F", "none", "-o", f"IdentityAgent={socket_path}", "-o", "BatchMode=yes",
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-p", str(stack.vm.port), "root@127.0.0.1", "true"]  # fmt: skip
        (await stack.run(login, env=env)).check()
        assert [p.name for p in agent_dir.iterdir()] == ["agent.sock"]


def _throwaway() -> Issued:
    ca, key = asyncssh.generate_private_key("ssh-ed25519"), ephemeral_key()
    now = int(time.time())
    cert = ca.generate_user_certificate(key, "x", principals=["x"], valid_before=now + 600)
    text = cert.export_certificate().decode().strip()
    return Issued(key, asyncssh.import_certificate(text), text, ("x",), now + 600)


async def test_asyncssh_through_the_tunnel_with_the_issued_certificate(stack: Stack) -> None:
    client = tunnel_client.Client(
        stack.relay.url, token=stack.issuer.mint(lifetime=900), project="p", zone="z",
        ca_file=stack.tmp / "relay-cert.pem",
    )  # fmt: skip
    issued = await client.ssh_certificate(client.instance("vm1", stack.vm.port))
    ca = await client.ssh_ca()
    assert ca is not None
    assert ca.host_ca is not None
    tunnel = client.asyncssh_tunnel()
    async with asyncssh.connect(
        "vm1", stack.vm.port, tunnel=tunnel, username="root",
        client_keys=[(issued.key, issued.certificate)],
        known_hosts=asyncssh.import_known_hosts(ca.host_ca + "\n"), agent_path=None, config=None,
    ) as conn:  # fmt: skip
        assert (await conn.run("whoami", check=True)).stdout == "root\n"
    tunnel.close()
    assert "ED25519-CERT" in stack.sshd_log()
