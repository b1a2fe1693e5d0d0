"""The same bare reverse proxy as ``bench.http_bare`` with granian's Rust HTTP server in front
(RSGI interface, uvloop) and the aiohttp client behind: does a faster server change the picture?
Run by ``bench.http_mode --granian`` when granian is installed (it is not a dependency).

    granian --interface rsgi --loop uvloop --workers 1 --runtime-mode st \\
        --host 127.0.0.1 --port PORT bench.http_bare_granian:app   (UPSTREAM_PORT in the env)
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

SKIP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length"})
UPSTREAM = f"http://127.0.0.1:{os.environ.get('UPSTREAM_PORT', '8080')}"


class App:
    def __init__(self) -> None:
        self._client: aiohttp.ClientSession | None = None

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if self._client is None:
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )  # fmt: skip
        headers = {k: v for k, v in scope.headers.items() if k.lower() not in SKIP}
        path = scope.path + (f"?{scope.query_string}" if scope.query_string else "")
        body = await protocol()
        async with self._client.request(
            scope.method, UPSTREAM + path, headers=headers, data=body or None,
            allow_redirects=False,
        ) as response:  # fmt: skip
            data = await response.read()
            out = [(k, v) for k, v in response.headers.items() if k.lower() not in SKIP]
            protocol.response_bytes(response.status, out, data)


app = App()
