"""``make demo``: ``python -m scripts.demo --check`` starts the dev IdP, sshd, the demo web app and
the relay, logs in as alice with the device flow, runs ``tunnel-client ssh ... 'echo demo-ok'``
through the relay, fetches the web app through HTTP mode with alice's token, and stops every
process it started."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from ..idp import ensure_node_modules
from ..idp import missing_tools as missing_idp
from .sshd import missing_tools as missing_ssh

ROOT = Path(__file__).resolve().parents[2]
CHECK_TIMEOUT = 120.0

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        missing_idp() is not None or missing_ssh() is not None,
        reason=missing_idp() or missing_ssh() or "",
    ),
]


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


@pytest.mark.timeout(CHECK_TIMEOUT + 60)
async def test_demo_check(tmp_path: Path) -> None:
    await ensure_node_modules()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scripts.demo",
        "--check",
        "--state-dir",
        str(tmp_path / "demo"),
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            raw, _ = await process.communicate()
    except TimeoutError:
        process.send_signal(signal.SIGTERM)  # the demo stops what it started
        raw, _ = await process.communicate()
        pytest.fail(f"demo --check timed out:\n{raw.decode(errors='replace')}")
    output = raw.decode(errors="replace")
    assert process.returncode == 0, output
    assert "ok: tunnel-client ssh ... 'echo demo-ok'" in output
    assert "ok: HTTP mode (demo web app)" in output
    assert "ok: admin console sign-in" in output
    assert output.rstrip().endswith("Demo check passed.\nDemo stopped.")
    relay = re.search(r"TUNNEL_SERVER=wss://127\.0\.0\.1:(\d+)", output)
    issuer = re.search(r"IdP +http://127\.0\.0\.1:(\d+)", output)
    sshd = re.search(r"tunnel-client ssh demo-vm --zone demo-zone --port (\d+) ", output)
    assert relay is not None
    assert issuer is not None
    web = re.search(r"Open http://demo\.localhost:(\d+)/ in a browser \(sign in as alice\)", output)
    relay_yaml = (tmp_path / "demo" / "relay.yaml").read_text()
    upstream = re.search(r'upstream: "http://127\.0\.0\.1:(\d+)"', relay_yaml)
    assert sshd is not None
    assert web is not None
    assert upstream is not None
    # The SSH target's port is only ever an argument for the relay, never dialled directly.
    assert f"127.0.0.1:{sshd[1]}" not in output
    assert f"-p {sshd[1]}" not in output
    assert await _refused(int(relay[1])), "the relay still listens"
    assert await _refused(int(issuer[1])), "the IdP still listens"
    assert await _refused(int(web[1])), "HTTP mode still listens"
    assert await _refused(int(upstream[1])), "the demo web app still listens"
    console = re.search(r"console +http://127\.0\.0\.1:(\d+)/console/ ", output)
    assert console is not None
    assert await _refused(int(console[1])), "the admin listener still listens"
    assert (tmp_path / "demo" / "audit.db").is_file()
    # The web app's own port is never printed: it is reached only through HTTP mode.
    assert f"127.0.0.1:{upstream[1]}" not in output
