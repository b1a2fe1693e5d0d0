"""Tunnel-open latency including token verification, with a warm and a cold JWKS cache.

Loopback only, bounded: an in-process issuer (discovery + JWKS over HTTP), the relay on wss with
a self-signed certificate, a TCP target, and the native client's connection check (connect,
token verification, policy, dial, SID, close). Cold: a new relay (empty JWKS cache) per sample,
so each first tunnel pays discovery + JWKS fetch. Prints p50/p99 in milliseconds.

    .venv/bin/python -m bench.handshake [--warm N] [--cold N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from tunnel_client.session import ConnectOptions, check_connection
from tunnel_protocol.urls import InstanceTarget
from tunnel_server.app import running
from tunnel_server.config import parse_config


class Issuer:
    """Discovery and JWKS for one EC P-256 key on 127.0.0.1."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "bench-key"
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.url, "jwks_uri": self.url + "/jwks"})

    async def _jwks(self, request: web.Request) -> web.Response:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        return web.json_response({"keys": [{**public, "kid": self.kid, "alg": "ES256"}]})

    def token(self, user: str = "bench") -> str:
        now = int(time.time())
        claims = {"iss": self.url, "sub": user, "aud": "tunnel", "iat": now, "exp": now + 600,
                  "email": f"{user}@example.com", "email_verified": True}  # fmt: skip
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid})


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()


def _config(issuer: Issuer, workdir: Path) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "tls": {
            "cert_file": str(workdir / "cert.pem"),
            "key_file": str(workdir / "key.pem"),
            "self_signed": True,
        },  # fmt: skip
        "oidc": {"issuer": issuer.url, "audiences": ["tunnel"]},
        "inventory": {
            "instances": [{"project": "p", "zone": "z", "name": "vm", "address": "127.0.0.1"}]
        },  # fmt: skip
        "access": [
            {"members": ["user:bench@example.com"], "instances": ["p/z/vm"], "ports": ["1-65535"]}
        ],  # fmt: skip
        "log_format": "text",
    }


@asynccontextmanager
async def _relay(issuer: Issuer, workdir: Path) -> AsyncIterator[str]:
    async with running(parse_config(_config(issuer, workdir)), node="bench") as server:
        server.relay.audit.sink = lambda line: None
        yield server.url


async def _open_once(url: str, port: int, token: str, context: ssl.SSLContext) -> float:
    async def provide() -> str:
        return token

    options = ConnectOptions(url, InstanceTarget("p", "z", "vm", "nic0", port), provide, context)
    start = time.perf_counter()
    await check_connection(options)
    return (time.perf_counter() - start) * 1000


def _summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (f"| {name} | {len(samples)} | {statistics.median(samples):.2f} | {p99:.2f} | "
            f"{ordered[0]:.2f} |")  # fmt: skip


async def main(warm: int, cold: int) -> None:
    issuer = Issuer()
    await issuer.start()
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = int(target.sockets[0].getsockname()[1])
    token = issuer.token()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        warm_samples: list[float] = []
        cold_samples: list[float] = []
        async with _relay(issuer, workdir) as url:
            # The first relay writes the self-signed certificate; later ones reuse it.
            context = ssl.create_default_context(cafile=str(workdir / "cert.pem"))
            await _open_once(url, port, token, context)  # fills the JWKS cache
            for _ in range(warm):
                warm_samples.append(await _open_once(url, port, token, context))
        for _ in range(cold):
            async with _relay(issuer, workdir) as url:
                cold_samples.append(await _open_once(url, port, token, context))
    target.close()
    await issuer.stop()
    print("| JWKS cache | samples | p50 ms | p99 ms | min ms |")
    print("|---|---:|---:|---:|---:|")
    print(_summary("warm", warm_samples))
    print(_summary("cold (discovery + JWKS fetch)", cold_samples))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", type=int, default=300)
    parser.add_argument("--cold", type=int, default=40)
    args = parser.parse_args()
    asyncio.run(main(args.warm, args.cold))
