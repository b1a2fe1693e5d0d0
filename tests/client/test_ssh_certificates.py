"""The client's certificate parts without sshd: the relay's answers as typed errors (a real relay
in this process), the CA document, the ssh options and ssh-config lines (parsed by the real
``ssh -G``), the known_hosts file, and the private agent (a real ``ssh-agent``)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tunnel_client import cli_ssh
from tunnel_client.errors import TunnelFailed, Unauthorized
from tunnel_client.launchers import (
    CertificateLogin,
    LauncherError,
    TunnelArgs,
    ssh_argv,
    ssh_config_block,
)
from tunnel_client.session import ConnectOptions
from tunnel_client.ssh_agent import AgentError, private_dir, running_agent
from tunnel_client.ssh_cert import (
    CaKeys,
    CertificateRefused,
    Issued,
    ephemeral_key,
    fetch_ca,
    issue,
    known_hosts_path,
    write_known_hosts,
)
from tunnel_protocol.urls import InstanceTarget
from tunnel_server.app import RunningServer

from ..helpers import UNIT, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..server.test_relay import client_ssl

SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
SSH_AGENT = shutil.which("ssh-agent")
HOST_CA = "@cert-authority * ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHost tunnel-host-ca"


# -- the relay's answers ---------------------------------------------------------------------


def _ca_file(path: Path) -> Path:
    assert SSH_KEYGEN is not None
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True, capture_output=True, timeout=200 * UNIT,
    )  # fmt: skip
    return path


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    if SSH_KEYGEN is None:
        pytest.skip("ssh-keygen not installed")
    data = relay_config_data(issuer, tmp_path)
    data["access"][0]["logins"] = ["{email_local}"]
    data["access"].append({"members": ["user:dave@example.com"], "instances": ["p/z/vm1"],
                           "ports": ["22"]})  # fmt: skip
    data["ssh"] = {"user_ca_key_file": str(_ca_file(tmp_path / "user_ca"))}
    async with start_relay(data) as server:
        yield server


def _options(server: RunningServer, tmp_path: Path, token: str) -> ConnectOptions:
    async def provide() -> str:
        return token

    return ConnectOptions(
        server=server.url, target=InstanceTarget("p", "z", "vm1", "nic0", 22), token=provide,
        ssl_context=client_ssl(tmp_path), open_timeout=100 * UNIT,
    )  # fmt: skip


async def test_issue_and_the_published_ca(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    options = _options(relay, tmp_path, issuer.mint(lifetime=900))
    ca = await fetch_ca(options)
    assert ca is not None
    assert len(ca.user_ca) == 1
    assert ca.host_ca is None  # no host CA configured
    key = ephemeral_key()
    issued = await issue(options, key)
    assert issued.principals == ("alice",)
    assert issued.key is key
    assert 0 < issued.remaining() <= 3600
    assert issued.usable()


async def test_refusals_are_typed_and_say_what_to_do(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    dave = _options(relay, tmp_path, issuer.mint(sub="dave", email="dave@example.com"))
    with pytest.raises(CertificateRefused) as refused:
        await issue(dave, ephemeral_key())
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("No SSH certificate for dave@example.com to instance vm1 port 22")
    assert "tunnel-server policy explain --reference" in lines[1]
    assert refused.value.code == 403
    with pytest.raises(Unauthorized):
        await issue(_options(relay, tmp_path, "not-a-token"), ephemeral_key())


async def test_a_relay_without_ssh_certificates(issuer: TestIssuer, tmp_path: Path) -> None:
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        options = _options(server, tmp_path, issuer.mint(lifetime=900))
        assert await fetch_ca(options) is None
        # auto: the user's own keys; --certificate: an error naming the relay
        assert await cli_ssh.prepare(options, None) is None
        with pytest.raises(CertificateRefused, match="issues no SSH certificates"):
            await cli_ssh.prepare(options, True)
        with pytest.raises(CertificateRefused) as refused:
            await issue(options, ephemeral_key())
        assert refused.value.code == 404


async def test_auto_mode_falls_back_when_no_login_is_granted(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    dave = _options(relay, tmp_path, issuer.mint(sub="dave", email="dave@example.com"))
    said: list[str] = []
    assert await cli_ssh.prepare(dave, None, said.append) is None
    assert said[0].startswith("No SSH certificate for dave@example.com")
    assert said[0].endswith("Using your own keys.")
    assert await cli_ssh.prepare(dave, False, said.append) is None
    assert len(said) == 1  # --no-certificate asks nothing


def test_ca_document_parsing() -> None:
    text = "ssh-ed25519 AAAA1 tunnel-user-ca\nssh-ed25519 AAAA2 tunnel-user-ca-previous\n" + HOST_CA
    keys = CaKeys.parse(text + "\n")
    assert keys.user_ca == ("ssh-ed25519 AAAA1 tunnel-user-ca",
                            "ssh-ed25519 AAAA2 tunnel-user-ca-previous")  # fmt: skip
    assert keys.host_ca == HOST_CA
    assert CaKeys.parse("ssh-ed25519 AAAA1 x\n").host_ca is None


# -- what ssh is told ----------------------------------------------------------------------


def _issued(principals: tuple[str, ...] = ("alice", "deploy"), ttl: int = 600) -> Issued:
    ca = asyncssh.generate_private_key("ssh-ed25519")
    key = ephemeral_key()
    now = int(time.time())
    cert = ca.generate_user_certificate(
        key, "test", principals=list(principals), valid_after=now - 60, valid_before=now + ttl
    )
    text = cert.export_certificate().decode().strip()
    return Issued(key, asyncssh.import_certificate(text), text, principals, now + ttl)


def test_ssh_argv_with_a_certificate() -> None:
    login = CertificateLogin("/run/u/ssh/a%b/agent.sock", "/home/u/kh")
    argv = ssh_argv("VM1", ["true"], TunnelArgs(zone="z"), certificate=login)
    options = [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]
    assert "IdentityAgent=/run/u/ssh/a%%b/agent.sock" in options  # ssh expands %-tokens
    assert "UserKnownHostsFile=/home/u/kh" in options
    assert "StrictHostKeyChecking=yes" in options
    assert "GlobalKnownHostsFile=none" in options
    # The host certificate names the instance; ssh compares lower-cased.
    assert [o for o in options if o.startswith("HostKeyAlias=")] == ["HostKeyAlias=vm1"]
    # Without a host CA: the agent only, and the usual per-project alias.
    argv = ssh_argv("vm1", [], TunnelArgs(zone="z"), certificate=CertificateLogin("/r/a.sock"))
    options = [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]
    assert "StrictHostKeyChecking=yes" not in options
    assert "HostKeyAlias=tunnel-client:zone=z:instance=vm1" in options
    with pytest.raises(LauncherError, match="absolute path"):
        ssh_argv("vm1", [], TunnelArgs(), certificate=CertificateLogin("/a b/agent.sock"))
    with pytest.raises(LauncherError, match="absolute path"):
        ssh_argv("vm1", [], TunnelArgs(), certificate=CertificateLogin("relative.sock"))


@pytest.mark.skipif(SSH is None, reason="OpenSSH client not installed")
def test_generated_ssh_config_as_ssh_reads_it(tmp_path: Path) -> None:
    login = CertificateLogin("/run/user/1/identity-tunnel/ssh/agent-0123.sock", "/s/kh-relay")
    block = ssh_config_block(
        [("vm1", TunnelArgs(zone="z")), ("db-1", TunnelArgs(zone="z"))],
        client=["/usr/bin/tunnel-client"], certificates={"vm1": login},
    )  # fmt: skip
    assert "--ssh-agent=/run/user/1/identity-tunnel/ssh/agent-0123.sock" in block
    config = tmp_path / "config"
    config.write_text(block)
    assert SSH is not None

    def resolved(host: str) -> dict[str, str]:
        out = subprocess.run([SSH, "-G", "-F", str(config), host], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    vm = resolved("vm1")
    assert vm["identityagent"] == login.agent_socket
    assert vm["identitiesonly"] == "no"
    assert vm["userknownhostsfile"] == "/s/kh-relay"
    assert vm["stricthostkeychecking"] == "true"
    assert vm["hostkeyalias"] == "vm1"
    assert "--ssh-agent=" in vm["proxycommand"]
    db = resolved("db-1")  # no certificate for this one: as before
    assert "identityagent" not in db or db["identityagent"] != login.agent_socket
    assert db["hostkeyalias"] == "tunnel-client:zone=z:instance=db-1"
    assert "--ssh-agent" not in db["proxycommand"]


def test_default_login_and_expiry() -> None:
    said: list[str] = []
    issued = _issued(("deploy-user-that-is-not-local",))
    assert cli_ssh.default_login("bob", issued, said.append) == "bob"
    assert said == ["Warning: your certificate is for deploy-user-that-is-not-local, not bob: "
                    "sshd will refuse it."]  # fmt: skip
    said.clear()
    assert cli_ssh.default_login(None, issued, said.append, ["-l", "carol"]) is None
    assert said == []  # ssh's -l decides
    assert cli_ssh.default_login(None, issued, said.append) == "deploy-user-that-is-not-local"
    assert said == ["Logging in as deploy-user-that-is-not-local (your certificate's first "
                    "login name)."]  # fmt: skip
    assert cli_ssh.usable(issued) is issued
    with pytest.raises(TunnelFailed, match="check the clocks"):
        cli_ssh.usable(_issued(ttl=-10))


def test_known_hosts_file(tmp_path: Path) -> None:
    path = known_hosts_path("wss://relay.example.com:8443/", tmp_path / "ssh")
    assert path.name == "known_hosts-relay.example.com_8443"
    write_known_hosts(path, HOST_CA)
    assert path.read_text() == HOST_CA + "\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    write_known_hosts(path, HOST_CA.replace("Host", "New"))  # the relay's host CA changed
    assert "New" in path.read_text()


# -- the agent -------------------------------------------------------------------------------

needs_agent = pytest.mark.skipif(SSH_AGENT is None, reason="ssh-agent not installed")


async def _identities(path: Path) -> list[str]:
    agent = await asyncssh.connect_agent(str(path))
    try:
        return [key.get_comment() or key.algorithm.decode() for key in await agent.get_keys()]
    finally:
        agent.close()
        await agent.wait_closed()


@needs_agent
async def test_agent_serves_the_certificate_then_goes(tmp_path: Path) -> None:
    socket_path = tmp_path / "run" / "agent.sock"
    issued = _issued()
    async with running_agent(socket_path, issued) as path:
        assert path == socket_path
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        agent = await asyncssh.connect_agent(str(path))
        keys = await agent.get_keys()
        agent.close()
        await agent.wait_closed()
        # The certificate first (ssh offers it first), and the key it certifies.
        assert [k.algorithm for k in keys] == [b"ssh-ed25519-cert-v01@openssh.com",
                                               b"ssh-ed25519"]  # fmt: skip
        assert keys[0].public_data == issued.certificate.public_data
        assert keys[1].public_data == issued.key.public_data
        # Only a socket in the directory: the key is in the agent's memory.
        assert [p.name for p in path.parent.iterdir()] == ["agent.sock"]
    assert list(socket_path.parent.iterdir()) == []


@needs_agent
async def test_a_newer_agent_replaces_the_socket_and_keeps_it(tmp_path: Path) -> None:
    socket_path = tmp_path / "agent.sock"
    first_in = asyncio.Event()
    first_done = asyncio.Event()
    second_in = asyncio.Event()

    async def first() -> None:
        async with running_agent(socket_path, _issued()):
            first_in.set()
            await second_in.wait()
        first_done.set()

    task = asyncio.create_task(first())
    await first_in.wait()
    second = _issued()
    async with running_agent(socket_path, second):
        second_in.set()
        await first_done.wait()
        await task
        # The first agent left; the path still serves the second one's certificate.
        agent = await asyncssh.connect_agent(str(socket_path))
        keys = await agent.get_keys()
        agent.close()
        await agent.wait_closed()
        assert keys[0].public_data == second.certificate.public_data
    assert not socket_path.exists()


async def test_a_missing_ssh_agent_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="ssh-agent did not start"):
        async with running_agent(tmp_path / "a.sock", _issued(), binary="/bin/false"):
            pass


@pytest.fixture
def short_home() -> Iterator[Path]:
    """A client home short enough for socket paths (pytest's tmp_path is not)."""
    home = Path(tempfile.mkdtemp(prefix="tc-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_runtime_dirs_follow_the_client_home(short_home: Path) -> None:
    tmp_path = short_home
    environ = {"TUNNEL_CLIENT_HOME": str(tmp_path)}
    socket_path = cli_ssh.agent_socket_for("tunnel-client:zone=z:instance=vm1", environ)
    assert socket_path.parent == tmp_path / "run" / "ssh"
    assert len(str(socket_path.relative_to(tmp_path))) < 40  # Unix socket paths are short
    other = cli_ssh.agent_socket_for("tunnel-client:zone=y:instance=vm1", environ)
    assert other != socket_path
    assert cli_ssh.ssh_state_dir(environ) == tmp_path / "ssh"


# -- command line ----------------------------------------------------------------------------


def test_certificate_options_usage_errors() -> None:
    from .test_cli import SERVER, invoke, usage_error

    assert "--ssh-agent needs --listen-on-stdin" in usage_error(
        invoke("start-tunnel", "vm1", "22", "--zone=z", *SERVER, "--ssh-agent=/tmp/a.sock")
    )
    assert "--out conflicts with --agent" in usage_error(
        invoke("ssh-cert", "vm1", "--zone=z", *SERVER, "--out=/tmp/x", "--agent")
    )
    assert "SSH_AUTH_SOCK is not set" in usage_error(
        invoke("ssh-cert", "vm1", "--zone=z", *SERVER, "--agent", SSH_AUTH_SOCK=None)
    )
    # --no-certificate: ssh-config asks the relay nothing and writes the block as before.
    result = invoke("ssh-config", "vm1", "--zone=z", *SERVER, "--no-certificate")
    assert result.exit_code == 0, result.output
    assert "IdentityAgent" not in result.stdout
    assert "--ssh-agent" not in result.stdout


def test_ssh_config_auto_without_a_reachable_relay(tmp_path: Path) -> None:
    from .test_cli import invoke

    result = invoke("ssh-config", "vm1", "--zone=z", "--server=wss://127.0.0.1:1",
                    TUNNEL_CLIENT_HOME=str(tmp_path))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Writing the block without certificates." in result.stderr
    assert "IdentityAgent" not in result.stdout


async def test_ssh_config_auto_with_a_relay_that_issues_certificates(
    relay: RunningServer, tmp_path: Path, short_home: Path
) -> None:
    from .test_cli import invoke

    def generate() -> Any:
        return invoke("ssh-config", "vm1", "--project=p", "--zone=z", f"--server={relay.url}",
                      f"--ca-file={tmp_path / 'relay-cert.pem'}",
                      TUNNEL_CLIENT_HOME=str(short_home))  # fmt: skip

    result = await asyncio.to_thread(generate)  # the relay serves in this loop meanwhile
    assert result.exit_code == 0, result.output
    socket_path = short_home / "run" / "ssh"
    assert f"IdentityAgent {socket_path}/agent-" in result.stdout
    assert f"--ssh-agent={socket_path}/agent-" in result.stdout
    assert "StrictHostKeyChecking" not in result.stdout  # this relay has no host CA


def test_an_unusable_runtime_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AgentError, match="cannot create .* for the ssh-agent"):
        private_dir(blocker / "ssh")
    other = tmp_path / "open"
    other.mkdir(mode=0o755)
    other.chmod(0o755)
    assert private_dir(other).stat().st_mode & 0o777 == 0o700  # tightened, not refused


def test_agent_sockets_move_out_of_a_long_runtime_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 80)
    socket_path = cli_ssh.agent_socket_for("alias", {"TUNNEL_CLIENT_HOME": str(deep)})
    assert len(str(socket_path)) < 90
    assert socket_path.parent.name.startswith("tunnel-client-")
