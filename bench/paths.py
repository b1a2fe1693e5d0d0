"""The paths under test, each a set of fresh processes: a server side (pinned to SERVER_CPU) and
one client-side chain per target port (pinned to CLIENT_CPU). ``chain(target_port)`` returns the
local port a source connects to; ``churn()``/``idle()`` say how the load generator reaches the
server side directly (for new tunnels per second and idle memory)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tunnel_server.config import TunnelSettings

from .procs import CLIENT_CPU, SERVER_CPU, Proc, free_port, python_argv, spawn, wait_listening

SOCAT = shutil.which("socat")
GCLOUD = shutil.which("gcloud")
INSTANCE, PROJECT, ZONE = "vm", "p", "z"


@dataclass(frozen=True)
class Files:
    """What every path needs from the suite: the work directory, the relay's certificate (and
    key) and a file holding a valid bearer token."""

    workdir: Path
    cert: Path
    key: Path
    token_file: Path
    issuer_url: str


@dataclass(frozen=True)
class LoadSpec:
    """How the load generator reaches a server side: ``kind`` (tcp, ws, native), a URL, the
    target port (native only) and the loop it runs on."""

    kind: str
    url: str
    target_port: int = 0
    loop: str = "uvloop"


@dataclass
class Subject:
    """One path under test. ``chains`` maps a target port to the local port in front of it."""

    name: str
    transport: str  # tcp, ws or wss
    figures: frozenset[str]  # throughput, rtt, churn, idle
    forking: bool = False  # a server process per connection (memory is then PSS of the tree)
    servers: list[Proc] = field(default_factory=list)
    clients: list[Proc] = field(default_factory=list)
    chains: dict[int, int] = field(default_factory=dict)

    async def start(self, files: Files, tag: str) -> None:
        """Start the server side shared by this run's chains (if any)."""

    async def chain(self, files: Files, tag: str, target_port: int) -> int:
        port = await self._chain(files, tag, target_port)
        self.chains[target_port] = port
        return port

    async def _chain(self, files: Files, tag: str, target_port: int) -> int:
        raise NotImplementedError

    async def churn(self, files: Files, tag: str, echo_port: int) -> LoadSpec | None:
        """Where the load generator opens tunnels to ``echo_port``; may start processes."""
        return None

    async def idle(self, files: Files, echo_port: int) -> LoadSpec | None:
        """A fresh server side for the memory phase; ``memory_pid`` is then the one to watch."""
        return None

    @property
    def memory_pid(self) -> int:
        return self.servers[0].pid

    @property
    def server_pids(self) -> list[int]:
        return [p.pid for p in self.servers]

    @property
    def client_pids(self) -> list[int]:
        return [p.pid for p in self.clients]

    async def stop(self) -> None:
        for proc in [*self.clients, *self.servers]:
            await proc.stop()
        self.clients.clear()
        self.servers.clear()
        self.chains.clear()


class Direct(Subject):
    def __init__(self) -> None:
        super().__init__("direct TCP", "tcp", frozenset({"throughput", "rtt", "churn"}))

    async def _chain(self, files: Files, tag: str, target_port: int) -> int:
        return target_port

    async def churn(self, files: Files, tag: str, echo_port: int) -> LoadSpec:
        return LoadSpec("tcp", f"tcp://127.0.0.1:{echo_port}")


def _socat_argv(listen: int, to: int) -> list[str]:
    assert SOCAT is not None
    return [
        SOCAT,
        "-b",
        "65536",
        f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
        f"TCP:127.0.0.1:{to}",
    ]


class Socat(Subject):
    """One hop (a relay on the server core) or two hops (one per core: the same topology as
    client + relay). socat forks a process per connection."""

    def __init__(self, hops: int) -> None:
        figures = {"throughput", "rtt", "churn"} | ({"idle"} if hops == 2 else set())
        name = "socat, one hop" if hops == 1 else "socat, two hops"
        super().__init__(name, "tcp", frozenset(figures), forking=True)
        self.hops = hops

    async def _hop(self, files: Files, name: str, cpu: int, to: int) -> tuple[Proc, int]:
        port = free_port()
        proc = await spawn(name, _socat_argv(port, to), files.workdir, cpu=cpu)
        await wait_listening(port, proc)
        return proc, port

    async def _chain(self, files: Files, tag: str, target_port: int) -> int:
        server, port = await self._hop(
            files, f"{tag}-socat2-{target_port}", SERVER_CPU, target_port
        )
        self.servers.append(server)
        if self.hops == 1:
            return port
        client, first = await self._hop(files, f"{tag}-socat1-{target_port}", CLIENT_CPU, port)
        self.clients.append(client)
        return first

    async def churn(self, files: Files, tag: str, echo_port: int) -> LoadSpec:
        port = self.chains.get(echo_port) or await self.chain(files, tag, echo_port)
        return LoadSpec("tcp", f"tcp://127.0.0.1:{port}")

    async def idle(self, files: Files, echo_port: int) -> LoadSpec:
        """The server-side hop alone: memory per connection of a forking C relay."""
        server, port = await self._hop(files, "idle-socat", SERVER_CPU, echo_port)
        self.servers.append(server)
        return LoadSpec("tcp", f"tcp://127.0.0.1:{port}")


