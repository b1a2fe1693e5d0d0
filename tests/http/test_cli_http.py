"""``tunnel-client http APP_URL``: the local proxy adds the token (a real subprocess)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import aiohttp

from ..oidc_fixture import TestIssuer
from .harness import APP_AUDIENCE, proxy_stack, web_policy


async def test_cli_http_proxy_adds_token(issuer: TestIssuer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(issuer.mint(aud=APP_AUDIENCE, lifetime=600))
    policy = web_policy({"demo": ["user:alice@example.com"]})
    # *.localhost does not resolve through getaddrinfo here: route the app on 127.0.0.1.
    async with proxy_stack(issuer.issuer, policy, hosts={"demo": "127.0.0.1"}) as stack:
        env = {**os.environ, "TUNNEL_CLIENT_HOME": str(tmp_path)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tunnel_client", "http", stack.base,
            "--local-host-port", "127.0.0.1:0", "--access-token-file", str(token_file),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
            match = re.fullmatch(r"Listening on port \[(\d+)\]\.\n", line)
            assert match, line
            local = f"http://127.0.0.1:{match.group(1)}"
            async with aiohttp.ClientSession() as http:
                headers: dict[str, str] = {}
                async with http.get(local + "/headers", headers=headers) as resp:
                    assert resp.status == 200
                    body = await resp.json()
                    assert body["claims"]["email"] == "alice@example.com"
                async with http.post(local + "/upload", data=b"x" * 300000, headers=headers) as r:
                    assert (await r.json())["bytes"] == 300000
                async with http.ws_connect(local + "/ws", headers=headers) as ws:
                    await ws.send_str("ping")
                    assert await ws.receive_str() == "ping"
        finally:
            process.terminate()
            await process.wait()
