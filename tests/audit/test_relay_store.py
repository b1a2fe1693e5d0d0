"""The audit store wired into a real relay: a tunnel's decision and close reach the database
(SQLite, and PostgreSQL), and with the database down tunnels work as before while the records
that do not fit the queue are counted as dropped in the metrics (and still logged)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tunnel_server.audit_store import AuditQuery
from tunnel_server.config import ConfigError

from ..helpers import UNIT, TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..ports import free_port
from ..reliability.common import client_options, finished, listening, only_session
from ..server.test_metrics_wiring import scrape

CONNECT = "/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port=22"


async def echo_once(url: str, token: str, port: int) -> None:
    opts = client_options(url, None, token, port)
    async with listening(opts) as listener, asyncio.timeout(100 * UNIT):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        await only_session(listener)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await finished(listener)


async def refused(url: str) -> None:
    with pytest.raises(InvalidStatus):
        await connect(url + CONNECT, additional_headers={"Authorization": "Bearer not-a-jwt"})


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_tunnel_reaches_the_store(
    backend: str,
    issuer: TestIssuer,
    echo: TcpTarget,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    data = relay_config_data(issuer, tmp_path, tls=False)
    store: dict[str, Any] = {"backend": backend, "path": str(tmp_path / "a.db")}
    if backend == "postgres":
        store["dsn"] = request.getfixturevalue("postgres_dsn")
    data |= {"audit_store": store, "metrics": {"listen": {"host": "127.0.0.1", "port": 0}}}
    async with start_relay(data) as server:
        writer = server.audit_store
        assert writer is not None
        assert server.metrics_port is not None
        await echo_once(server.url, issuer.mint(), echo.port)
        await server.relay.wait_until(lambda: not server.relay.sessions)
        await writer.flush()
        page = await writer.search(AuditQuery(principal="user:alice@example.com"))
        events = [r.record["event"] for r in page.records]
        assert events == ["tunnel_closed", "decision"]
        closed, decision = (r.record for r in page.records)
        assert decision["decision"] == "allow"
        assert closed["tunnel_id"] == decision["tunnel_id"]
        assert closed["bytes_from_client"] == 4
        assert closed["node"] == "test-node"
        metrics = await scrape(server.metrics_port)
    assert metrics[("tunnel_audit_store_written_total", ())] >= 2
    assert metrics[("tunnel_audit_store_dropped_total", ())] == 0
    assert metrics[("tunnel_audit_store_up", ())] == 1


async def test_store_down_tunnels_work_and_drops_are_counted(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    data = relay_config_data(issuer, tmp_path, tls=False)
    nowhere = f"postgresql://tunnel@127.0.0.1:{free_port()}/audit"  # nothing listens there
    data |= {
        "audit_store": {"backend": "postgres", "dsn": nowhere, "queue_size": 10, "timeout": 1},
        "metrics": {"listen": {"host": "127.0.0.1", "port": 0}},
    }
    async with start_relay(data) as server:
        records = capture_audit(server)
        assert server.metrics_port is not None
        for _ in range(12):
            await refused(server.url)
        await echo_once(server.url, issuer.mint(), echo.port)  # the tunnel does not wait
        await server.relay.wait_until(lambda: not server.relay.sessions)
        metrics = await scrape(server.metrics_port)
    assert [r["event"] for r in records].count("handshake") == 12
    assert {"decision", "tunnel_closed"} <= {r["event"] for r in records}
    assert metrics[("tunnel_audit_store_up", ())] == 0
    assert metrics[("tunnel_audit_store_dropped_total", ())] >= len(records) - 10
    assert metrics[("tunnel_audit_store_written_total", ())] == 0


async def test_a_schema_from_a_newer_relay_stops_the_start(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 5")
    db.close()
    data = relay_config_data(issuer, tmp_path, tls=False)
    data["audit_store"] = {"path": str(path)}
    with pytest.raises(ConfigError, match="schema version 5"):
        async with start_relay(data):
            raise AssertionError("started")
