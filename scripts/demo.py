"""``make demo``: the whole stack on loopback until Ctrl-C: the development identity provider
(deploy/dev-idp), an unprivileged sshd as the demo target and the relay in front of it.
``--check`` starts everything, runs the printed commands end to end, stops and exits 0 or 1.
State (keys, certificate, relay.yaml, logs) lives in ``.demo/``; see docs/demo.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fcntl
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import IO
from urllib.parse import urljoin

import aiohttp
import yaml
from cryptography import x509

ROOT = Path(__file__).resolve().parents[1]
IDP_SERVER = ROOT / "deploy" / "dev-idp" / "server.js"
BIN = Path(sys.executable).parent
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
PROJECT, ZONE, INSTANCE = "demo", "demo-zone", "demo-vm"
RELAY_PORT = 8443  # when free; any free port otherwise
LOCAL_PORT = 2222  # start-tunnel's example local port
PASSWORD = "demo-password"
USERS = (
    ("alice@example.com", "groups ops, dev: allowed"),
    ("bob@example.com", "group dev: denied"),
    ("mallory@example.com", "no groups: denied"),
)
START_TIMEOUT = 30.0  # each service, to ready
STOP_TIMEOUT = 5.0  # each service, SIGTERM to exit (then SIGKILL)
STEP_TIMEOUT = 60.0  # each --check step


class DemoError(Exception):
    """The demo cannot start, a service died or a check failed; the message says why."""


@dataclass
class Service:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def show(path: Path) -> str:
    """``path`` as printed: relative to the repository root (commands run from there)."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def free_port(preferred: int = 0) -> int:
    for port in dict.fromkeys((preferred, 0)):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(OSError):
                sock.bind(("127.0.0.1", port))
                return int(sock.getsockname()[1])
    raise DemoError("no free port on 127.0.0.1")


def tool(name: str, path: str | None = None) -> str:
    found = shutil.which(name, path=path)
    if found is None:
        raise DemoError(f"{name} is not installed (make system-deps installs it)")
    return found


# -- processes: each in its own process group, stopped through the exit stack ----------------


async def spawn(
    stack: contextlib.AsyncExitStack, name: str, argv: Sequence[str], log: Path, pipes: bool = False
) -> Service:
    """Start ``argv`` (stderr to ``log``; stdin/stdout piped when ``pipes``) and register its
    stop on ``stack``."""
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipes else out,
            stderr=out,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the services in order
        )
    service = Service(name, process, log)
    stack.push_async_callback(stop, service)
    return service


async def stop(service: Service) -> None:
    """SIGTERM to the process group, SIGKILL after STOP_TIMEOUT."""
    process = service.process
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.returncode is not None:  # reaped: its pid may not be ours any more
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
    if process.stdin is not None:
        process.stdin.close()