class Websockify(Subject):
    """websockify (PyPI; a process per connection) as the server, ``bench.wsclient`` in front
    (websockify has no TCP-listening client of its own)."""

    short = "websockify"

    def __init__(self, tls: bool, figures: frozenset[str]) -> None:
        scheme = "wss" if tls else "ws"
        super().__init__(f"websockify, {scheme}", scheme, figures, forking=True)
        self.tls = tls

    async def _server(self, files: Files, name: str, target_port: int) -> int:
        port = free_port()
        argv = python_argv("websockify")
        if self.tls:
            argv += ["--cert", str(files.cert), "--key", str(files.key), "--ssl-only"]
        argv += [f"127.0.0.1:{port}", f"127.0.0.1:{target_port}"]
        proc = await spawn(name, argv, files.workdir, cpu=SERVER_CPU)
        self.servers.append(proc)
        await wait_listening(port, proc)
        return port

    async def _chain(self, files: Files, tag: str, target_port: int) -> int:
        port = await self._server(files, f"{tag}-{self.short}-{target_port}", target_port)
        argv = python_argv("bench.wsclient", f"{self.transport}://127.0.0.1:{port}")
        if self.tls:
            argv += ["--ca-file", str(files.cert)]
        client = await spawn(f"{tag}-wsclient-{target_port}", argv, files.workdir, cpu=CLIENT_CPU)
        self.clients.append(client)
        match = await client.wait_for_line(r"Listening on port \[(\d+)\]")
        return int(match.group(1))

    async def churn(self, files: Files, tag: str, echo_port: int) -> LoadSpec:
        port = await self._server(files, f"{tag}-{self.short}-churn", echo_port)
        return LoadSpec("ws", f"{self.transport}://127.0.0.1:{port}")

    async def idle(self, files: Files, echo_port: int) -> LoadSpec:
        port = await self._server(files, f"idle-{self.short}-{self.transport}", echo_port)
        return LoadSpec("ws", f"{self.transport}://127.0.0.1:{port}")


class BareChain(Websockify):
    """``bench.wsclient`` -> ``bench.bare_relay`` (websockets, no auth/acks/resume) -> target:
    the bare websockets chain the issue calibrates against."""

    short = "bare"

    def __init__(self, tls: bool) -> None:
        super().__init__(tls, frozenset({"throughput", "rtt", "churn", "idle"}))
        self.name = f"bare websockets chain, {self.transport}, uvloop"
        self.forking = False

    async def _server(self, files: Files, name: str, target_port: int) -> int:
        argv = python_argv("bench.bare_relay", str(target_port))
        if self.tls:
            argv += ["--cert", str(files.cert), "--key", str(files.key)]
        proc = await spawn(name, argv, files.workdir, cpu=SERVER_CPU)
        self.servers.append(proc)
        match = await proc.wait_for_line(r"Listening on wss?://127\.0\.0\.1:(\d+)")
        return int(match.group(1))


class PicowsChain(BareChain):
    """``bench.picows_chain client`` -> ``bench.picows_chain relay`` -> target: the bare chain of
    a callback-driven engine (picows: asyncio Protocols on both legs, no task per message), the
    second calibration point of issue 18."""

    short = "picows"

    def __init__(self, tls: bool) -> None:
        super().__init__(tls)
        self.name = f"bare picows chain, {self.transport}, uvloop"

    async def _server(self, files: Files, name: str, target_port: int) -> int:
        argv = python_argv("bench.picows_chain", "relay", str(target_port))
        if self.tls:
            argv += ["--cert", str(files.cert), "--key", str(files.key)]
        proc = await spawn(name, argv, files.workdir, cpu=SERVER_CPU)
        self.servers.append(proc)
        match = await proc.wait_for_line(r"Listening on wss?://127\.0\.0\.1:(\d+)")
        return int(match.group(1))

    async def _chain(self, files: Files, tag: str, target_port: int) -> int:
        port = await self._server(files, f"{tag}-{self.short}-{target_port}", target_port)
        argv = python_argv("bench.picows_chain", "client", f"{self.transport}://127.0.0.1:{port}")
        if self.tls:
            argv += ["--ca-file", str(files.cert)]
        client = await spawn(f"{tag}-picows-client-{target_port}", argv, files.workdir,
                             cpu=CLIENT_CPU)  # fmt: skip
        self.clients.append(client)
        match = await client.wait_for_line(r"Listening on port \[(\d+)\]")
        return int(match.group(1))


