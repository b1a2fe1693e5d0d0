"""Node-to-node forwarding: the proof a forwarding node gives (HMAC over node, client address,
path and time) and what a relay does with a forwarding claim it cannot verify."""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tunnel_server.config import ConfigError, parse_config
from tunnel_server.relay.forwarding import (
    MAX_SKEW,
    SIGNATURE_HEADER,
    ForwardRefused,
    OwnerUnreachable,
    forward_headers,
    open_forward,
    verify_forward,
)

from ..helpers import capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer

SECRET = b"s" * 32
PATH = "/v4/reconnect?sid=abc&ack=0&zone=z"


def test_a_signed_forward_verifies() -> None:
    now = time.time()
    headers = forward_headers(SECRET, "relay-1", "192.0.2.7", PATH, now)
    forwarded = verify_forward(headers, PATH, SECRET, now + 1)
    assert forwarded is not None
    assert (forwarded.node, forwarded.client_ip) == ("relay-1", "192.0.2.7")
    assert verify_forward(Headers(), PATH, SECRET, now) is None  # not forwarded at all


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda h: h.update({"x-tunnel-client-ip": "10.0.0.1"}), "signature"),
        (lambda h: h.update({"x-tunnel-forwarded-by": "relay-9"}), "signature"),
        (lambda h: h.update({SIGNATURE_HEADER.lower(): "0" * 64}), "signature"),
        (lambda h: h.update({"x-tunnel-forward-time": "soon"}), "time"),
    ],
)
def test_tampered_forwards_are_refused(change: object, why: str) -> None:
    now = time.time()
    headers = forward_headers(SECRET, "relay-1", "192.0.2.7", PATH, now)
    values = {k.lower(): headers[k] for k in headers}
    change(values)  # type: ignore[operator]
    with pytest.raises(ForwardRefused, match=why):
        verify_forward(Headers(values), PATH, SECRET, now)


def test_replays_other_paths_and_other_secrets_are_refused() -> None:
    now = time.time()
    headers = forward_headers(SECRET, "relay-1", "192.0.2.7", PATH, now)
    with pytest.raises(ForwardRefused, match="stale"):
        verify_forward(headers, PATH, SECRET, now + MAX_SKEW + 2)
    with pytest.raises(ForwardRefused, match="signature"):
        verify_forward(headers, PATH.replace("abc", "xyz"), SECRET, now)
    with pytest.raises(ForwardRefused, match="signature"):
        verify_forward(headers, PATH, b"t" * 32, now)
    with pytest.raises(ForwardRefused, match="without a cluster"):
        verify_forward(headers, PATH, None, now)
    partial = Headers({"X-Tunnel-Forwarded-By": "relay-1"})
    with pytest.raises(ForwardRefused, match="incomplete"):
        verify_forward(partial, PATH, SECRET, now)


async def test_a_client_claiming_to_be_a_node_is_refused(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    """Forged forwarding headers (to smuggle a client address past source.ip conditions) get
    403 before any authentication, on a single relay and on a cluster node alike."""
    async with start_relay(relay_config_data(issuer, tmp_path, tls=False)) as server:
        audit = capture_audit(server)
        forged = forward_headers(b"x" * 32, "relay-1", "10.0.0.1", PATH, time.time())
        forged["Authorization"] = f"Bearer {issuer.mint()}"
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.url + PATH, additional_headers=forged)
        assert refused.value.response.status_code == 403
        assert audit[-1]["reason"] == "forwarded handshake to a relay without a cluster"
        assert audit[-1]["source_ip"] == "127.0.0.1"


def test_cluster_config_errors_are_precise(tmp_path: Path) -> None:
    base = {"oidc": {"issuer": "https://idp.example.com", "audiences": ["tunnel"]}}
    with pytest.raises(ConfigError, match="needs redis_url"):
        parse_config({**base, "state": {"backend": "redis"}}, env={})
    with pytest.raises(ConfigError, match="needs a cluster section"):
        parse_config({**base, "state": {"backend": "redis", "redis_url": "redis://r"}}, env={})
    cluster = {"advertise_url": "ws://10.0.0.5:8443"}
    with pytest.raises(ConfigError, match="exactly one of secret, secret_file"):
        parse_config(
            {**base, "state": {"backend": "redis", "redis_url": "redis://r"}, "cluster": cluster},
            env={},
        )
    with pytest.raises(ConfigError, match="at least 32"):
        parse_config({**base, "cluster": {**cluster, "secret": "short"}}, env={})
    secret_file = tmp_path / "secret"
    secret_file.write_text("too short\n")
    config = parse_config({**base, "cluster": {**cluster, "secret_file": str(secret_file)}})
    assert config.cluster is not None
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        config.cluster.secret_bytes()


