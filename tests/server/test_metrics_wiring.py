"""The relay's metrics end to end: a relay configured with ``metrics:`` serves them on their own
port, and a tunnel, a refused token and a closed tunnel show up in what Prometheus scrapes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ..helpers import UNIT, TcpTarget, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..reliability.common import client_options, finished, listening, only_session


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_tunnels_refusals_and_bytes_are_scraped(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    data = relay_config_data(issuer, tmp_path, tls=False)
    data["metrics"] = {"listen": {"host": "127.0.0.1", "port": 0}}
    async with start_relay(data) as server:
        assert server.metrics_port is not None
        assert server.metrics_port != server.port
        with pytest.raises(InvalidStatus):
            await connect(
                f"{server.url}/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port=22",
                additional_headers={"Authorization": "Bearer not-a-jwt"},
            )
        opts = client_options(server.url, None, issuer.mint(), echo.port)
        async with listening(opts) as listener, asyncio.timeout(100 * UNIT):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            await only_session(listener)
            writer.write(b"x" * 1000)
            assert await reader.readexactly(1000) == b"x" * 1000
            during = await scrape(server.metrics_port)
            writer.close()
            await finished(listener)
        await server.relay.wait_until(lambda: not server.relay.sessions)
        after = await scrape(server.metrics_port)
    assert during[("tunnel_active", (("dialect", "native"), ("state", "attached")))] == 1
    assert during[("tunnel_opened_total", (("result", "allowed"),))] == 1
    assert during[("tunnel_opened_total", (("result", "unauthenticated"),))] == 1
    assert sum(v for (name, _), v in during.items() if name == "tunnel_auth_failures_total") == 1
    assert during[("tunnel_decision_seconds_count", ())] == 1
    assert during[("tunnel_state_store_up", ())] == 1
    assert after[("tunnel_active", (("dialect", "native"), ("state", "attached")))] == 0
    assert after[("tunnel_bytes_total", (("direction", "from_client"),))] == 1000
    assert after[("tunnel_bytes_total", (("direction", "to_client"),))] == 1000
    assert after[("tunnel_session_duration_seconds_count", ())] == 1