async def wait_ready(service: Service, ready: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``ready`` until true; DemoError when the service exits or START_TIMEOUT passes."""
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + START_TIMEOUT, 0.05
    while not await ready():
        code = service.process.returncode
        if code is not None:
            raise DemoError(f"{service.name} exited with {code}:\n{service.tail()}")
        if loop.time() > deadline:
            raise DemoError(f"{service.name} not ready after {START_TIMEOUT:.0f} s:\n{service.tail()}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await service.process.wait()
        delay = min(delay * 2, 0.5)


async def start_idp(stack: contextlib.AsyncExitStack, state: Path) -> tuple[Service, str]:
    if not (IDP_SERVER.parent / "node_modules" / "oidc-provider").is_dir():
        raise DemoError("deploy/dev-idp/node_modules is missing: run make system-deps")
    argv = [tool("node"), str(IDP_SERVER), "--host", "127.0.0.1", "--port", "0"]
    argv.append("--exit-on-stdin-close")  # it also stops if we die without cleaning up
    service = await spawn(stack, "identity provider", argv, state / "idp.log", pipes=True)
    assert service.process.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT):
            line = await service.process.stdout.readline()
        return service, str(json.loads(line)["issuer"])
    except (TimeoutError, ValueError, KeyError, TypeError):
        raise DemoError(f"the identity provider did not start:\n{service.tail()}") from None


# -- the SSH target ---------------------------------------------------------------------------


def keygen(path: Path, comment: str) -> None:
    if not path.exists():  # kept across runs, so known_hosts and printed commands stay valid
        argv = [tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
        subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)


def sshd_config(state: Path, port: int, user: str) -> Path:
    server, client = state / "sshd", state / "ssh"
    for directory in (server, client):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    keygen(server / "ssh_host_ed25519_key", "identity-tunnel-demo-host")
    keygen(client / "id_ed25519", f"{user}@identity-tunnel-demo")
    authorized = server / "authorized_keys"
    authorized.write_bytes((client / "id_ed25519.pub").read_bytes())
    if os.geteuid() == 0:  # sshd's privilege separation directory
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {server / 'ssh_host_ed25519_key'}",
        f"AuthorizedKeysFile {authorized}",
        f"AllowUsers {user}",
        *("PidFile none", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password"),
        *("PasswordAuthentication no", "KbdInteractiveAuthentication no", "UseDNS no"),
        *("AllowTcpForwarding no", "AllowAgentForwarding no", "X11Forwarding no"),
        *("PrintMotd no", "LogLevel VERBOSE", "Subsystem sftp internal-sftp"),
    ]
    config = server / "sshd_config"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


async def ssh_banner(port: int) -> bool:
    """True when an SSH server answers on 127.0.0.1:``port``."""
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                return (await reader.readline()).startswith(b"SSH-2.0-")
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False


async def start_sshd(stack: contextlib.AsyncExitStack, state: Path, user: str) -> Service:
    sshd = tool("sshd", SBIN_PATH)  # an absolute path: sshd re-executes itself
    for attempt in range(3):
        port = free_port()
        config = sshd_config(state, port, user)
        service = await spawn(stack, "sshd", [sshd, "-D", "-e", "-f", str(config)], state / "sshd.log")

        async def ready(service: Service = service, port: int = port) -> bool:
            listening = f"Server listening on 127.0.0.1 port {port}." in service.tail(50)
            return listening and await ssh_banner(port)

        try:
            await wait_ready(service, ready)
            return service
        except DemoError:
            if attempt == 2 or "Address already in use" not in service.tail():
                raise
    raise AssertionError("unreachable")


# -- the relay --------------------------------------------------------------------------------


def certificate_expiring(cert: Path) -> bool:
    """True when ``cert`` is missing, unreadable or expires within a day (it lasts 30 days)."""
    try:
        expires = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    except (OSError, ValueError):
        return True
    return expires - datetime.datetime.now(datetime.UTC) < datetime.timedelta(days=1)


def relay_config(state: Path, issuer: str, relay_port: int, ssh_port: int) -> Path:
    cert, key = state / "relay-cert.pem", state / "relay-key.pem"
    if not key.exists() or certificate_expiring(cert):  # the relay writes a new pair
        cert.unlink(missing_ok=True)
        key.unlink(missing_ok=True)
    data = {
        "listen": {"host": "127.0.0.1", "port": relay_port},
        "tls": {"cert_file": cert.name, "key_file": key.name, "self_signed": True},
        "oidc": {"issuer": issuer, "audiences": ["tunnel"]},
        "login": {"issuer": issuer, "client_id": "tunnel-cli", "resource": "urn:identity-tunnel:relay"},
        "inventory": {
            "instances": [{"project": PROJECT, "zone": ZONE, "name": INSTANCE, "address": "127.0.0.1"}]
        },
        "access": [
            {
                "members": ["group:ops", "user:alice@example.com"],
                "instances": [f"{PROJECT}/{ZONE}/{INSTANCE}"],
                "ports": [ssh_port],
            }
        ],
        "log_format": "text",
    }
    path = state / "relay.yaml"
    header = "# Written by scripts/demo.py (make demo) on every start.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


async def start_relay(stack: contextlib.AsyncExitStack, state: Path, config: Path, port: int) -> Service:
    server = BIN / "tunnel-server"
    argv = [str(server)] if server.exists() else [sys.executable, "-m", "tunnel_server"]
    service = await spawn(stack, "relay", [*argv, "serve", "--config", str(config)], state / "relay.log")
    cert = state / "relay-cert.pem"
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def ready() -> bool:
            try:  # the relay writes the certificate when it starts
                context = ssl.create_default_context(cafile=str(cert))
                async with session.get(f"https://127.0.0.1:{port}/readyz", ssl=context) as answer:
                    return answer.status == 200
            except (OSError, ssl.SSLError, aiohttp.ClientError, TimeoutError):
                return False

        await wait_ready(service, ready)
    return service


# -- what the user runs -----------------------------------------------------------------------


@dataclass
class Demo:
    state: Path
    issuer: str
    relay_port: int
    ssh_port: int
    user: str
    services: list[Service] = field(default_factory=list)

    @property
    def relay_url(self) -> str:
        return f"wss://127.0.0.1:{self.relay_port}"

    @property
    def ca_file(self) -> Path:
        return self.state / "relay-cert.pem"

    def env(self) -> dict[str, str]:
        """What the printed ``export`` line sets."""
        return {
            "TUNNEL_SERVER": self.relay_url,
            "TUNNEL_CA_FILE": str(self.ca_file),
            "TUNNEL_PROJECT": PROJECT,
        }

    def export_line(self) -> str:
        ca = show(self.ca_file)
        ca = ca if ca.startswith("/") else f"$PWD/{ca}"
        env = self.env() | {"TUNNEL_CA_FILE": ca}
        return "export " + " ".join(f"{name}={value}" for name, value in env.items())

    def client(self, *args: str) -> list[str]:
        return [show(BIN / "tunnel-client"), *args]

    def ssh_options(self) -> list[str]:
        ssh = self.state / "ssh"
        return [
            *("-i", show(ssh / "id_ed25519"), "-o", "IdentitiesOnly=yes"),
            *("-o", f"UserKnownHostsFile={show(ssh / 'known_hosts')}"),
            *("-o", "StrictHostKeyChecking=accept-new"),
        ]

    def login(self) -> list[str]:
        return self.client("login")

    def ssh(self) -> list[str]:
        port = str(self.ssh_port)
        args = ("ssh", INSTANCE, "--zone", ZONE, "--port", port, "--user", self.user, "--")
        return self.client(*args, *self.ssh_options())

    def tunnel(self, local: str = f"localhost:{LOCAL_PORT}") -> list[str]:
        args = ("start-tunnel", INSTANCE, str(self.ssh_port), "--zone", ZONE)
        return self.client(*args, f"--local-host-port={local}")

    def local_ssh(self) -> list[str]:
        return ["ssh", "-p", str(LOCAL_PORT), *self.ssh_options(), f"{self.user}@localhost"]


def instructions(demo: Demo) -> str:
    logs = " ".join(show(service.log) for service in demo.services)
    users = [f"{email} ({note})" for email, note in USERS]
    return "\n".join(
        [
            "",
            "identity-tunnel demo",
            f"  relay     {demo.relay_url}  (self-signed certificate {show(demo.ca_file)})",
            f"  IdP       {demo.issuer}  password for every user: {PASSWORD}",
            *(f"            {user}" for user in users),
            f"  target    {PROJECT}/{ZONE}/{INSTANCE}: SSH as {demo.user}, only through the relay",
            f"  logs      {logs}",
            "",
            "In another terminal:",
            f"  cd {shlex.quote(str(ROOT))}",
            f"  {demo.export_line()}",
            "  # 1. log in (a browser, or the device flow with --no-browser / without a display)",
            f"  {shlex.join(demo.login())}",
            "  # 2. SSH to the demo VM through the relay",
            f"  {shlex.join(demo.ssh())}",
            "  # 3. or forward a local port, and from a third terminal ssh to it",
            f"  {shlex.join(demo.tunnel())}",
            f"  {shlex.join(demo.local_ssh())}",
            "",
        ]
    )
