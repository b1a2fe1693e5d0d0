"""Refusals that explain themselves without leaking policy (issue 12): native clients hear the
kind of refusal and a reference, as much as the operator allows; gcloud keeps IAP's codes and
texts; the audit record carries the same reference, and an admin can ask why by it. 401s say
what is wrong with the token (RFC 6750 ``error_description``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tunnel_protocol import IAP_SUBPROTOCOL, NATIVE_SUBPROTOCOL
from tunnel_server.cli import main as server_main

from ..helpers import TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from .test_relay import client_ssl

REFUSAL = re.compile(r"^(?P<category>[a-z -]+); ref=(?P<ref>[0-9a-f]{12})$")


async def refusal(
    url: str, tmp_path: Path, token: str, port: int, subprotocol: str = NATIVE_SUBPROTOCOL,
    instance: str = "vm1",
) -> tuple[int, str]:  # fmt: skip
    query = f"/v4/connect?project=p&zone=z&instance={instance}&interface=nic0&port={port}"
    async with connect(
        url + query,
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[Subprotocol(subprotocol)],
        ssl=client_ssl(tmp_path),
    ) as ws:
        await ws.wait_closed()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


def config(issuer: TestIssuer, tmp_path: Path, **tunnel: Any) -> dict[str, Any]:
    data = relay_config_data(issuer, tmp_path, tunnel=tunnel)
    data["access"][0]["ports"] = ["22"]  # alice: vm1, port 22 only
    data["admin"] = {"listen": {"host": "127.0.0.1", "port": 0}, "members": ["group:admins"]}
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        json.dumps(
            {
                "access_levels": {"corp": {"ip_subnetworks": ["10.0.0.0/8"]}},
                "bindings": [
                    {"name": "carol-from-corp", "members": ["user:carol@example.com"],
                     "role": "tunnelUser", "resources": {"instances": ["p/z/vm1"]},
                     "access_levels": ["corp"]},
                ],
            }
        )
    )  # fmt: skip
    data["policy_file"] = str(policy)
    return data


async def test_native_refusals_carry_their_kind_and_a_reference(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    async with start_relay(config(issuer, tmp_path)) as relay:
        audit = capture_audit(relay)
        cases = {
            "policy": issuer.mint(sub="mallory", email="mallory@example.com"),
            "port": issuer.mint(),  # alice, on a port her grant does not cover
            "access-level": issuer.mint(sub="carol", email="carol@example.com"),
        }
        seen = {}
        for category, token in cases.items():
            code, reason = await refusal(relay.url, tmp_path, token, echo.port)
            match = REFUSAL.match(reason)
            assert (code, match and match["category"]) == (4033, category), reason
            seen[category] = match["ref"] if match else ""
        # gcloud's dialect: IAP's code and text, exactly.
        iap = await refusal(relay.url, tmp_path, cases["policy"], echo.port, IAP_SUBPROTOCOL)
        assert iap == (4033, "not authorized")
    for category, reference in seen.items():
        assert reference in {r.get("reference") for r in audit if r.get("category") == category}
    assert echo.connections == 0


async def test_minimal_detail_says_only_not_authorized(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    async with start_relay(config(issuer, tmp_path, denial_detail="minimal")) as relay:
        token = issuer.mint(sub="mallory", email="mallory@example.com")
        code, reason = await refusal(relay.url, tmp_path, token, echo.port)
    match = REFUSAL.match(reason)
    assert code == 4033
    assert match is not None
    assert match["category"] == "not authorized"


async def test_an_admin_explains_a_refusal_by_its_reference(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    async with start_relay(config(issuer, tmp_path)) as relay:
        token = issuer.mint(sub="carol", email="carol@example.com")
        _, reason = await refusal(relay.url, tmp_path, token, echo.port)
        match = REFUSAL.match(reason)
        assert match is not None
        admin_url = f"http://127.0.0.1:{relay.admin_port}"
        async with aiohttp.ClientSession() as http:
            admin = issuer.mint(sub="root", email="root@example.com", groups=["admins"])
            headers = {"Authorization": f"Bearer {admin}"}
            async with http.get(
                f"{admin_url}/admin/explain", params={"reference": match["ref"]}, headers=headers
            ) as response:
                assert response.status == 200
                body = await response.json()
            async with http.get(
                f"{admin_url}/admin/explain", params={"reference": "0" * 12}, headers=headers
            ) as response:
                assert response.status == 404
            # A user cannot look refusals up.
            async with http.get(
                f"{admin_url}/admin/explain",
                params={"reference": match["ref"]},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                assert response.status == 403
        assert body["category"] == "access-level"
        assert any("corp" in line for line in body["lines"])
        token_file = tmp_path / "admin.token"
        token_file.write_text(issuer.mint(sub="root", email="root@example.com", groups=["admins"]))
        result = await _cli(
            ["policy", "explain", "--reference", match["ref"], "--admin-url", admin_url,
             "--token-file", str(token_file)]
        )  # fmt: skip
    assert result.exit_code == 1  # a refusal explained: the decision was DENY
    assert f"refusal {match['ref']}: access-level" in result.output
    assert "DENY" in result.output


async def _cli(args: list[str]) -> Any:
    import asyncio

    return await asyncio.to_thread(CliRunner().invoke, server_main, args)


@pytest.mark.parametrize(
    ("token_kind", "description"),
    [
        ("expired", "token expired"),
        ("audience", "wrong audience"),
        ("issuer", "unknown issuer"),
        ("garbage", "malformed token"),
    ],
)
async def test_401s_say_what_is_wrong_with_the_token(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path, token_kind: str, description: str
) -> None:
    tokens = {
        "expired": issuer.mint(lifetime=-120),
        "audience": issuer.mint(aud="someone-else"),
        "issuer": issuer.mint(extra_claims={"iss": "https://other.example.com"}),
        "garbage": "not.a.token",
    }
    async with start_relay(config(issuer, tmp_path)) as relay:
        with pytest.raises(InvalidStatus) as info:
            await refusal(relay.url, tmp_path, tokens[token_kind], echo.port)
    response = info.value.response
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert 'error="invalid_token"' in challenge
    assert f'error_description="{description}"' in challenge
