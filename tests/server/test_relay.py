"""Relay integration on port 0: real TLS, real token verification against a loopback issuer,
the native client, and TCP targets that count connections."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tunnel_client.listener import LocalListener
from tunnel_client.session import ConnectOptions, TunnelFailed, check_connection
from tunnel_protocol import IAP_SUBPROTOCOL, NATIVE_SUBPROTOCOL, CloseCode
from tunnel_protocol.urls import InstanceTarget
from tunnel_server.app import RunningServer

from ..helpers import (
    UNIT,
    FaultProxy,
    TcpTarget,
    capture_audit,
    deterministic_chunks,
    deterministic_digest,
    relay_config_data,
    start_relay,
)
from ..oidc_fixture import (
    TestIssuer,
    forge_alg_none,
    forge_hmac,
    forge_jwe_like,
    forge_oversized,
    tamper_payload,
)
from ..reliability.common import eventually, only_session

DROPS = 8


def client_ssl(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tmp_path / "relay-cert.pem"))


def options(
    server: RunningServer,
    tmp_path: Path,
    token: str,
    port: int,
    *,
    url: str | None = None,
    instance: str = "vm1",
    **kw: Any,
) -> ConnectOptions:
    async def provide() -> str:
        return token

    return ConnectOptions(
        server=url or server.url,
        target=InstanceTarget("p", "z", instance, "nic0", port),
        token=provide,
        ssl_context=client_ssl(tmp_path),
        open_timeout=100 * UNIT,
        backoff_initial=UNIT / 5,
        backoff_cap=UNIT * 4,
        **kw,
    )


@asynccontextmanager
async def listening(opts: ConnectOptions) -> AsyncIterator[LocalListener]:
    listener = LocalListener(opts, "127.0.0.1", 0, report=print)
    await listener.start()
    task = asyncio.create_task(listener.serve())
    try:
        yield listener
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        yield server


async def test_echo_through_native_tunnel(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    audit = capture_audit(relay)
    async with listening(options(relay, tmp_path, issuer.mint(), echo.port)) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"hello through the relay")
        await writer.drain()
        assert await reader.readexactly(23) == b"hello through the relay"
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
    await relay.relay.wait_until(lambda: any(r["event"] == "tunnel_closed" for r in audit))
    decision = next(r for r in audit if r["event"] == "decision")
    assert decision["decision"] == "allow"
    assert decision["principal"] == "user:alice@example.com"
    assert decision["resource"] == "instance:p/z/vm1"
    closed = next(r for r in audit if r["event"] == "tunnel_closed")
    assert closed["bytes_from_client"] == 23
    assert closed["bytes_to_client"] == 23
    assert closed["close_code"] == 1000


async def test_half_close_each_direction(
    relay: RunningServer, issuer: TestIssuer, sink: TcpTarget, tmp_path: Path
) -> None:
    """The client half-closes; the target still answers afterwards (native EOF)."""
    payload = b"x" * 300_000
    async with listening(options(relay, tmp_path, issuer.mint(), sink.port)) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(payload)
        writer.write_eof()
        await writer.drain()
        answer = await reader.read()
        writer.close()
    assert answer.decode() == hashlib.sha256(payload).hexdigest()


async def test_bulk_both_directions_with_resume(
    relay: RunningServer, issuer: TestIssuer, sink: TcpTarget, tmp_path: Path
) -> None:
    """Drop the WebSocket (via a TCP proxy) several times mid-transfer: no byte lost."""
    proxy = await FaultProxy(relay.port).start()
    total = 24 * 1024 * 1024
    url = f"wss://127.0.0.1:{proxy.port}"
    opts = options(relay, tmp_path, issuer.mint(), sink.port, url=url, buffer_limit=2 * 1024 * 1024)
    try:
        async with listening(opts) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            # Drops are for an open tunnel: on a busy machine the first 2 MiB can sit in socket
            # buffers before the client has its SID, and a connect cut before the SID is a
            # failed connect, not a resume.
            session = await only_session(listener)
            await eventually(lambda: session.tunnel.sid is not None)
            sent = 0
            drops = 0
            for chunk in deterministic_chunks(total):
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                if sent % (2 * 1024 * 1024) == 0 and drops < DROPS:
                    drops += proxy.drop_all()
            writer.write_eof()
            answer = await reader.read()
            writer.close()
    finally:
        await proxy.stop()
    assert answer.decode() == deterministic_digest(total)
    assert drops >= 3
    assert proxy.connections == drops + 1


async def test_download_with_resume(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    total = 16 * 1024 * 1024
    source = await TcpTarget("source", source_bytes=total).start()
    proxy = await FaultProxy(relay.port).start()
    opts = options(relay, tmp_path, issuer.mint(), source.port, url=f"wss://127.0.0.1:{proxy.port}")
    try:
        async with listening(opts) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            digest = hashlib.sha256()
            got = 0
            next_drop = 3 * 1024 * 1024
            while data := await reader.read(65536):
                digest.update(data)
                got += len(data)
                if got >= next_drop:
                    proxy.drop_all()
                    next_drop += 3 * 1024 * 1024
            writer.close()
    finally:
        await proxy.stop()
        await source.stop()
    assert got == total
    assert digest.hexdigest() == deterministic_digest(total)
    assert proxy.connections >= 4


def _bad_tokens(issuer: TestIssuer) -> dict[str, str]:
    """At least three concrete vectors per class of the security guide's Tokens section."""
    rsa = issuer.signing["RSA"]
    claims = issuer.claims()
    return {
        # algorithm: none, HMAC keyed with the public key, header alg differing from the key
        "alg_none": forge_alg_none(claims),
        "alg_none_upper": forge_alg_none(claims, alg="NONE", kid=rsa.kid),
        "hs256_public_pem": forge_hmac(claims, rsa.public_pem(), kid=rsa.kid),
        "rs_key_es_header": tamper_header(issuer.mint(), alg="ES256"),
        # key material from the token itself is never followed
        "jku_header": issuer.mint(headers={"jku": "http://127.0.0.1:9/jwks"}),
        "jwk_header": issuer.mint(headers={"jwk": rsa.public_jwk()}),
        "x5u_header": issuer.mint(headers={"x5u": "http://127.0.0.1:9/cert"}),
        "unknown_kid": issuer.mint(kid="no-such-kid"),
        # issuer, audience, azp
        "wrong_issuer": issuer.mint(extra_claims={"iss": "https://evil.example"}),
        "issuer_trailing_slash": issuer.mint(extra_claims={"iss": issuer.issuer + "/"}),
        "wrong_audience": issuer.mint(aud="someone-else"),
        "audience_list_without_azp": issuer.mint(aud=["tunnel", "other"]),
        # time
        "expired": issuer.mint(lifetime=-600),
        "not_yet_valid": issuer.mint(extra_claims={"nbf": int(time.time()) + 3600}),
        "issued_in_future": issuer.mint(now=time.time() + 3600),
        "lifetime_too_long": issuer.mint(lifetime=48 * 3600),
        # tampering and structure
        "tampered_payload": tamper_payload(issuer.mint(), sub="root"),
        "garbage": "not-a-jwt",
        "jwe_like": forge_jwe_like(),
        "oversized": forge_oversized(issuer, 9000),
        "missing": "",
    }


