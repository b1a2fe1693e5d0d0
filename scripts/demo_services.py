"""The demo's services and their files: the development identity provider, the demo VM (an
unprivileged sshd), the demo web app and the relay, each started, awaited and stopped here.

``start`` brings the whole stack up in one state directory and returns a ``Demo``; the exit
stack it is given stops every service in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import pwd
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from string import Template

import aiohttp
from cryptography import x509

from . import demo_certs

ROOT = Path(__file__).resolve().parents[1]
IDP_SERVER = ROOT / "deploy" / "dev-idp" / "server.js"
BIN = Path(sys.executable).parent
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
PROJECT, ZONE, INSTANCE = "demo", "demo-zone", "demo-vm"
RELAY_PORT = 8443  # when free, else any free port
LOCAL_PORT = 2222  # the local end of the printed start-tunnel command
HTTP_PORT = 8080  # HTTP mode's listener when free, else any free port
ADMIN_PORT = 8444  # the admin listener (API and console) when free, else any free port
WEB_APP = "demo"  # the HTTP-mode route: policy resource app:demo, host demo.localhost
WEB_CLIENT, WEB_SECRET = "tunnel-web", "tunnel-web-secret"  # the dev IdP's confidential client
PASSWORD = "demo-password"
ALICE = "alice@example.com"
START_TIMEOUT = 30.0  # per service, until ready
STOP_TIMEOUT = 5.0  # per service, from SIGTERM to SIGKILL

SSHD_OPTIONS = (  # besides Port, HostKey, AllowUsers and the certificate lines
    *("ListenAddress 127.0.0.1", "PermitRootLogin prohibit-password", "UsePAM no"),
    *("PasswordAuthentication no", "KbdInteractiveAuthentication no", "StrictModes no"),
    *("AllowTcpForwarding no", "AllowAgentForwarding no", "X11Forwarding no", "PidFile none"),
    *("UseDNS no", "LogLevel VERBOSE", "Subsystem sftp internal-sftp"),
)
RELAY_CONFIG = Template("""\
# Written by scripts/demo_services.py on every start.
listen: {host: 127.0.0.1, port: $relay_port}
tls: {cert_file: relay-cert.pem, key_file: relay-key.pem, self_signed: true}
oidc: {issuer: "$issuer", audiences: [tunnel]}
login: {issuer: "$issuer", client_id: tunnel-cli, resource: "urn:identity-tunnel:relay"}
inventory:
  instances:
    - {project: $project, zone: $zone, name: $instance, address: 127.0.0.1}
access:  # merged with policy.yaml (the web app's binding)
  - members: [group:ops, user:alice@example.com]
    instances: [$project/$zone/$instance]
    ports: [$ssh_port]
    logins: [$login]  # SSH certificates for the sshd's only user (scripts/demo_certs.py)
policy_file: policy.yaml
http:
  listen: {host: 127.0.0.1, port: $http_port}
  external_scheme: http
  issuer_url: "http://127.0.0.1:$http_port"  # the demo app fetches the JWKS from here
  routes:
    - name: $app
      host: $app.localhost
      upstream: "http://127.0.0.1:$web_port"
      audiences: [tunnel]  # the dev IdP's access tokens (users and svc-backup)
  login: {issuer: "$issuer", client_id: $web_client, client_secret: $web_secret}
admin:  # the admin API and the console (docs/console.md): group ops (alice) are admins
  listen: {host: 127.0.0.1, port: $admin_port}
  members: [group:ops]
  console:
    external_url: "http://127.0.0.1:$admin_port"
    login: {issuer: "$issuer", client_id: $web_client, client_secret: $web_secret}
audit_store: {path: audit.db}
log_format: text
""")
POLICY = Template("""\
# Written by scripts/demo_services.py on every start; the relay's inline access: (SSH) is merged in.
bindings:
  - name: demo-web
    members: [group:ops]
    role: webUser
    resources: {apps: [$app]}
