"""Control frames never stall data: an in-band re-authentication whose token needs a JWKS fetch
(a rotated key) is checked beside the data, so the tunnel keeps carrying bytes while the issuer
hangs, and the REAUTH_OK follows once the fetch completes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tunnel_protocol import NATIVE
from tunnel_protocol.frames import ReauthOk, decode, encode_reauth

from ..helpers import TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from .test_drain import _native_connect, native_echo
from .test_relay import client_ssl


async def test_data_flows_while_a_reauth_waits_for_jwks(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    async with start_relay(relay_config_data(issuer, tmp_path)) as relay:
        audit = capture_audit(relay)
        url = f"wss://127.0.0.1:{relay.port}"
        ws = await _native_connect(url, client_ssl(tmp_path), issuer.mint(), echo.port)
        await native_echo(ws, b"before")

        gate = issuer.jwks_gate = asyncio.Event()
        issuer.jwks_requested.clear()
        issuer.rotate()  # the fresh token's kid is unknown to the relay: it must refetch JWKS
        await ws.send(encode_reauth(issuer.mint().encode()))
        await issuer.jwks_requested.wait()

        # The fetch hangs (the issuer waits on the gate) and data still crosses both ways.
        for n in range(5):
            await native_echo(ws, f"during the fetch {n}".encode())
        assert not gate.is_set()
        assert not any(r["event"] == "reauth" for r in audit)

        gate.set()
        while True:
            message = await ws.recv()
            assert isinstance(message, bytes)
            if isinstance(decode(message, max_data=NATIVE.max_data, native=True), ReauthOk):
                break
        await native_echo(ws, b"after")
        assert [r["decision"] for r in audit if r["event"] == "reauth"] == ["allow"]
        await ws.close()
