"""Token expiry during a gcloud transfer: gcloud continues with no byte lost.

When a tunnel's token expires the relay closes the WebSocket with 4004 and parks the tunnel;
gcloud reconnects on 4004, and the relay resumes the tunnel only with a valid token of the same
principal. ``--access-token-file`` cannot do that: gcloud reads the file once at start-up into a
credential that never refreshes (``store._LoadAccessTokenCredsFromFile``,
``AccessTokenCredentials.refresh`` is a no-op), so it comes back with the expired token (401).

What works offline is a google-auth ``authorized_user`` credential file holding a refresh token
from the dev IdP (device login, public client ``tunnel-cli``), with gcloud's token endpoint
(``auth/token_host``) pointed at the IdP. gcloud asks for a token before every connect and
reconnect and refreshes when it expires within 300 s, so with 4 s tokens every (re)connect
carries a fresh JWT (``aud: tunnel``) from a refresh-token grant against our IdP."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tunnel_server.app import RunningServer
from tunnel_server.relay.session import Session

from ..helpers import capture_audit, relay_config_data, start_relay
from ..idp import ALICE, AUDIENCE, CLI_CLIENT_ID, DevIdp, TokenError, missing_tools
from ..oidc_fixture import TestIssuer
from .gcloud import (
    STEP_TIMEOUT,
    GatedSource,
    Progress,
    authorized_user_file,
    gcloud_refreshing_tunnel,
    payload,
    read_all,
    read_exactly,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("gcloud") is None, reason="the gcloud CLI is not installed"),
    pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or ""),
]

MiB = 1024 * 1024
SIZE = 20 * MiB
TTL = 4  # s, the IdP's access-token lifetime; JWT exp is whole seconds, so 3-4 s remain
TRICKLE = 64 * 1024  # bytes released per tick while waiting for the expiry (~1.25 MiB/s)
TICK = 0.05


@pytest.fixture
async def idp() -> AsyncIterator[DevIdp]:
    async with DevIdp(access_token_ttl=TTL) as running:
        yield running


@pytest.fixture
async def relay(idp: DevIdp, issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    # relay_config_data builds on a TestIssuer; only its oidc section is replaced: trust the dev
    # IdP, with no leeway, so a token is refused (4004, then 401) the second its exp passes.
    data = relay_config_data(issuer, tmp_path)
    data["oidc"] = {"issuer": idp.issuer, "audiences": [AUDIENCE], "leeway": 0}
    async with start_relay(data) as server:
        yield server


async def the_session(relay: RunningServer) -> Session:
    async with asyncio.timeout(STEP_TIMEOUT):
        await relay.relay.wait_until(lambda: len(relay.relay.sessions) == 1)
    (session,) = relay.relay.sessions.values()
    return session


async def trickle_until_resumed(
    source: GatedSource, session: Session, released: int, cap: int
) -> None:
    """Keep data flowing (up to ``cap``) until the token expires and gcloud has resumed the
    tunnel: bytes are in flight when the relay closes with 4004 and while the tunnel is parked."""
    async with asyncio.timeout(TTL + STEP_TIMEOUT):
        while not (session.resumes and session.pump is not None):
            released = min(cap, released + TRICKLE)
            source.release(released)
            await asyncio.sleep(TICK)


@pytest.mark.parametrize("mode", ["port", "stdin"])
async def test_token_expiry_mid_download(
    relay: RunningServer, idp: DevIdp, tmp_path: Path, mode: str
) -> None:
    """20 MiB from the target through gcloud, across the expiry of gcloud's first token: the
    relay closes with 4004 at exp, gcloud refreshes at our IdP and resumes the same tunnel with
    the new token, and every byte arrives once, in order."""
    tokens = await idp.device_login(ALICE)
    credential = authorized_user_file(tmp_path, CLI_CLIENT_ID, tokens["refresh_token"])
    token_uri = await idp.endpoint("token_endpoint")
    data = payload(SIZE, seed=7)
    source = await GatedSource(data, gated=True).start()
    audit = capture_audit(relay)
    progress = Progress()
    stdin_mode = mode == "stdin"
    try:
        async with gcloud_refreshing_tunnel(
            relay.port, source.port, credential, token_uri, tmp_path, stdin_mode=stdin_mode
        ) as gcloud:
            writer = None
            if stdin_mode:
                download = asyncio.create_task(read_exactly(gcloud.stdout, SIZE, progress))
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", gcloud.port)
                download = asyncio.create_task(read_all(reader, progress))
            try:
                session = await the_session(relay)
                first_expiry = session.identity.expires_at
                assert first_expiry - time.time() <= TTL  # a token gcloud has just obtained
                source.release(SIZE // 4)
                await progress.reached(SIZE // 4)
                await trickle_until_resumed(source, session, SIZE // 4, 3 * SIZE // 4)
                source.release(SIZE)
                async with asyncio.timeout(STEP_TIMEOUT):
                    digest = await download
                if stdin_mode:
                    gcloud.stdin.close()  # gcloud leaves stdin mode when its stdin ends
                    assert await gcloud.wait_exit() == 0, gcloud.stderr.text
            finally:
                download.cancel()
                if writer is not None:
                    writer.close()
            async with asyncio.timeout(STEP_TIMEOUT):
                await relay.relay.wait_until(lambda: not relay.relay.sessions)
            stderr = gcloud.stderr.text
    finally:
        await source.stop()

    assert (progress.count, digest) == (SIZE, hashlib.sha256(data).hexdigest())
    # The resumed tunnel runs on a token issued after the first one, not the expired one ...
    assert session.identity.expires_at > first_expiry
    # ... which gcloud got from our IdP: it spent (rotated) the device login's refresh token.
    with pytest.raises(TokenError) as spent:
        await idp.refresh(tokens["refresh_token"])
    assert spent.value.error == "invalid_grant"
    assert_expired_then_resumed(audit, session, stderr)


def assert_expired_then_resumed(audit: list[dict[str, Any]], session: Session, stderr: str) -> None:
    """Each expiry of the tunnel's token (4004) is followed by a resume with a fresh token."""
    assert not [r for r in audit if r["event"] == "handshake"], stderr  # no 401 on reconnect
    steps = [r for r in audit if r["event"] in ("reauth", "resume")]
    assert steps, stderr
    assert len(steps) % 2 == 0, steps
    for expired, resumed in zip(steps[::2], steps[1::2], strict=True):
        assert (expired["event"], expired["decision"], expired["reason"]) == (
            "reauth",
            "deny",
            "token expired",
        )
        assert (resumed["event"], resumed["decision"]) == ("resume", "allow")
        assert expired["tunnel_id"] == resumed["tunnel_id"] == session.sid
        assert expired["principal"] == resumed["principal"] == f"user:{ALICE}"
        assert resumed["ack"] > 0  # gcloud had received data: resumed mid-stream
    (closed,) = [r for r in audit if r["event"] == "tunnel_closed"]
    assert closed["tunnel_id"] == session.sid
    assert (closed["close_code"], closed["bytes_to_client"]) == (1000, SIZE)
    assert closed["resumes"] == len(steps) // 2 >= 1
