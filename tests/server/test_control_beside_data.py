"""Control frames never stall data: an in-band re-authentication whose token needs a JWKS fetch
(a rotated key) is checked beside the data, so the tunnel keeps carrying bytes while the issuer
hangs, and the REAUTH_OK follows once the fetch completes. The client's side likewise: a token
refresh that hangs on REAUTH_REQUIRED does not stop its reader."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from tunnel_protocol import NATIVE
from tunnel_protocol.frames import ReauthOk, decode, encode_reauth

from ..helpers import TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from .test_drain import _native_connect, native_echo
from .test_relay import client_ssl, listening, options


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


async def test_client_data_flows_while_its_token_refresh_hangs(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    gate, asked = asyncio.Event(), asyncio.Event()
    hold = asyncio.Event()  # set: the next token request waits on the gate

    async def provide() -> str:
        if hold.is_set():
            asked.set()
            await gate.wait()
        return issuer.mint()

    async with start_relay(relay_config_data(issuer, tmp_path)) as relay:
        audit = capture_audit(relay)
        opts = dataclasses.replace(options(relay, tmp_path, "", echo.port), token=provide)
        async with listening(opts) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)

            async def round_trip(data: bytes) -> None:
                writer.write(data)
                await writer.drain()
                assert await reader.readexactly(len(data)) == data

            await round_trip(b"before")
            [session] = relay.relay.sessions.values()
            assert session.pump is not None
            hold.set()
            # What the relay's expiry watcher sends before the token runs out, sent now.
            session.tunnel.send_reauth_required(int(session.identity.expires_at))
            await session.pump.flush()
            await asked.wait()

            for n in range(5):  # the client's reader keeps going while its refresh hangs
                await round_trip(f"during the refresh {n}".encode())
            assert not any(r["event"] == "reauth" for r in audit)

            gate.set()
            await relay.relay.wait_until(lambda: any(r["event"] == "reauth" for r in audit))
            assert [r["decision"] for r in audit if r["event"] == "reauth"] == ["allow"]
            await round_trip(b"after")
            writer.close()
