"""The per-tunnel cost of the outbound PROXY v2 header with a signed identity (a destination with
``proxy_protocol``, docs/upstream-identity.md): on the relay, building one header (the relay's own
``proxy_header``: ES256 sign + encode); on the upstream, ``tunnel_upstream`` parsing and
verifying it; and tunnel-open latency to a destination with the header against the same relay's
destination without it, interleaved.

Loopback only, bounded: an in-process issuer, one relay (native clients' connection check:
connect, verify, decide, dial, header, SID, close), a TCP target that reads the header.

    .venv/bin/python -m bench.proxy_header [--tunnels N] [--headers N] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tunnel_client.session import ConnectOptions, check_connection
from tunnel_protocol.proxyheader import reader
from tunnel_protocol.urls import InstanceTarget
from tunnel_server.access.addresses import canonical_ip
from tunnel_server.access.identity import Identity
from tunnel_server.app import running
from tunnel_server.config import parse_config
from tunnel_server.relay.upstream_identity import proxy_header
from tunnel_server.web.assertion import AssertionSigner
from tunnel_upstream import IdentityCheck, parse_proxy_header, verify_identity

from . import gate
from .handshake import Issuer, _config
from .sections import write_section


async def _target(reader_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a PROXY header when one comes (first byte CR), then drains until EOF."""
    try:
        first = await reader_.readexactly(1)
        if first == b"\r":
            steps = reader()
            need = next(steps)
            data = first + await reader_.readexactly(need - 1)
            try:
                while True:
                    need = steps.send(data)
                    data = await reader_.readexactly(need)
            except StopIteration:
                pass
        while await reader_.read(65536):
            pass
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _relay_config(issuer: Issuer, workdir: Path) -> dict[str, Any]:
    data = _config(issuer, workdir)
    plain = data["inventory"]["instances"][0]
    data["inventory"]["instances"].append(
        {**plain, "name": "vmp", "proxy_protocol": {"audience": "tcp:vmp"}}
    )
    data["access"][0]["instances"].append("p/z/vmp")
    data["http"] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "issuer_url": "http://127.0.0.1:1",
        "routes": [{"name": "app", "host": "app.localhost", "upstream": "http://127.0.0.1:9"}],
    }
    return data


def header_cost(count: int) -> dict[str, float]:
    """Median microseconds per header: the relay's sign + encode, encode alone (signature
    given), the signature alone, and the upstream's parse + verify (a distinct header per
    tunnel, as every tunnel's assertion is its own; no replay cache)."""
    signer = AssertionSigner("http://127.0.0.1:1", lifetime=300)
    identity = Identity("user:bench@example.com", "bench", "http://issuer", "bench@example.com",
                        ("ops",), time.time() + 600, frozenset())  # fmt: skip
    dialed = canonical_ip("10.0.0.5")
    token = signer.sign(audience="tcp:vmp", subject="bench", email=None, groups=(),
                        principal="user:bench")  # fmt: skip

    def given(**_: Any) -> str:
        return token

    def build(sign: Any, tunnel_id: str) -> bytes:
        return proxy_header(sign, identity=identity, audience="tcp:vmp", access_levels=["corp"],
                            tunnel_id=tunnel_id, target="p/z/vmp", source_ip="198.51.100.7",
                            dialed=dialed, port=5432)  # fmt: skip

    headers = [build(signer.sign, f"T{i:039d}") for i in range(count)]
    check = IdentityCheck("tcp:vmp", "http://127.0.0.1:1", jwks=signer.jwks(), replays=None)
    samples: dict[str, list[float]] = {"full": [], "encode": [], "sign": [], "verify": []}
    for i in range(count):
        start = time.perf_counter()
        build(signer.sign, "T" * 40)
        samples["full"].append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        build(given, "T" * 40)
        samples["encode"].append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        signer.sign(audience="tcp:vmp", subject="bench", email=None, groups=(), principal="u")
        samples["sign"].append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        parsed = parse_proxy_header(headers[i])
        assert parsed is not None
        verify_identity(parsed[0], check)
        samples["verify"].append((time.perf_counter() - start) * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


async def tunnel_open(count: int) -> dict[str, list[float]]:
    issuer = Issuer()
    await issuer.start()
    target = await asyncio.start_server(_target, "127.0.0.1", 0)
    port = int(target.sockets[0].getsockname()[1])
    token = issuer.token()

    async def provide() -> str:
        return token

    samples: dict[str, list[float]] = {"vm": [], "vmp": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            config = parse_config(_relay_config(issuer, workdir))
            async with running(config, node="bench") as server:
                server.relay.audit.sink = lambda line: None
                context = ssl.create_default_context(cafile=str(workdir / "cert.pem"))
                options = {name: ConnectOptions(server.url, InstanceTarget("p", "z", name, "nic0",
                           port), provide, context) for name in samples}  # fmt: skip
                for name in samples:  # warm: JWKS cache, first signature
                    await check_connection(options[name])
                for _ in range(count):
                    for name in samples:  # interleaved: drift hits both alike
                        start = time.perf_counter()
                        await check_connection(options[name])
                        samples[name].append((time.perf_counter() - start) * 1000)
    finally:
        target.close()
        await issuer.stop()
    return samples


def report(tunnels: int, headers: int) -> str:
    load = gate.start_load()
    cost = header_cost(headers)
    opened = asyncio.run(tunnel_open(tunnels))
    plain, proxied = (statistics.median(opened[n]) for n in ("vm", "vmp"))
    lines = [
        "## PROXY v2 identity header, per tunnel (issue 17)",
        "",
        "`python -m bench.proxy_header`: loopback, one process. Load average at the start: "
        f"{load:.2f} "
        + ("(quiet)" if gate.judged(load) else "(busy: not evidence for a target)")
        + f", at the end {gate.load1():.2f}.",
        "",
        f"| per header ({headers} samples, median) | µs of one core |",
        "|---|---:|",
        f"| relay: sign (ES256) + encode | {cost['full']:.1f} |",
        f"| relay: encode only (signature given) | {cost['encode']:.1f} |",
        f"| relay: ES256 signature alone | {cost['sign']:.1f} |",
        f"| upstream: `tunnel_upstream` parse + verify | {cost['verify']:.1f} |",
        "",
        f"| tunnel open, wss, warm ({tunnels} each, interleaved) | p50 ms |",
        "|---|---:|",
        f"| destination without the header | {plain:.3f} |",
        f"| destination with `proxy_protocol` | {proxied:.3f} |",
        f"| added per tunnel | {(proxied - plain) * 1000:.0f} µs |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=300)
    parser.add_argument("--headers", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = report(args.tunnels, args.headers)
    print(text)
    if args.out is not None:
        write_section(args.out, text, name="proxy-header")
    gate.exit_if_busy(gate.start_load(), gate.load1())