BAD_TOKEN_REASONS = {
    "alg_none": "algorithm not allowed",
    "alg_none_upper": "algorithm not allowed",
    "hs256_public_pem": "algorithm not allowed",
    "rs_key_es_header": None,
    "jku_header": "unsupported header",
    "jwk_header": "unsupported header",
    "x5u_header": "unsupported header",
    "unknown_kid": "unknown key",
    "wrong_issuer": "bad issuer",
    "issuer_trailing_slash": "bad issuer",
    "wrong_audience": "bad audience",
    "audience_list_without_azp": "bad azp",
    "expired": "expired",
    "not_yet_valid": "not yet valid",
    "issued_in_future": "issued in the future",
    "lifetime_too_long": "lifetime too long",
    "tampered_payload": "bad signature",
    "garbage": "malformed",
    "jwe_like": "malformed",
    "oversized": "too large",
    "missing": "missing credentials",
}


@pytest.mark.parametrize("case", sorted(BAD_TOKEN_REASONS))
async def test_bad_tokens_refused_at_handshake(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path, case: str
) -> None:
    token = _bad_tokens(issuer)[case]
    audit = capture_audit(relay)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{relay.url}/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={echo.port}"
    with pytest.raises(InvalidStatus) as info:
        await connect(
            url,
            additional_headers=headers,
            subprotocols=[Subprotocol(NATIVE_SUBPROTOCOL)],
            ssl=client_ssl(tmp_path),
        )
    status = info.value.response.status_code
    # websockets itself refuses header lines over 8 KiB (431) before the relay sees them.
    assert status == (431 if case == "oversized" else 401)
    assert echo.connections == 0
    if status == 401:
        assert info.value.response.headers["WWW-Authenticate"].startswith("Bearer")
        expected = BAD_TOKEN_REASONS[case]
        if expected is not None:
            assert audit[-1]["reason"] == expected
        else:
            assert audit[-1]["decision"] == "deny"
    assert not token or token not in json.dumps(audit)