""")


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
    """``path`` as printed: relative to the repository root, where the commands run."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def _unclaimable_ports() -> range:
    """Ports below the kernel's ephemeral range: a port found by binding port 0 is an ephemeral
    one, and an outgoing connection may take it before the service it was chosen for binds it
    (seen as "port already in use" on busy machines); below the range only an explicit bind can."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, low) if low - 10000 >= 1000 else range(0)


def free_port(preferred: int = 0) -> int:
    """``preferred`` when it is free, else a free port outside the ephemeral range (else any)."""
    pool = _unclaimable_ports()
    candidates = [preferred] if preferred else []
    candidates += random.sample(pool, min(50, len(pool))) + [0]
    for port in candidates:
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            return int(sock.getsockname()[1])
    raise DemoError("no free port on 127.0.0.1")


def tool(name: str, path: str | None = None) -> str:
    found = shutil.which(name, path=path)
    if found is None:
        raise DemoError(f"{name} is not installed (make system-deps installs it)")
    return found


# -- configuration files ----------------------------------------------------------------------


def keygen(path: Path, comment: str) -> None:
    if not path.exists():  # kept across runs: known_hosts and the printed commands stay valid
        argv = [tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
        subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)


def sshd_config(state: Path, port: int, user: str) -> Path:
    """All of the demo VM's sshd setup: the host key in <state>/sshd, signed by the demo host CA
    for the instance name, and sshd_config: logins by the relay's certificates only, for
    ``user`` (no authorized_keys; scripts/demo_certs.py). Keys are kept across runs."""
    server, client = state / "sshd", state / "ssh"
    for directory in (server, client):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    keygen(server / "ssh_host_ed25519_key", "identity-tunnel-demo-host")
    if os.geteuid() == 0:  # sshd's privilege separation directory
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    lines = [f"Port {port}", f"HostKey {server}/ssh_host_ed25519_key", *SSHD_OPTIONS]
    lines += demo_certs.sshd_lines(state, server / "ssh_host_ed25519_key", INSTANCE)
    lines.append(f"AllowUsers {user}")
    config = server / "sshd_config"
    config.write_text("\n".join(["# Written by scripts/demo_services.py", *lines, ""]), "utf-8")
    return config


def sshd_port(state: Path) -> int:
    """The port of the last run when it is still free, so the printed ``--port``, the relay's
    allowed port and known_hosts entries stay the same across restarts; else any free port."""
    saved = state / "sshd" / "port"
    try:
        preferred = int(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        preferred = 0
    port = free_port(preferred)
    saved.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    saved.write_text(f"{port}\n", encoding="utf-8")
    return port


def relay_config(
    state: Path, issuer: str, relay_port: int, ssh_port: int, ports: tuple[int, int, int]
) -> Path:
    """``ports``: HTTP mode's listener, the demo web app, the admin listener."""
    http_port, web_port, admin_port = ports
    cert, key = state / "relay-cert.pem", state / "relay-key.pem"
    try:  # the relay writes a new self-signed pair (valid 30 days) when one is missing
        expires = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
        fresh = expires - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=1)
    except (OSError, ValueError):
        fresh = False
    if not (fresh and key.exists()):
        cert.unlink(missing_ok=True)
        key.unlink(missing_ok=True)
    values = {"project": PROJECT, "zone": ZONE, "instance": INSTANCE, "issuer": issuer}
    values |= {"app": WEB_APP, "web_client": WEB_CLIENT, "web_secret": WEB_SECRET}
    numbers = {"relay_port": relay_port, "ssh_port": ssh_port, "http_port": http_port}
    numbers |= {"web_port": web_port, "admin_port": admin_port}
    login = pwd.getpwuid(os.getuid()).pw_name
    text = RELAY_CONFIG.substitute(values, login=login, **numbers)
    text += demo_certs.relay_ssh_section(state)
    (state / "policy.yaml").write_text(POLICY.substitute(app=WEB_APP), encoding="utf-8")
    config = state / "relay.yaml"
    config.write_text(text, encoding="utf-8")
    return config


# -- services: each in its own process group, stopped in reverse order by the exit stack -------