def test_environment_supplies_secrets_and_per_node_values() -> None:
    data = {
        "oidc": {"issuer": "https://idp.example.com", "audiences": ["tunnel"]},
        "state": {"backend": "redis"},
        "cluster": {"advertise_url": "ws://placeholder:8443", "secret_file": "/nonexistent"},
    }
    env = {
        "TUNNEL_REDIS_URL": "redis://:pw@redis:6379/0",
        "TUNNEL_CLUSTER_SECRET": "k" * 40,
        "TUNNEL_NODE_ID": "relay-7f9c",
        "TUNNEL_ADVERTISE_URL": "ws://10.1.2.3:8443",
    }
    config = parse_config(data, env=env)
    assert config.state.redis_url == "redis://:pw@redis:6379/0"
    assert config.cluster is not None
    assert config.cluster.secret_bytes() == b"k" * 40  # the environment wins over the file
    assert config.cluster.node_id == "relay-7f9c"
    assert config.cluster.advertise_url == "ws://10.1.2.3:8443"
    # A variable completes a section the file has; it never creates one.
    plain = parse_config({"oidc": data["oidc"]}, env=env)
    assert plain.cluster is None
    assert plain.state.backend == "memory"


async def test_nodes_reached_by_address_verify_the_shared_name() -> None:
    """Pods are reached by IP but all serve the public name's certificate: ``server_name``
    verifies that name; without it the check against the IP fails (no silent downgrade)."""
    ca = trustme.CA()
    cert = ca.issue_cert("relay.internal")  # not valid for 127.0.0.1
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def handler(ws: ServerConnection) -> None:
        await ws.send(b"owner")

    async with serve(
        handler, "127.0.0.1", 0, ssl=server_ctx, subprotocols=[Subprotocol("x")]
    ) as server:
        port = server.sockets[0].getsockname()[1]
        options: dict[str, Any] = {
            "authorization": "Bearer x",
            "subprotocols": [Subprotocol("x")],
            "extra": Headers(),
            "ssl_context": client_ctx,
            "open_timeout": 5,
            "max_size": 1 << 16,
        }
        url = f"wss://127.0.0.1:{port}"
        owner = await open_forward(url, "/", server_name="relay.internal", **options)
        assert await owner.recv() == b"owner"
        await owner.close()
        with pytest.raises(OwnerUnreachable, match="owner unreachable"):
            await open_forward(url, "/", **options)


@pytest.mark.parametrize(
    ("trusted", "xff", "seen"),
    [
        ([], "203.0.113.9", "127.0.0.1"),  # no trusted proxies: the header is ignored
        (["127.0.0.0/8"], "203.0.113.9", "203.0.113.9"),  # the balancer vouches for it
        (["127.0.0.0/8"], "198.51.100.1, 203.0.113.9", "203.0.113.9"),  # right-most hop
        (["10.0.0.0/8"], "203.0.113.9", "127.0.0.1"),  # the peer is not a trusted proxy
    ],
)
async def test_x_forwarded_for_only_from_trusted_proxies(
    issuer: TestIssuer, tmp_path: Path, trusted: list[str], xff: str, seen: str
) -> None:
    """Behind a TLS-terminating balancer the client's address comes from X-Forwarded-For, but
    only when the TCP peer is a configured trusted proxy (policy's source.ip and the audit
    records use it)."""
    data = relay_config_data(issuer, tmp_path, tls=False)
    data["trusted_proxies"] = trusted
    async with start_relay(data) as server:
        audit = capture_audit(server)
        with pytest.raises(InvalidStatus):
            await connect(
                f"{server.url}/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port=22",
                additional_headers={"Authorization": "Bearer x", "X-Forwarded-For": xff},
            )
        assert audit[-1]["status"] == 401
        assert audit[-1]["source_ip"] == seen
