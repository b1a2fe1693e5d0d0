"""The policy engine behind the relay: a time condition ending closes the open tunnel within the
bound; device posture from a client certificate (mTLS); the explain troubleshooter; audit
records asserted field by field."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from click.testing import CliRunner

from tunnel_client.session import TunnelFailed, check_connection
from tunnel_protocol import CloseCode
from tunnel_server.cli import main as server_main

from ..helpers import TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from .test_continuous import CLOSE_BOUND, OpenTunnel
from .test_device import issue
from .test_relay import client_ssl, options


def with_policy(data: dict[str, Any], tmp_path: Path, policy: dict[str, Any]) -> dict[str, Any]:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    data = dict(data)
    data["access"] = []
    data["policy_file"] = str(path)
    return data


async def test_tunnel_closes_when_its_time_condition_ends(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2)
    stamp = until.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    policy = {
        "bindings": [
            {
                "members": ["user:alice@example.com"],
                "role": "tunnelUser",
                "resources": {"instances": ["p/z/vm1"]},
                "condition": {
                    "title": "until",
                    "expression": f'request.time < timestamp("{stamp}")',
                },
            }
        ]
    }
    data = with_policy(relay_config_data(issuer, tmp_path), tmp_path, policy)
    async with start_relay(data) as relay:
        audit = capture_audit(relay)
        tunnel = await OpenTunnel(relay, tmp_path, issuer.mint(), echo.port).start(relay)
        assert tunnel.ended is not None
        failure = await asyncio.wait_for(tunnel.ended, timeout=2 + 2 * CLOSE_BOUND)
        closed_after = time.time() - until.timestamp()
        tunnel.close()
    assert isinstance(failure, TunnelFailed)
    assert failure.code == CloseCode.NOT_AUTHORIZED
    assert 0 <= closed_after < CLOSE_BOUND
    revoke = next(r for r in audit if r["event"] == "revoke")
    assert revoke["reason"].startswith("access ended")


def device_pki(tmp_path: Path) -> tuple[Path, trustme.CA]:
    device_ca = trustme.CA(organization_name="Example devices")
    ca_file = tmp_path / "device-ca.pem"
    device_ca.cert_pem.write_to_path(str(ca_file))
    return ca_file, device_ca


@pytest.mark.parametrize(("managed", "allowed"), [(True, True), (False, False)])
async def test_device_posture_from_client_certificate(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path, managed: bool, allowed: bool
) -> None:
    ca_file, device_ca = device_pki(tmp_path)
    uris = ["urn:device:os:linux", f"urn:device:managed:{str(managed).lower()}",
            "urn:device:encrypted:true"]  # fmt: skip
    device = issue(device_ca, tmp_path, common_names=("laptop-1",), uris=uris)
    policy = {
        "access_levels": {"managed_device": {"device": {"managed": True, "encrypted": True}}},
        "bindings": [
            {
                "members": ["user:alice@example.com"],
                "role": "tunnelUser",
                "resources": {"instances": ["p/z/vm1"]},
                "access_levels": ["managed_device"],
            }
        ],
    }
    data = with_policy(relay_config_data(issuer, tmp_path), tmp_path, policy)
    data["tls"]["device_ca"] = str(ca_file)
    async with start_relay(data) as relay:
        audit = capture_audit(relay)
        context = client_ssl(tmp_path)
        context.load_cert_chain(device.cert_file, device.key_file)
        opts = dataclasses.replace(
            options(relay, tmp_path, issuer.mint(), echo.port), ssl_context=context
        )
        if allowed:
            await check_connection(opts)
        else:
            with pytest.raises(TunnelFailed) as info:
                await check_connection(opts)
            assert info.value.code == CloseCode.NOT_AUTHORIZED
    decision = next(r for r in audit if r["event"] == "decision")
    # Audit records carry every field the audit schema promises (docs/audit.md).
    assert decision["device"] == "laptop-1"
    assert decision["decision"] == ("allow" if allowed else "deny")
    for key in ("time", "node", "principal", "source_ip", "resource", "port", "reason",
                "binding", "dialect"):  # fmt: skip
        assert key in decision
    if allowed:
        assert decision["address"] == "127.0.0.1"
        assert decision["tunnel_id"]
    assert echo.connections == (1 if allowed else 0)


async def test_no_device_certificate_means_no_device(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    ca_file, _ = device_pki(tmp_path)
    policy = {
        "access_levels": {"managed_device": {"device": {"managed": True}}},
        "bindings": [{"members": ["user:alice@example.com"], "role": "tunnelUser",
                      "resources": {"instances": ["p/z/vm1"]},
                      "access_levels": ["managed_device"]}],
    }  # fmt: skip
    data = with_policy(relay_config_data(issuer, tmp_path), tmp_path, policy)
    data["tls"]["device_ca"] = str(ca_file)
    async with start_relay(data) as relay:
        with pytest.raises(TunnelFailed) as info:
            await check_connection(options(relay, tmp_path, issuer.mint(), echo.port))
    assert info.value.code == CloseCode.NOT_AUTHORIZED
    assert echo.connections == 0


def test_policy_explain_command(issuer_url: str, tmp_path: Path) -> None:
    data = relay_config_data_static(issuer_url, tmp_path)
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump(data))
    runner = CliRunner()
    base = ["policy", "explain", "--config", str(config), "--instance", "vm1", "--port", "22"]
    allowed = runner.invoke(server_main, [*base, "--member", "user:alice@example.com"])
    assert allowed.exit_code == 0, allowed.output
    assert allowed.stdout.startswith("decision: ALLOW")
    denied = runner.invoke(server_main, [*base, "--member", "user:bob@example.com", "--json"])
    assert denied.exit_code == 1
    assert '"allowed": false' in denied.stdout


@pytest.fixture
def issuer_url() -> str:
    return "https://idp.example.com"


def relay_config_data_static(issuer_url: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "oidc": {"issuer": issuer_url, "audiences": ["tunnel"]},
        "inventory": {
            "instances": [{"project": "p", "zone": "z", "name": "vm1", "address": "10.0.0.5"}]
        },  # fmt: skip
        "access": [
            {"members": ["user:alice@example.com"], "instances": ["p/z/vm1"], "ports": [22]}
        ],  # fmt: skip
    }
