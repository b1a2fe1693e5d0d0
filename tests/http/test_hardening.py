"""HTTP-mode hardening (issue 17): every family of foreign identity, client-address and
URL-override headers is stripped in every case and separator variant, operators add names and
routes pass one through; path parameters are refused, or stripped before both the decision and
the forwarding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pydantic
import pytest

from tunnel_server.config import HttpModeConfig
from tunnel_server.web.foreign import FAMILIES, Family, HeaderFilter, canonical, family_of
from tunnel_server.web.headers import is_identity_header
from tunnel_server.web.paths import BadRequest, normalize_path

from ..oidc_fixture import TestIssuer
from .harness import APP_AUDIENCE, Stack, proxy_stack, web_policy

ALICE = "user:alice@example.com"

# What an upstream is meant to get from the client: never stripped.
ORDINARY = ["Accept", "Content-Type", "User-Agent", "X-Request-Id", "X-Api-Key", "X-Csrf-Token",
            "If-None-Match", "X-Requested-With", "Origin", "Referer", "Cookie", "X-Userland",
            "Remote", "X-Authorization-Context", "Cfg-Version", "X-Amz-Date"]  # fmt: skip


def variants(name: str) -> list[str]:
    """The name as sent by different clients: case, ``_`` and ``.`` for ``-``."""
    title = "-".join(part.capitalize() for part in name.split("-"))
    return [name, name.upper(), title, name.replace("-", "_"), title.replace("-", "_").upper(),
            title.replace("-", ".")]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_stripped_in_every_variant(family: Family) -> None:
    assert family.source
    assert family.examples()
    for example in family.examples():
        for name in variants(example):
            assert is_identity_header(name), name
            assert family_of(name) is not None, name


@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_headers_pass(name: str) -> None:
    assert not is_identity_header(name)


def test_operator_additions_and_route_pass_through() -> None:
    strip = HeaderFilter(["X-Corp-User", "X-Sso-*"], passed=["X-Auth-Token", "X-Tunnel-Foo"])
    for name in ["X-Corp-User", "x_corp_user", "X-SSO-Anything", "x_sso_groups"]:
        assert strip.strips(name), name
    assert not strip.strips("X-Auth-Token")  # passed through for this route
    assert not strip.strips("x_auth_token")  # (any spelling of it)
    assert strip.strips("X-Auth-User")  # the rest of its family is not
    assert strip.strips("X-Tunnel-Foo")  # the proxy's own headers never pass
    assert HeaderFilter().strips("X-Auth-Token")
    assert canonical("X.Remote_User") == "x-remote-user"


def _config(**route: Any) -> dict[str, Any]:
    return {
        "issuer_url": "https://relay.example.com",
        "routes": [{"name": "a", "host": "a.example.com", "upstream": "http://10.0.0.1",
                    **route}],
    }  # fmt: skip


@pytest.mark.parametrize(
    "route",
    [{"pass_headers": ["X-Tunnel-Jwt-Assertion"]}, {"pass_headers": ["x_tunnel_anything"]},
     {"pass_headers": ["X-Forwarded-For"]}, {"pass_headers": ["X_Forwarded_Host"]},
     {"pass_headers": ["bad header"]}, {"pass_headers": ["X-A*"]},
     {"path_parameters": "ignore"}],
)  # fmt: skip
def test_config_refuses(route: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        HttpModeConfig.model_validate(_config(**route))


def test_config_strip_headers_validated() -> None:
    HttpModeConfig.model_validate({**_config(), "strip_headers": ["X-Corp-User", "X-Sso-*"]})
    for bad in (["*"], ["a b"], ["X-*-Y"]):
        with pytest.raises(pydantic.ValidationError):
            HttpModeConfig.model_validate({**_config(), "strip_headers": bad})


async def _seen(stack: Stack, path: str, headers: list[tuple[str, str]], app: str = "demo"
                ) -> tuple[int, Any]:  # fmt: skip
    async with aiohttp.ClientSession() as http, http.get(
        stack.base + path, headers=[("Host", stack.host(app)), *headers]
    ) as resp:  # fmt: skip
        text = await resp.text()
        return resp.status, json.loads(text) if resp.status == 200 else text


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
async def test_family_never_reaches_the_upstream(issuer: TestIssuer, family: Family) -> None:
    """Through the proxy, in process: a signed-in caller's forged headers of the family, in
    every spelling, are gone at the upstream; the ordinary ones arrive."""
    policy = web_policy({"demo": [ALICE]})
    async with proxy_stack(issuer.issuer, policy, apps=("demo",)) as stack:
        token = issuer.mint(aud=APP_AUDIENCE)
        forged = [(name, "forged") for ex in family.examples() for name in variants(ex)]
        status, body = await _seen(
            stack, "/headers", [("Authorization", f"Bearer {token}"), ("X-Api-Key", "k"),
                                *forged]
        )  # fmt: skip
    assert status == 200, body
    seen = {k.lower(): v for k, v in body["headers"]}
    leaked = {k: v for k, v in body["headers"] if v == "forged"}
    assert not leaked
    assert seen["x-api-key"] == "k"
    assert seen["x-tunnel-jwt-assertion"] != "forged"


async def test_strip_headers_and_pass_headers_end_to_end(issuer: TestIssuer) -> None:
    policy = web_policy({"demo": [ALICE], "other": [ALICE]})
    extra = {"strip_headers": ["X-Corp-User"]}
    options = {"demo": {"pass_headers": ["X-Auth-Token"]}}
    async with proxy_stack(issuer.issuer, policy, extra=extra, route_options=options) as stack:
        sent = [("X-Corp-User", "mallory"), ("X-Auth-Token", "app-token")]
        _, demo = await _seen(
            stack, "/headers", [("Authorization", f"Bearer {issuer.mint(aud=APP_AUDIENCE)}"),
                                *sent],
        )  # fmt: skip
        _, other = await _seen(
            stack, "/headers",
            [("Authorization", f"Bearer {issuer.mint(aud='https://other.app')}"), *sent],
            app="other",
        )  # fmt: skip
    demo_seen = {k.lower(): v for k, v in demo["headers"]}
    other_seen = {k.lower(): v for k, v in other["headers"]}
    assert demo_seen.get("x-auth-token") == "app-token"
    assert "x-auth-token" not in other_seen
    assert "x-corp-user" not in demo_seen
    assert "x-corp-user" not in other_seen


# -- path parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [("/a;v=1", "/a"), ("/admin;jsessionid=x/page", "/admin/page"),
     ("/public;x/../admin", "/admin"), ("/a;b;c/d;e", "/a/d"), ("/%61dmin;x", "/admin")],
)  # fmt: skip
def test_path_parameters_taken_off(raw: str, forwarded: str) -> None:
    path = normalize_path(raw)
    assert (path.raw, path.decoded, path.parameters) == (forwarded, forwarded, True)
    assert not normalize_path("/admin/page").parameters


@pytest.mark.parametrize("raw", ["/admin%3bx", "/a%3B/b", "/..;x/a", "/a/;x", "/.;x"])
def test_ambiguous_semicolons_refused(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_path(raw)


async def test_path_parameters_refused_or_stripped(issuer: TestIssuer) -> None:
    """Default: 400, and the upstream is never asked. ``strip``: the policy decides on the path
    without parameters and the upstream gets that same path (a rule on /headers/admin and
    everything under it catches /headers/admin;x/...)."""
    policy = web_policy(
        {},
        extra=[{"name": "not-admin", "members": [ALICE], "role": "webUser",
                "resources": {"apps": ["demo", "other"]},
                "condition": "!request.path.startsWith('/headers/admin')"}],
    )  # fmt: skip
    options = {"other": {"path_parameters": "strip"}}
    async with proxy_stack(issuer.issuer, policy, route_options=options) as stack:
        token = issuer.mint(aud=APP_AUDIENCE)
        other = issuer.mint(aud="https://other.app")
        for path in ["/headers/x;a=1", "/headers/admin;jsessionid=1/secret"]:
            status, _ = await _seen(stack, path, [("Authorization", f"Bearer {token}")])
            assert status == 400, path
        assert not any('"decision":"allow"' in line for line in stack.audit)
        bearer = [("Authorization", f"Bearer {other}")]
        status, _ = await _seen(stack, "/headers/admin;jsessionid=1/secret", bearer, "other")
        assert status == 403
        status, _ = await _seen(stack, "/headers/public;v=2/../admin/x", bearer, "other")
        assert status == 403
        status, body = await _seen(stack, "/headers/docs;v=2/page;x?q=;1", bearer, "other")
        assert status == 200
        assert body["path"] == "/headers/docs/page?q=;1"
    decided = [json.loads(line)["path"] for line in stack.audit if '"path"' in line]
    assert decided == ["/headers/admin/secret", "/headers/admin/x", "/headers/docs/page"]


def test_docs_table_matches_the_module() -> None:
    """docs/http-mode.md's "Stripped headers" table lists each family with its names."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "http-mode.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in doc.splitlines()
            if line.startswith("| ")}  # fmt: skip
    for family in FAMILIES:
        row = rows.get(family.name)
        assert row is not None, family.name
        cells = row.split(" | ")[1]
        listed = {n.strip("`") for n in cells.split(", ")}
        assert listed == {*family.exact, *(p + "*" for p in family.prefixes)}, family.name
