"""Corporate proxies, with a real tinyproxy on loopback: the tunnel's WebSocket and the client's
HTTP requests go through HTTP CONNECT (from HTTPS_PROXY or --proxy), with and without Basic
authentication; NO_PROXY bypasses it; a proxy that refuses (407, 403) gets a clear message and
the tunnel does not sneak around it; the proxy password never appears in any output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import tunnel_client
from tunnel_server.app import RunningServer

from ..helpers import UNIT, TcpTarget, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..processes import FAULTHANDLER_ENV
from .tinyproxy import MICROSOCKS, Proxy, microsocks, missing, tinyproxy

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

CLIENT = [sys.executable, "-m", "tunnel_client"]
LIMIT = 400 * UNIT
SECRET = "s3cret-proxy-pass"


@pytest.fixture
async def relay(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> AsyncIterator[RunningServer]:
    data = relay_config_data(issuer, tmp_path, instances={"vm1": echo.port})
    async with start_relay(data) as server:
        yield server


def relay_port(relay: RunningServer) -> int:
    return int(relay.url.rsplit(":", 1)[1])


async def run_client(
    args: list[str], stdin: bytes, tmp_path: Path, **env: str
) -> tuple[int, bytes, str]:
    dropped = ("https_proxy", "http_proxy", "no_proxy")
    environ = {
        k: v for k, v in os.environ.items()
        if not k.startswith("TUNNEL_") and k.lower() not in dropped
    }  # fmt: skip
    environ.update(TUNNEL_CLIENT_HOME=str(tmp_path / "home"), **env)
    process = await asyncio.create_subprocess_exec(
        *CLIENT, *args, env=environ, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), LIMIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode is not None
    return process.returncode, out, err.decode(errors="replace")


def tunnel_args(relay: RunningServer, echo: TcpTarget, tmp_path: Path, token: str) -> list[str]:
    token_file = tmp_path / "token"
    token_file.write_text(token)
    return [
        "start-tunnel", "vm1", str(echo.port), "--listen-on-stdin", "--project=p", "--zone=z",
        f"--server={relay.url}", f"--ca-file={tmp_path / 'relay-cert.pem'}",
        f"--access-token-file={token_file}",
    ]  # fmt: skip


def connects(proxy: Proxy, relay: RunningServer) -> int:
    return proxy.requests().count(f"CONNECT 127.0.0.1:{relay_port(relay)} HTTP/1.1")


async def test_tunnel_through_https_proxy_variable(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    async with tinyproxy(tmp_path / "proxy", connect_ports=[relay_port(relay)]) as proxy:
        payload = os.urandom(1024 * 1024)
        args = tunnel_args(relay, echo, tmp_path, issuer.mint())
        code, out, err = await run_client(args, payload, tmp_path, HTTPS_PROXY=proxy.url())
        assert code == 0, err
        assert out == payload
        assert connects(proxy, relay) == 1
        # NO_PROXY: straight to the relay, the proxy sees nothing new.
        code, out, err = await run_client(
            args, b"direct", tmp_path, HTTPS_PROXY=proxy.url(), NO_PROXY="localhost,127.0.0.1"
        )
        assert (code, out) == (0, b"direct"), err
        assert connects(proxy, relay) == 1


async def test_basic_auth_from_the_url_and_a_wrong_password(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    async with tinyproxy(tmp_path / "proxy", connect_ports=[relay_port(relay)], user="alice",
                         password=SECRET) as proxy:  # fmt: skip
        args = tunnel_args(relay, echo, tmp_path, issuer.mint())
        code, out, err = await run_client([*args, f"--proxy={proxy.url()}"], b"auth ok", tmp_path)
        assert (code, out) == (0, b"auth ok"), err
        assert connects(proxy, relay) == 1

        wrong = proxy.url().replace(SECRET, "wrong-pass")
        code, out, err = await run_client([*args, f"--proxy={wrong}"], b"x", tmp_path)
        assert code == 1
        assert out == b""
        # tinyproxy answers a wrong password with 401 (407 when none is sent).
        assert (
            f"ERROR: Error while connecting [proxy http://alice:***@127.0.0.1:{proxy.port} "
            "answered 401 Unauthorized]: it refused the user name or password in the proxy URL."
        ) in err
        assert "wrong-pass" not in err
        assert echo.connections == 1  # the refused attempt never reached the target

        no_credentials = proxy.url(credentials=False)
        code, _, err = await run_client(args, b"x", tmp_path, HTTPS_PROXY=no_credentials)
        assert code == 1
        assert "answered 407 Proxy Authentication Required]: it requires authentication" in err
    assert SECRET not in "\n".join(proxy.log)


async def test_proxy_that_forbids_the_port_is_reported_not_bypassed(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    async with tinyproxy(tmp_path / "proxy") as proxy:  # CONNECT to the relay's port refused
        args = tunnel_args(relay, echo, tmp_path, issuer.mint())
        code, out, err = await run_client(args, b"x", tmp_path, HTTPS_PROXY=proxy.url())
    assert code == 1
    assert out == b""
    assert "answered 403" in err
    assert "does not allow CONNECT to the relay's host and port" in err
    assert echo.connections == 0


async def test_library_through_proxy_with_credentials(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    async with tinyproxy(tmp_path / "proxy", connect_ports=[relay_port(relay)], user="alice",
                         password=SECRET) as proxy:  # fmt: skip
        client = tunnel_client.Client(
            relay.url, token=issuer.mint(), project="p", zone="z",
            ca_file=tmp_path / "relay-cert.pem", proxy=proxy.url(),
        )  # fmt: skip
        async with client.connect(client.instance("vm1", echo.port)) as (reader, writer):
            writer.write(b"via proxy")
            assert await asyncio.wait_for(reader.readexactly(9), LIMIT) == b"via proxy"
        assert connects(proxy, relay) == 1
        client.proxy = proxy.url(credentials=False)
        client.ssl_context = None
        with pytest.raises(tunnel_client.ProxyRefused) as info:
            async with client.connect(client.instance("vm1", echo.port)):
                pass
        assert info.value.code == 407


async def test_status_and_not_logged_in_probe_go_through_the_proxy(
    relay: RunningServer, tmp_path: Path
) -> None:
    """Without a token the client probes the relay (to tell a wrong URL from a missing login):
    through the proxy too."""
    async with tinyproxy(tmp_path / "proxy", connect_ports=[relay_port(relay)]) as proxy:
        args = [
            "start-tunnel", "vm1", "22", "--listen-on-stdin", "--project=p", "--zone=z",
            f"--server={relay.url}", f"--ca-file={tmp_path / 'relay-cert.pem'}",
        ]  # fmt: skip
        code, _, err = await run_client(args, b"", tmp_path, HTTPS_PROXY=proxy.url(),
                                        TUNNEL_CLIENT_TOKEN_STORE="file")  # fmt: skip
        assert code == 1
        assert f"Not logged in to {relay.url}" in err
        assert connects(proxy, relay) == 1
        status = ["status", f"--server={relay.url}", f"--ca-file={tmp_path / 'relay-cert.pem'}"]
        code, out, err = await run_client(status, b"", tmp_path, HTTPS_PROXY=proxy.url(),
                                          TUNNEL_CLIENT_TOKEN_STORE="file")  # fmt: skip
        assert "Relay:     reachable" in out.decode()
        assert connects(proxy, relay) == 2


@pytest.mark.skipif(MICROSOCKS is None, reason="microsocks not installed (make system-deps)")
async def test_tunnel_and_probe_through_socks5(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    async with microsocks(user="alice", password=SECRET) as socks:
        args = tunnel_args(relay, echo, tmp_path, issuer.mint())
        payload = os.urandom(256 * 1024)
        code, out, err = await run_client([*args, f"--proxy={socks.url()}"], payload, tmp_path)
        assert (code, out == payload) == (0, True), err
        status = ["status", f"--server={relay.url}", f"--ca-file={tmp_path / 'relay-cert.pem'}",
                  f"--proxy={socks.url('socks5')}"]  # fmt: skip
        _, out, err = await run_client(status, b"", tmp_path, TUNNEL_CLIENT_TOKEN_STORE="file")
        assert "Relay:     reachable" in out.decode(), out.decode() + err
        wrong = socks.url().replace(SECRET, "nope")
        code, _, err = await run_client([*args, f"--proxy={wrong}"], b"x", tmp_path)
        assert code == 1
        assert "Error while connecting" in err
        assert "nope" not in err
    assert echo.connections == 1


async def test_proxy_password_prompt_on_a_terminal(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    """A proxy that answers 407 to a URL without credentials: on a terminal the client asks for
    them (the password is not echoed) and carries on."""
    async with tinyproxy(tmp_path / "proxy", connect_ports=[relay_port(relay)], user="alice",
                         password=SECRET) as proxy:  # fmt: skip
        token_file = tmp_path / "token"
        token_file.write_text(issuer.mint())
        controller, terminal = pty.openpty()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
        environ.update(HTTPS_PROXY=proxy.url(credentials=False),
                       TUNNEL_CLIENT_HOME=str(tmp_path / "home"), **FAULTHANDLER_ENV)  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            *CLIENT, "start-tunnel", "vm1", str(echo.port), "--project=p", "--zone=z",
            f"--server={relay.url}", f"--ca-file={tmp_path / 'relay-cert.pem'}",
            f"--access-token-file={token_file}", "--local-host-port=127.0.0.1:0",
            env=environ, stdin=terminal, stderr=terminal, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        os.close(terminal)
        screen = ""
        try:
            for prompt, answer in (("Proxy user:", "alice"), ("Proxy password:", SECRET)):
                async with asyncio.timeout(LIMIT):
                    while prompt not in screen:
                        screen += (await asyncio.to_thread(os.read, controller, 4096)).decode()
                os.write(controller, f"{answer}\n".encode())
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), LIMIT)
            port = int(line.decode().split("[")[1].split("]")[0])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"prompted")
            assert await asyncio.wait_for(reader.readexactly(8), LIMIT) == b"prompted"
            writer.close()
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), LIMIT)
            except TimeoutError:  # where it hung: faulthandler's dump on the terminal
                process.send_signal(signal.SIGABRT)
                await asyncio.wait_for(process.wait(), LIMIT)
                os.set_blocking(controller, False)
                with contextlib.suppress(OSError):
                    screen += os.read(controller, 65536).decode(errors="replace")
                raise AssertionError(f"still running after SIGINT:\n{screen[-6000:]}") from None
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            os.close(controller)
    assert "asks for a user name and password" in screen
    assert SECRET not in screen  # typed without echo
    assert connects(proxy, relay) >= 2  # refused without credentials, then accepted