class Relay(Subject):
    """Our relay (``bench.relay_proc``) and ``tunnel-client`` (``bench.client_proc``), both on
    the same event loop; the load generator uses the client library on that loop too."""

    def __init__(self, tls: bool, loop: str) -> None:
        scheme = "wss" if tls else "ws"
        super().__init__(
            f"tunnel-client + relay, {scheme}, {loop}",
            scheme,
            frozenset({"throughput", "rtt", "churn", "idle"}),
        )
        self.tls = tls
        self.loop = loop
        self.url = ""

    async def start(self, files: Files, tag: str) -> None:
        config = files.workdir / f"relay-{self.transport}.yaml"
        config.write_text(relay_config(files, tls=self.tls))
        proc = await spawn(
            f"{tag}-relay",
            python_argv("bench.relay_proc", str(config), "--loop", self.loop),
            files.workdir,
            cpu=SERVER_CPU,
        )
        self.servers.append(proc)
        match = await proc.wait_for_line(r"Listening on (wss?://127\.0\.0\.1:\d+)")
        self.url = match.group(1)

    async def _chain(self, files: Files, tag: str, target_port: int) -> int:
        argv = python_argv(
            "bench.client_proc",
            "--server",
            self.url,
            "--port",
            str(target_port),
            "--token-file",
            str(files.token_file),
            "--ca-file",
            str(files.cert),
            "--loop",
            self.loop,
        )
        client = await spawn(f"{tag}-client-{target_port}", argv, files.workdir, cpu=CLIENT_CPU)
        self.clients.append(client)
        match = await client.wait_for_line(r"Listening on port \[(\d+)\]")
        return int(match.group(1))

    async def churn(self, files: Files, tag: str, echo_port: int) -> LoadSpec | None:
        return LoadSpec("native", self.url, echo_port, self.loop)

    async def idle(self, files: Files, echo_port: int) -> LoadSpec | None:
        await self.start(files, "idle")
        return LoadSpec("native", self.url, echo_port, self.loop)


class Gcloud(Relay):
    """``gcloud compute start-iap-tunnel`` (IAP subprotocol; wss only) through our relay."""

    def __init__(self) -> None:
        super().__init__(tls=True, loop="uvloop")
        self.name = "gcloud CLI + relay, wss, uvloop"
        self.figures = frozenset({"throughput", "rtt"})

    async def _chain(self, files: Files, tag: str, target_port: int) -> int:
        assert GCLOUD is not None
        config_dir = files.workdir / f"gcloud-{tag}-{target_port}"
        config_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
        env.update(
            CLOUDSDK_CONFIG=str(config_dir),
            CLOUDSDK_CORE_DISABLE_PROMPTS="1",
            CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
            CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
            CLOUDSDK_CORE_PROJECT=PROJECT,
        )
        port = self.url.rpartition(":")[2]
        argv = [
            GCLOUD,
            "compute",
            "start-iap-tunnel",
            INSTANCE,
            str(target_port),
            f"--zone={ZONE}",
            "--local-host-port=localhost:0",
            f"--iap-tunnel-url-override=wss://127.0.0.1:{port}",
            "--iap-tunnel-insecure-disable-websocket-cert-check",
            "--iap-tunnel-disable-connection-check",
            f"--access-token-file={files.token_file}",
        ]
        client = await spawn(
            f"{tag}-gcloud-{target_port}", argv, files.workdir, cpu=CLIENT_CPU, env=env
        )
        self.clients.append(client)
        match = await client.wait_for_line(r"Listening on port \[(\d+)\]", within=60)
        return int(match.group(1))

    async def churn(self, files: Files, tag: str, echo_port: int) -> None:
        return None

    async def idle(self, files: Files, echo_port: int) -> None:
        return None


def relay_config(files: Files, *, tls: bool) -> str:
    """The relay's YAML (as JSON): one issuer, one instance on 127.0.0.1, one allow rule."""
    config: dict[str, object] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "oidc": {"issuer": files.issuer_url, "audiences": ["tunnel"]},
        "inventory": {
            "instances": [
                {"project": PROJECT, "zone": ZONE, "name": INSTANCE, "address": "127.0.0.1"}
            ]
        },
        "access": [
            {
                "members": ["user:bench@example.com"],
                "instances": [f"{PROJECT}/{ZONE}/{INSTANCE}"],
                "ports": ["1-65535"],
            }
        ],
        "log_format": "json",
    }
    # Caps on open tunnels (where this version has them) must not get in the way of the idle
    # figure: 10,000 tunnels from one principal.
    limits = {"max_tunnels_per_principal": 100_000, "max_tunnels": 100_000}
    known = TunnelSettings.model_fields
    if any(key in known for key in limits):
        config["tunnel"] = {k: v for k, v in limits.items() if k in known}
    if tls:
        config["tls"] = {"cert_file": str(files.cert), "key_file": str(files.key)}
    return json.dumps(config, indent=2)