async def spawn(
    stack: AsyncExitStack, name: str, argv: Sequence[str], log: Path, pipes: bool = False
) -> Service:
    """Start ``argv`` with stderr (and stdout unless ``pipes``) to ``log``."""
    pipe, devnull = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            stdin=pipe if pipes else devnull,
            stdout=pipe if pipes else out,
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
        if process.returncode is not None:  # reaped: its pid is no longer ours to signal
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
    if process.stdin is not None:
        process.stdin.close()


async def wait_ready(service: Service, ready: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``ready``; DemoError when the service exits first or START_TIMEOUT passes."""
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + START_TIMEOUT, 0.05
    while not await ready():
        if service.process.returncode is not None or loop.time() > deadline:
            state = f"exited with {service.process.returncode}"
            if service.process.returncode is None:
                state = f"not ready after {START_TIMEOUT:.0f} s"
            raise DemoError(f"{service.name} {state}; {show(service.log)}:\n{service.tail()}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await service.process.wait()
        delay = min(delay * 2, 0.5)


async def start_idp(
    stack: AsyncExitStack, state: Path, http_port: int, admin_port: int
) -> tuple[Service, str]:
    if not (IDP_SERVER.parent / "node_modules" / "oidc-provider").is_dir():
        raise DemoError("deploy/dev-idp/node_modules is missing: run make system-deps")
    argv = [tool("node"), str(IDP_SERVER), "--host", "127.0.0.1", "--port", "0"]
    argv += ["--web-redirect", f"{web_url(http_port)}/_tunnel/callback"]  # browser sign-in
    argv += ["--web-redirect", f"{console_url(admin_port)}callback"]  # the console's
    argv.append("--exit-on-stdin-close")  # it stops even if we die without cleaning up
    for attempt in (1, 2):  # rarely a start prints nothing in time on a loaded machine
        service = await spawn(stack, "identity provider", argv, state / "idp.log", pipes=True)
        assert service.process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await service.process.stdout.readline()
            return service, str(json.loads(line)["issuer"])
        except (TimeoutError, ValueError, KeyError, TypeError):
            await stop(service)
            if attempt == 2:
                tail = service.tail()
                raise DemoError(f"the identity provider did not start:\n{tail}") from None
    raise AssertionError("unreachable")


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


async def start_sshd(stack: AsyncExitStack, state: Path, user: str) -> tuple[Service, int]:
    port = sshd_port(state)
    config = sshd_config(state, port, user)
    argv = [tool("sshd", SBIN_PATH), "-D", "-e", "-f", str(config)]  # absolute: sshd re-execs
    service = await spawn(stack, "sshd", argv, state / "sshd.log")

    async def ready() -> bool:
        listening = f"Server listening on 127.0.0.1 port {port}." in service.tail(50)
        return listening and await ssh_banner(port)

    await wait_ready(service, ready)
    return service, port


async def start_web(stack: AsyncExitStack, state: Path, http_port: int) -> tuple[Service, int]:
    """scripts/demo_web: refuses every request without a valid assertion from HTTP mode."""
    port = free_port()
    argv = [sys.executable, "-m", "scripts.demo_web", "--port", str(port)]
    argv += ["--issuer", f"http://127.0.0.1:{http_port}", "--audience", f"app:{WEB_APP}"]
    service = await spawn(stack, "demo web app", argv, state / "web.log")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def ready() -> bool:
            try:  # 401 "assertion refused": it answers, and only to HTTP mode
                async with session.get(f"http://127.0.0.1:{port}/") as answer:
                    return answer.status == 401
            except (OSError, aiohttp.ClientError, TimeoutError):
                return False

        await wait_ready(service, ready)
    return service, port


async def start_relay(stack: AsyncExitStack, state: Path, config: Path, port: int) -> Service:
    argv = [str(BIN / "tunnel-server"), "serve", "--config", str(config)]
    service = await spawn(stack, "relay", argv, state / "relay.log")
    cert = state / "relay-cert.pem"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def ready() -> bool:
            try:  # the relay writes the certificate as it starts
                context = ssl.create_default_context(cafile=str(cert))
                async with session.get(f"https://127.0.0.1:{port}/readyz", ssl=context) as answer:
                    return answer.status == 200
            except (OSError, aiohttp.ClientError, TimeoutError):
                return False

        await wait_ready(service, ready)
    return service


# -- what the user runs -----------------------------------------------------------------------


def console_url(admin_port: int) -> str:
    return f"http://127.0.0.1:{admin_port}/console/"


def web_url(http_port: int) -> str:
    """The demo web app as browsers reach it (*.localhost is loopback: RFC 6761)."""
    return f"http://{WEB_APP}.localhost:{http_port}"


@dataclass
class Demo:
    """The running stack: where it keeps its files, its ports, and the commands users run."""

    state: Path
    issuer: str
    relay_port: int
    ssh_port: int
    http_port: int
    admin_port: int
    user: str
    services: list[Service]

    @property
    def env(self) -> dict[str, str]:
        """What the printed ``export`` line sets."""
        ca_file = str(self.state / "relay-cert.pem")
        server = f"wss://127.0.0.1:{self.relay_port}"
        return {"TUNNEL_SERVER": server, "TUNNEL_CA_FILE": ca_file, "TUNNEL_PROJECT": PROJECT}

    def client(self, *args: str) -> list[str]:
        return [show(BIN / "tunnel-client"), *args]

    def ssh_options(self) -> list[str]:
        """For plain ssh to the forwarded port, with the files ``ssh-cert --out`` writes."""
        key = show(self.state / f"ssh/tunnel-{INSTANCE}")
        known_hosts = show(self.state / "ssh/known_hosts")
        options = ["IdentitiesOnly=yes", f"UserKnownHostsFile={known_hosts}"]
        options.append("StrictHostKeyChecking=accept-new")  # the demo host key is new once
        return ["-i", key, *(word for option in options for word in ("-o", option))]

    def ssh(self) -> list[str]:
        # A certificate from the relay; the VM's host certificate is checked with no prompt.
        args = ["ssh", INSTANCE, "--zone", ZONE, "--port", str(self.ssh_port), "--user", self.user]
        return self.client(*args)

    def sessions_list(self, token_file: Path) -> list[str]:
        """The admin CLI against the admin listener, with an admin's (alice's) token."""
        admin_url = f"http://127.0.0.1:{self.admin_port}"
        args = ["sessions", "list", "--admin-url", admin_url, "--token-file", show(token_file)]
        return [show(BIN / "tunnel-server"), *args]

    def explain_bob(self) -> list[str]:
        """Why bob may not reach the demo VM, from the relay's own configuration."""
        target = ["--instance", f"{PROJECT}/{ZONE}/{INSTANCE}", "--port", str(self.ssh_port)]
        config = ["--config", show(self.state / "relay.yaml"), "--member", "user:bob@example.com"]
        return [show(BIN / "tunnel-server"), "policy", "explain", *config, *target]


async def start(stack: AsyncExitStack, state: Path, well_known_ports: bool = True) -> Demo:
    """IdP, sshd, web app, relay, in this order; the stack stops them in reverse.
    ``well_known_ports``: prefer 8443, 8080 and 8444 (the demo); the check takes any free ports,
    so a demo started while it runs still gets the documented ones."""
    user = pwd.getpwuid(os.getuid()).pw_name

    def port(preferred: int) -> int:
        return free_port(preferred if well_known_ports else 0)

    http_port = port(HTTP_PORT)  # before the IdP: its tunnel-web redirect URIs name them
    admin_port = port(ADMIN_PORT)
    idp, issuer = await start_idp(stack, state, http_port, admin_port)
    sshd, ssh_port = await start_sshd(stack, state, user)
    web, web_port = await start_web(stack, state, http_port)
    relay_port = port(RELAY_PORT)
    ports = (http_port, web_port, admin_port)
    config = relay_config(state, issuer, relay_port, ssh_port, ports)
    relay = await start_relay(stack, state, config, relay_port)
    services = [idp, sshd, web, relay]
    return Demo(state, issuer, relay_port, ssh_port, http_port, admin_port, user, services)
