"""The console's SSH certificates page: what the relay issued, found in the audit store, with
each certificate's status (valid, then revoked once its user is revoked); a relay without an SSH
CA says so."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import asyncssh

from tunnel_protocol.urls import SSH_PUBLIC_KEY_HEADER, InstanceTarget, certificate_query
from tunnel_server.audit_store import AuditQuery

from ..oidc_fixture import TestIssuer
from .harness import console_stack, identity

CAROL = identity("carol@example.com")  # the admin at the console


def _ca(path: Path) -> Path:
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(path))
    return path


async def test_issued_certificates_and_their_status(issuer: TestIssuer, tmp_path: Path) -> None:
    grant = {"members": ["user:alice@example.com"], "instances": ["p/z/vm1"], "ports": ["22"],
             "logins": ["{email_local}"]}  # fmt: skip
    extra = {"ssh": {"user_ca_key_file": str(_ca(tmp_path / "user_ca"))}, "access": [grant]}
    async with console_stack(issuer, tmp_path, extra) as stack:
        key = asyncssh.generate_private_key("ssh-ed25519")
        url = stack.server.url.replace("ws://", "http://") + certificate_query(
            InstanceTarget("p", "z", "vm1", "nic0", 22)
        )
        headers = {"Authorization": f"Bearer {issuer.mint(lifetime=900)}",
                   SSH_PUBLIC_KEY_HEADER: key.export_public_key().decode().strip()}  # fmt: skip
        async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
            assert response.status == 200, await response.text()
            certificate = asyncssh.import_certificate(await response.text())
        assert certificate.principals == ["alice"]  # type: ignore[attr-defined]
        store = stack.server.audit_store
        assert store is not None
        await store.flush()
        async with stack.browser(CAROL) as (client, csrf):
            async with client.get("/console/certificates?user=alice@example.com") as response:
                html = await response.text()
            rows = re.findall(r"<tr class='cert-(\w+)'>(.*?)</tr>", html)
            assert len(rows) == 1
            status, cells = rows[0]
            assert status == "valid"
            assert "<td>alice</td>" in cells  # the login name granted
            assert "<td>instance:p/z/vm1</td>" in cells
            [record] = (await store.search(AuditQuery(event="ssh_certificate"))).records
            assert f"<td>{record.record['reference']}</td>" in cells
            # Revoking the user (from the console, as an admin would) revokes the certificate.
            headers = {"X-Console-Csrf": csrf, "Origin": stack.origin}
            body = {"kind": "user", "subject": "user:alice@example.com"}
            async with client.post("/console/api/revoke", json=body, headers=headers) as response:
                assert response.status == 200
            async with client.get("/console/certificates") as response:
                assert "<tr class='cert-revoked'>" in await response.text()
            async with client.get("/console/certificates?user=bob@example.com") as response:
                assert "No certificates match." in await response.text()


async def test_without_an_ssh_ca_the_page_says_so(issuer: TestIssuer, tmp_path: Path) -> None:
    async with console_stack(issuer, tmp_path) as stack, stack.browser(CAROL) as (client, _):
        async with client.get("/console/certificates") as response:
            assert response.status == 200
            assert "issues no SSH certificates" in await response.text()
