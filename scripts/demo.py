"""``make demo``: the whole stack on loopback until Ctrl-C: the development identity provider
(deploy/dev-idp), an unprivileged sshd as the demo target, the demo web app (scripts/demo_web)
and the relay in front of both (tunnels, and HTTP mode for the web app on its own listener),
with the admin console on its admin listener and the audit store in .demo/audit.db.
``--check`` starts everything, runs the printed commands end to end, stops and exits 0 or 1.
Keys, certificate, configuration and logs live in ``.demo/``; see docs/demo.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
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
from contextlib import AsyncExitStack
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from string import Template
from urllib.parse import urljoin

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
STEP_TIMEOUT = 60.0  # per --check step

SSHD_OPTIONS = (  # besides Port, HostKey, AuthorizedKeysFile and AllowUsers
    *("ListenAddress 127.0.0.1", "PermitRootLogin prohibit-password", "UsePAM no"),
    *("PasswordAuthentication no", "KbdInteractiveAuthentication no", "StrictModes no"),
    *("AllowTcpForwarding no", "AllowAgentForwarding no", "X11Forwarding no", "PidFile none"),
    *("UseDNS no", "LogLevel VERBOSE", "Subsystem sftp internal-sftp"),
)
RELAY_CONFIG = Template("""\
# Written by scripts/demo.py on every start.
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
# Written by scripts/demo.py on every start. The relay's inline access: list (SSH) is merged in.
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


def free_port(preferred: int = 0) -> int:
    for port in dict.fromkeys((preferred, 0)):
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
    """The host key in .demo/sshd (signed by the demo host CA); logins by the relay's
    certificates only, for ``user``: no authorized_keys."""
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
    config.write_text("\n".join(["# Written by scripts/demo.py", *lines, ""]), encoding="utf-8")
    return config


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
    port = free_port()
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

    def instructions(self) -> str:
        ca_file = show(Path(self.env["TUNNEL_CA_FILE"]))
        env = self.env | {"TUNNEL_CA_FILE": ca_file if ca_file[0] == "/" else f"$PWD/{ca_file}"}
        tunnel = ["start-tunnel", INSTANCE, str(self.ssh_port), "--zone", ZONE]
        tunnel.append(f"--local-host-port=localhost:{LOCAL_PORT}")
        via_local = ["ssh", "-p", str(LOCAL_PORT), *self.ssh_options(), f"{self.user}@localhost"]
        cert = ["ssh-cert", INSTANCE, "--zone", ZONE, "--port", str(self.ssh_port)]
        cert.append(f"--out={show(self.state / 'ssh')}")
        app = web_url(self.http_port) + "/"
        token = shlex.join(self.client("print-access-token"))
        return "\n".join(
            [
                "",
                "identity-tunnel demo",
                f"  relay   {self.env['TUNNEL_SERVER']}  (self-signed: {ca_file})",
                f"  IdP     {self.issuer}  (every user's password: {PASSWORD})",
                f"          {ALICE} (groups ops, dev): allowed",
                "          bob@example.com (group dev), mallory@example.com (none): denied",
                f"  target  {PROJECT}/{ZONE}/{INSTANCE}, SSH as {self.user}, only via the relay",
                f"  web app {app}  (HTTP mode; alice allowed, bob and mallory denied)",
                f"  console {console_url(self.admin_port)}  (admins: group ops, i.e. alice)",
                f"  logs    {'  '.join(show(service.log) for service in self.services)}",
                "",
                "In another terminal:",
                f"  cd {shlex.quote(str(ROOT))}",
                "  export " + " ".join(f"{name}={value}" for name, value in env.items()),
                "  # 1. log in: a browser, or the device flow (--no-browser, or no display)",
                f"  {shlex.join(self.client('login'))}",
                "  # 2. SSH to the demo VM through the relay",
                f"  {shlex.join(self.ssh())}",
                "  # 3. or forward a local port, then ssh to it from a third terminal with a",
                "  #    certificate written for other tools (the VM has no authorized_keys)",
                f"  {shlex.join(self.client(*tunnel))}",
                f"  {shlex.join(self.client(*cert))}",
                f"  {shlex.join(via_local)}",
                f"  # 4. Open {app} in a browser (sign in as alice), or after step 1:",
                f'  curl -H "Authorization: Bearer $({token})" {app}',
                f"  # 5. Open {console_url(self.admin_port)} (sign in as alice): live tunnels,",
                "  #    revoke, audit search, policy explain",
                "",
            ]
        )  # fmt: skip


