"""Token expiry while a tunnel is open: the native client renews in-band without dropping the
stream; a client that cannot renew is closed with a typed "log in again" reason (4104)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tunnel_client.session import TunnelFailed, TunnelSession
from tunnel_protocol import CloseCode
from tunnel_protocol.aio.stream import TcpStream

from ..helpers import (
    TcpTarget,
    capture_audit,
    deterministic_chunks,
    relay_config_data,
    start_relay,
)
from ..oidc_fixture import TestIssuer
from .test_relay import listening, options

# Whole seconds: JWT times are integers.
LIFETIME = 2


def short_lived_config(issuer: TestIssuer, tmp_path: Path) -> dict[str, Any]:
    data = relay_config_data(issuer, tmp_path)
    data["oidc"]["leeway"] = 0
    return data


async def test_native_tunnel_renews_in_band_without_dropping(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    minted: list[str] = []

    def fresh() -> str:
        minted.append(issuer.mint(lifetime=LIFETIME))
        return minted[-1]

    async with start_relay(short_lived_config(issuer, tmp_path)) as relay:
        audit = capture_audit(relay)

        async def provide() -> str:
            return fresh()

        opts = dataclasses.replace(options(relay, tmp_path, fresh(), echo.port), token=provide)

        def renewals() -> int:
            return sum(r["event"] == "reauth" and r["decision"] == "allow" for r in audit)

        async with listening(opts) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            # Stream in both directions the whole time; two renewals mean the tunnel outlived
            # at least one whole token lifetime.
            renewed = asyncio.ensure_future(relay.relay.wait_until(lambda: renewals() >= 2))
            sent = hashlib.sha256()
            received = hashlib.sha256()
            chunks = deterministic_chunks(1 << 40, chunk=32 * 1024)
            while not renewed.done():
                chunk = next(chunks)
                writer.write(chunk)
                sent.update(chunk)
                received.update(await reader.readexactly(len(chunk)))
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            assert received.hexdigest() == sent.hexdigest()  # no byte lost or reordered
        sessions = [r for r in audit if r["event"] == "decision"]
        assert len(sessions) == 1
        assert not any(r["event"] == "resume" for r in audit)  # never dropped
        assert not any(r.get("reason") == "token expired" for r in audit)
        assert all(token not in json.dumps(audit) for token in minted)


async def test_client_that_cannot_renew_is_told_to_log_in_again(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    token = issuer.mint(lifetime=LIFETIME)
    async with start_relay(short_lived_config(issuer, tmp_path)) as relay:
        audit = capture_audit(relay)
        opts = options(relay, tmp_path, token, echo.port)  # always the same, soon stale
        session = TunnelSession(opts)
        server, client = await _socket_pair()
        try:
            with pytest.raises(TunnelFailed) as info:
                await session.run(server)
        finally:
            client.close()
        # It answered REAUTH_REQUIRED with its old token until that expired: refused in-band
        # (4104), or closed with 4004 at expiry and then refused at the reconnect (401).
        assert info.value.code in (CloseCode.UNAUTHENTICATED, 401)
        assert "log in again" in str(info.value)
        denied = {r["reason"] for r in audit if r.get("decision") == "deny"}
        assert denied & {"expired", "token expired"}
        assert token not in json.dumps(audit)


async def _socket_pair() -> tuple[TcpStream, TcpStream]:
    """Two connected TcpStreams over loopback (the local side of a tunnel and its peer)."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[TcpStream] = loop.create_future()
    server = await loop.create_server(
        lambda: TcpStream(on_connected=accepted.set_result), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(TcpStream, "127.0.0.1", port)
    stream = await accepted
    server.close()
    return stream, client