async def _close_code(
    relay: RunningServer,
    tmp_path: Path,
    token: str,
    query: str,
    subprotocol: str = NATIVE_SUBPROTOCOL,
) -> int:
    async with connect(
        f"{relay.url}{query}",
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[Subprotocol(subprotocol)],
        ssl=client_ssl(tmp_path),
    ) as ws:
        await ws.wait_closed()
    assert ws.close_code is not None
    return ws.close_code


async def test_not_authorized_is_4033_and_target_untouched(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    audit = capture_audit(relay)
    token = issuer.mint(sub="mallory", email="mallory@example.com")
    query = f"/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={echo.port}"
    for subprotocol in (NATIVE_SUBPROTOCOL, IAP_SUBPROTOCOL):
        assert await _close_code(relay, tmp_path, token, query, subprotocol) == 4033
    assert echo.connections == 0
    assert audit[-1]["decision"] == "deny"
    assert audit[-1]["principal"] == "user:mallory@example.com"


@pytest.mark.parametrize("detail", ["minimal", "reason"])
async def test_unknown_instance_is_4047(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path, detail: str
) -> None:
    """IAP's 4047 for gcloud; native clients learn the target is unknown only when the operator
    lets them (by default they hear "not authorized", which names no target)."""
    data = relay_config_data(issuer, tmp_path, tunnel={"denial_detail_unknown_target": detail})
    data["access"][0]["instances"] = ["*"]
    native = 4047 if detail == "reason" else 4033
    async with start_relay(data) as relay:
        audit = capture_audit(relay)
        query = f"/v4/connect?project=p&zone=z&instance=nope&interface=nic0&port={echo.port}"
        assert await _close_code(relay, tmp_path, issuer.mint(), query) == native
        assert await _close_code(relay, tmp_path, issuer.mint(), query, IAP_SUBPROTOCOL) == 4047
        query = f"/v4/connect?project=p&zone=z&instance=vm1&interface=nic7&port={echo.port}"
        assert await _close_code(relay, tmp_path, issuer.mint(), query) == native
    denials = [r for r in audit if r["event"] == "decision"]
    assert {r["category"] for r in denials} == {"unknown-target"}
    assert len({r["reference"] for r in denials}) == 3


async def test_unreachable_backend_is_4003(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    closed = await TcpTarget().start()
    port = closed.port
    await closed.stop()  # nothing listens there any more
    opts = options(relay, tmp_path, issuer.mint(), port)
    with pytest.raises(TunnelFailed) as info:
        await check_connection(opts)
    assert info.value.code == CloseCode.FAILED_TO_CONNECT_TO_BACKEND
    assert "4003" in str(info.value)


async def test_resume_needs_same_principal(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    token = issuer.mint()
    query = f"/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={echo.port}"
    async with connect(
        f"{relay.url}{query}",
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[Subprotocol(NATIVE_SUBPROTOCOL)],
        ssl=client_ssl(tmp_path),
    ) as ws:
        first = await ws.recv()
        assert isinstance(first, bytes)
        sid = first[6:].decode()
        ws.transport.abort()  # a drop: the relay parks the tunnel
    await relay.relay.wait_until(lambda: all(s.pump is None for s in relay.relay.sessions.values()))
    other = issuer.mint(sub="bob", email="bob@example.com")
    assert await _close_code(relay, tmp_path, other, f"/v4/reconnect?sid={sid}&ack=0") == 4001
    assert sid in relay.relay.sessions  # the owner can still resume


def tamper_header(token: str, **changes: Any) -> str:
    head, payload, signature = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    header.update(changes)
    raw = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{raw}.{payload}.{signature}"


async def test_login_discovery_document(issuer: TestIssuer, tmp_path: Path) -> None:
    import urllib.request

    data = relay_config_data(issuer, tmp_path)
    data["login"] = {"issuer": issuer.issuer, "client_id": "tunnel-cli", "resource": "urn:x"}
    async with start_relay(data) as relay:
        context = client_ssl(tmp_path)
        url = f"https://127.0.0.1:{relay.port}/.well-known/tunnel-client"

        def get() -> dict[str, Any]:
            with urllib.request.urlopen(url, context=context) as response:
                assert response.headers["Content-Type"] == "application/json"
                return dict(json.loads(response.read()))

        document = await asyncio.to_thread(get)
    assert document["issuer"] == issuer.issuer
    assert document["client_id"] == "tunnel-cli"
    assert document["resource"] == "urn:x"
    assert "openid" in document["scopes"]


async def test_health_endpoints(relay: RunningServer, tmp_path: Path) -> None:
    import urllib.request

    context = client_ssl(tmp_path)

    def get(path: str) -> int:
        with urllib.request.urlopen(f"https://127.0.0.1:{relay.port}{path}", context=context) as r:
            return int(r.status)

    assert await asyncio.to_thread(get, "/healthz") == 200
    assert await asyncio.to_thread(get, "/readyz") == 200


def test_relay_and_client_on_uvloop(tmp_path: Path) -> None:
    """An 8 MiB echo through relay and client with both on uvloop (the default when installed):
    uvloop's transports are not asyncio.Transport subclasses (which once broke TcpStream), and
    the acks of a longer transfer run its timers."""
    uvloop = pytest.importorskip("uvloop")
    payload = bytes(range(256)) * (8 * 4096)

    async def scenario() -> bytes:
        async with asyncio.timeout(400 * UNIT), TestIssuer() as issuer:
            echo = await TcpTarget("echo").start()
            try:
                async with start_relay(relay_config_data(issuer, tmp_path)) as relay:
                    opts = options(relay, tmp_path, issuer.mint(), echo.port)
                    async with listening(opts) as listener:
                        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)

                        async def send() -> None:
                            writer.write(payload)
                            await writer.drain()
                            writer.write_eof()

                        sending = asyncio.create_task(send())
                        data = await reader.read()
                        await sending
                        writer.close()
                        return data
            finally:
                await echo.stop()

    assert uvloop.run(scenario()) == payload


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "2130706433", "::ffff:127.0.0.1"])
async def test_group_that_does_not_name_loopback_cannot_reach_it(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path, host: str
) -> None:
    """SSRF: a destination group of 0.0.0.0/0 does not name loopback, so every spelling of a
    loopback address is refused (4033) and the target sees no connection."""
    data = relay_config_data(issuer, tmp_path)
    data["inventory"]["destination_groups"] = [
        {"project": "p", "region": "r", "network": "n", "name": "any",
         "cidrs": ["0.0.0.0/0", "::/0"]},
    ]  # fmt: skip
    data["access"].append(
        {"members": ["user:alice@example.com"], "destination_groups": ["p/r/n/any"],
         "ports": ["1-65535"]}
    )  # fmt: skip
    async with start_relay(data) as relay:
        audit = capture_audit(relay)
        query = f"/v4/connect?project=p&region=r&network=n&host={host}&port={echo.port}"
        assert await _close_code(relay, tmp_path, issuer.mint(), query) == 4033
    assert echo.connections == 0
    assert "loopback" in audit[-1]["reason"]


async def test_relay_never_tunnels_to_its_own_listener(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    """vm1 is 127.0.0.1 (named explicitly), but the relay's own port stays off limits."""
    query = f"/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={relay.port}"
    assert await _close_code(relay, tmp_path, issuer.mint(), query) == 4033