# -- --check: the printed commands, end to end ------------------------------------------------


class FormParser(HTMLParser):
    """A page's forms: id ("" when none) -> (action, inputs with their values)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.forms: dict[str, tuple[str, dict[str, str]]] = {}
        self._current: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = a.get("id", "")
            self.forms[self._current] = (a.get("action", ""), {})
        elif tag == "input" and self._current is not None and a.get("name"):
            self.forms[self._current][1][a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        self._current = None if tag == "form" else self._current


async def approve_device(url: str, email: str) -> None:
    """What the user does in the browser: confirm the code, sign in, allow."""
    answers: dict[str, dict[str, str]] = {
        "op.deviceConfirmForm": {},
        "login": {"login": email, "password": PASSWORD},
        "consent": {},
        "": {},  # a page that submits itself with JavaScript
    }
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        method, data = "GET", dict[str, str]()
        for _ in range(6):
            async with session.request(method, url, data=data) as page:
                text, url = await page.text(), str(page.url)
            if "Signed in" in text:
                return
            forms = FormParser(text).forms
            form = next((name for name in answers if name in forms), None)
            if form is None:
                raise DemoError(f"unexpected page at {url}:\n{text[:500]}")
            action, fields = forms[form]
            method, url, data = "POST", urljoin(url, action), fields | answers[form]
    raise DemoError("the device approval did not finish")


async def launch(argv: Sequence[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    """A printed command, from the repository root like the user."""
    pipe = asyncio.subprocess.PIPE
    return await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=pipe, stderr=pipe
    )


async def check_login(demo: Demo, env: dict[str, str]) -> None:
    process = await launch([*demo.client("login"), "--no-browser"], env)
    assert process.stderr is not None
    try:
        seen = b""
        while (found := re.search(rb"\(or open (\S+)\)", seen)) is None:
            line = await process.stderr.readline()
            if not line:
                raise DemoError(f"login printed no verification URL:\n{seen.decode()}")
            seen += line
        await approve_device(found[1].decode(), ALICE)
        seen += await process.stderr.read()
        if await process.wait() != 0 or b"Logged in to" not in seen:
            raise DemoError(f"login failed:\n{seen.decode(errors='replace')}")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def check_ssh(demo: Demo, env: dict[str, str]) -> None:
    process = await launch([*demo.ssh(), "--", "-o", "BatchMode=yes", "echo demo-ok"], env)
    out, err = await process.communicate()
    if process.returncode != 0 or b"demo-ok\n" not in out:
        raise DemoError(f"ssh exited with {process.returncode}: {(out + err).decode()}")


async def check_http(demo: Demo, url: str, expect: str) -> None:
    context = ssl.create_default_context(cafile=demo.env["TUNNEL_CA_FILE"])
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as answer:
        text = await answer.text()
    if answer.status != 200 or expect not in text:
        raise DemoError(f"{url}: HTTP {answer.status} {text[:200]}")


async def check_web(demo: Demo, env: dict[str, str]) -> None:
    """The printed curl command: alice's access token (aud tunnel) as a bearer token; the demo
    app shows the email from the signed assertion. Host is set by hand: not every resolver
    knows *.localhost (browsers and curl do)."""
    process = await launch(demo.client("print-access-token"), env)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise DemoError(f"print-access-token exited with {process.returncode}: {err.decode()}")
    headers = {"Host": f"{WEB_APP}.localhost:{demo.http_port}", "Accept": "text/html"}
    headers["Authorization"] = f"Bearer {out.decode().strip()}"
    url = f"http://127.0.0.1:{demo.http_port}/"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers, allow_redirects=False) as answer:
            text = await answer.text()
    expect = f"Verified identity: <b id='email'>{ALICE}</b>"
    if answer.status != 200 or expect not in text:
        raise DemoError(f"{web_url(demo.http_port)}/: HTTP {answer.status} {text[:300]}")


async def check_console(demo: Demo) -> None:
    """The console asks for sign-in, and sign-in goes to the IdP."""
    async with aiohttp.ClientSession() as session:
        async with session.get(console_url(demo.admin_port), allow_redirects=False) as answer:
            location = answer.headers.get("Location", "")
        if answer.status != 302 or not location.startswith("/console/sign_in"):
            raise DemoError(f"console: HTTP {answer.status} {location}")
        url = urljoin(console_url(demo.admin_port), location)
        async with session.get(url, allow_redirects=False) as answer:
            if not answer.headers.get("Location", "").startswith(demo.issuer):
                raise DemoError(f"console sign-in: HTTP {answer.status}, not to the IdP")


async def check(demo: Demo) -> None:
    client_home = demo.state / "check-client"  # not the user's own logins
    shutil.rmtree(client_home, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")} | demo.env
    env |= {"TUNNEL_CLIENT_HOME": str(client_home), "TUNNEL_CLIENT_TOKEN_STORE": "file"}
    discovery = f"{demo.issuer}/.well-known/openid-configuration"
    readyz = f"https://127.0.0.1:{demo.relay_port}/readyz"
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("IdP discovery", lambda: check_http(demo, discovery, f'"issuer":"{demo.issuer}"')),
        ("relay /readyz", lambda: check_http(demo, readyz, "ready")),
        ("device-flow login as alice", lambda: check_login(demo, env)),
        ("tunnel-client ssh ... 'echo demo-ok'", lambda: check_ssh(demo, env)),
        ("HTTP mode (demo web app)", lambda: check_web(demo, env)),
        ("admin console sign-in", lambda: check_console(demo)),
    ]
    for name, step in steps:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await step()
        except (DemoError, OSError, aiohttp.ClientError, TimeoutError) as exc:
            raise DemoError(f"check failed: {name}: {str(exc) or 'timed out'}") from None
        print(f"ok: {name}", flush=True)


# -- main -------------------------------------------------------------------------------------


async def start(stack: AsyncExitStack, state: Path) -> Demo:
    """IdP, sshd, web app, relay, in this order; the stack stops them in reverse."""
    user = pwd.getpwuid(os.getuid()).pw_name
    http_port = free_port(HTTP_PORT)  # before the IdP: its tunnel-web redirect URIs name them
    admin_port = free_port(ADMIN_PORT)
    idp, issuer = await start_idp(stack, state, http_port, admin_port)
    sshd, ssh_port = await start_sshd(stack, state, user)
    web, web_port = await start_web(stack, state, http_port)
    relay_port = free_port(RELAY_PORT)
    ports = (http_port, web_port, admin_port)
    config = relay_config(state, issuer, relay_port, ssh_port, ports)
    relay = await start_relay(stack, state, config, relay_port)
    services = [idp, sshd, web, relay]
    return Demo(state, issuer, relay_port, ssh_port, http_port, admin_port, user, services)


async def supervise(demo: Demo) -> None:
    """Until a signal cancels us; DemoError when a service dies first."""
    waits = {asyncio.ensure_future(s.process.wait()): s for s in demo.services}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
    service = waits[done.pop()]
    code = service.process.returncode
    raise DemoError(f"{service.name} exited unexpectedly ({code}):\n{service.tail()}")


async def run_demo(state: Path, check_only: bool) -> int:
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None

    def interrupted() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup
            loop.add_signal_handler(sig, lambda: None)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted)
    try:
        async with AsyncExitStack() as stack:
            print("Starting the IdP, sshd, the demo web app and the relay...", flush=True)
            demo = await start(stack, state)
            print(demo.instructions(), flush=True)
            if check_only:
                await check(demo)
                print("Demo check passed.", flush=True)
                return 0
            print("Ctrl-C stops the demo.", flush=True)
            await supervise(demo)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
    except asyncio.CancelledError:
        task.uncancel()
        return 1 if check_only else 0
    finally:
        print("Demo stopped.", flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__)
    parser.add_argument("--check", action="store_true", help="verify end to end, stop, exit 0/1")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".demo", help="default: .demo")
    args = parser.parse_args(argv)
    state: Path = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run_demo(state, args.check))


if __name__ == "__main__":
    sys.exit(main())
