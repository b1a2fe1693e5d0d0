"""``tunnel-client login`` end to end: the real CLI (a subprocess) against the development IdP
(npm oidc-provider) and a relay that publishes its login configuration at
``/.well-known/tunnel-client``. Browser login (PKCE, loopback redirect) in Debian's Chromium,
the device flow, service-account credential files, refresh under a file lock, key rotation,
a revoked grant, logout.

Every client runs with its own ``TUNNEL_CLIENT_HOME`` and the file token store: no keyring and
no real home directory is touched."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tunnel_client.credentials import cache_key
from tunnel_server.app import RunningServer

from ..helpers import UNIT, TcpTarget, capture_audit, relay_config_data, start_relay
from ..idp import (
    ALICE,
    AUDIENCE,
    BOB,
    CLI_CLIENT_ID,
    PASSWORD,
    RESOURCE,
    SERVICE_CLIENT_ID,
    SERVICE_CLIENT_SECRET,
    USER_SCOPES,
    DevIdp,
    TokenError,
    _Browser,
    jwt_parts,
    missing_tools,
)
from ..oidc_fixture import TestIssuer
from .browser import ARTIFACTS, chromium_page, missing_chromium

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or ""),
]

CLIENT = [sys.executable, "-m", "tunnel_client"]
# One CLI run: a new Python process, TLS to the relay, HTTP to the IdP, maybe a tunnel.
RUN_TIMEOUT = 600 * UNIT
# A login: a browser has to start; the device flow polls every 5 s whatever the machine's speed
# (oidc-provider announces no interval: RFC 8628's default).
LOGIN_TIMEOUT = 5.0 + 600 * UNIT
SERVICE_ACCOUNT = f"serviceAccount:{SERVICE_CLIENT_ID}"
# Variables that would change how the client picks a flow or a credential.
ENV_DROP = ("DISPLAY", "WAYLAND_DISPLAY", "SSH_CONNECTION", "SSH_TTY", "SSH_CLIENT", "BROWSER")


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str

    def check(self) -> Result:
        assert self.returncode == 0, (
            f"exit {self.returncode}\nstdout: {self.stdout[-2000:]!r}\nstderr: {self.stderr}"
        )
        return self

    @property
    def text(self) -> str:
        return self.stdout.decode()


@dataclass
class Cli:
    """``tunnel-client`` as a user runs it, with a private state directory."""

    home: Path
    server: str
    ca_file: Path
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def relay_args(self) -> list[str]:
        return [f"--server={self.server}", f"--ca-file={self.ca_file}"]

    def env(self, *, display: bool) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_") and k not in ENV_DROP
        }
        env |= {"TUNNEL_CLIENT_HOME": str(self.home), "TUNNEL_CLIENT_TOKEN_STORE": "file"}
        if display:
            # A desktop session: the client picks the browser flow; "opening" the browser runs
            # /bin/true, and the test drives the URL the client prints.
            env |= {"DISPLAY": ":99", "BROWSER": "/bin/true"}
        return env

    async def start(self, *args: str, display: bool = False) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *CLIENT,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env(display=display),
        )
        self.processes.append(process)
        return process

    async def finish(
        self,
        process: asyncio.subprocess.Process,
        stdin: bytes = b"",
        limit: float = RUN_TIMEOUT,
        stderr_seen: str = "",
    ) -> Result:
        try:
            out, err = await asyncio.wait_for(process.communicate(stdin), limit)
        except TimeoutError:
            process.kill()
            out, err = await process.communicate()
            pytest.fail(
                f"tunnel-client timed out after {limit}s; stderr:\n"
                f"{stderr_seen}{err.decode(errors='replace')}"
            )
        assert process.returncode is not None
        return Result(process.returncode, out, stderr_seen + err.decode(errors="replace"))

    async def run(self, *args: str, stdin: bytes = b"", display: bool = False) -> Result:
        return await self.finish(await self.start(*args, display=display), stdin)

    async def kill_all(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.kill()
                await process.wait()

    # -- the token cache --------------------------------------------------------------------------

    @property
    def cache_file(self) -> Path:
        return self.home / "tokens" / f"{cache_key(self.server, 'default')}.json"

    def cache(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.cache_file.read_text(encoding="utf-8"))
        return data

    def expire(self) -> None:
        """Make the cached access token look expired, so the next use refreshes it."""
        data = self.cache()
        data["tokens"]["expires_at"] = time.time() - 10
        self.cache_file.write_text(json.dumps(data), encoding="utf-8")

    async def access_token(self) -> str:
        result = (await self.run("print-access-token", *self.relay_args)).check()
        token = result.text.strip()
        assert result.text == token + "\n"  # one line on stdout, nothing else
        return token

    async def echo_through_tunnel(self, echo: TcpTarget, *extra: str) -> None:
        """``start-tunnel --listen-on-stdin`` to the echo target: what ssh's ProxyCommand does."""
        payload = os.urandom(256 * 1024)
        args = ["start-tunnel", "vm1", str(echo.port), "--listen-on-stdin", "--project=p"]
        result = await self.run(*args, "--zone=z", *self.relay_args, *extra, stdin=payload)
        result.check()
        assert result.stdout == payload


async def read_until(
    process: asyncio.subprocess.Process,
    done: Callable[[str], re.Match[str] | None],
    limit: float = LOGIN_TIMEOUT,
) -> tuple[str, re.Match[str]]:
    """Read the client's stderr until ``done`` matches what was read so far: (text, match)."""
    assert process.stderr is not None
    text = ""
    try:
        async with asyncio.timeout(limit):
            while (match := done(text)) is None:
                line = await process.stderr.readline()
                if not line:
                    pytest.fail(f"tunnel-client ended before it asked for a login:\n{text}")
                text += line.decode(errors="replace")
    except TimeoutError:
        pytest.fail(f"tunnel-client did not ask for a login within {limit}s:\n{text}")
    return text, match


def authorization_url(idp: DevIdp) -> Callable[[str], re.Match[str] | None]:
    pattern = re.compile(rf"^    ({re.escape(idp.issuer)}/auth\?\S+)$", re.MULTILINE)
    return pattern.search


DEVICE_PROMPT = re.compile(
    r"To log in, visit:\n\n    (?P<uri>http\S+)\n\n"
    r"and enter the code: (?P<code>[A-Z]{4}-[A-Z]{4})\n"
)


async def form_login(cli: Cli, idp: DevIdp, email: str) -> Result:
    """The browser flow (PKCE, loopback redirect) with the dev IdP's HTML-form driver as the
    browser: quick, and needs no Chromium."""
    process = await cli.start("login", *cli.relay_args, display=True)
    seen, match = await read_until(process, authorization_url(idp))
    browser = _Browser()
    try:
        page = await browser.go("GET", match.group(1))
        page = await browser.sign_in(page, email, PASSWORD)
    finally:
        await browser.close()
    # The form driver followed the IdP's redirect to the client's loopback listener.
    assert page.url.startswith("http://127.0.0.1:")
    assert "Login complete" in page.text
    result = (await cli.finish(process, stderr_seen=seen)).check()
    assert f"Logged in to {cli.server}." in result.stderr
    return result


async def device_login(cli: Cli, email: str) -> Result:
    """``login --no-browser``: the verification URL and code on stderr; the user opens the URL
    elsewhere, types the code, signs in and consents (the dev IdP's HTML-form driver)."""
    process = await cli.start("login", "--no-browser", *cli.relay_args)
    seen, match = await read_until(process, DEVICE_PROMPT.search)
    browser = _Browser()
    try:
        page = await browser.go("GET", match["uri"])
        forms = {f.id: f for f in page.forms()}
        assert "op.deviceInputForm" in forms, page.text
        page = await browser.submit(page, forms["op.deviceInputForm"], user_code=match["code"])
        page = await browser.sign_in(page, email, PASSWORD)
    finally:
        await browser.close()
    assert page.status == 200
    assert "Signed in" in page.text, page.text
    result = (await cli.finish(process, limit=LOGIN_TIMEOUT, stderr_seen=seen)).check()
    assert result.stdout == b""
    assert f"Logged in to {cli.server}." in result.stderr
    return result


def decisions(audit: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["decision"], r["principal"]) for r in audit if r["event"] == "decision"]


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
async def idp() -> AsyncIterator[DevIdp]:
    async with DevIdp() as running:
        yield running


@pytest.fixture
async def relay(
    idp: DevIdp, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> AsyncIterator[RunningServer]:
    """vm1 (the echo target) for alice, group ops and the svc-backup service account; the relay
    trusts the dev IdP and tells clients how to log in to it."""
    data = relay_config_data(
        issuer,
        tmp_path,
        instances={"vm1": echo.port},
        members=[f"user:{ALICE}", "group:ops"],
        extra_access=[
            {"members": [SERVICE_ACCOUNT], "instances": ["p/z/vm1"], "ports": ["1-65535"]}
        ],
    )
    data["oidc"] = {"issuer": idp.issuer, "audiences": [AUDIENCE]}
    data["login"] = {
        "issuer": idp.issuer,
        "client_id": CLI_CLIENT_ID,
        "scopes": USER_SCOPES.split(),
        "resource": RESOURCE,
    }
    async with start_relay(data) as server:
        yield server


@pytest.fixture
async def cli(relay: RunningServer, tmp_path: Path) -> AsyncIterator[Cli]:
    client = Cli(tmp_path / "client-home", relay.url, tmp_path / "relay-cert.pem")
    yield client
    await client.kill_all()


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.skipif(missing_chromium() is not None, reason=missing_chromium() or "")
async def test_browser_login_then_token_and_tunnel(
    cli: Cli, idp: DevIdp, relay: RunningServer, echo: TcpTarget
) -> None:
    """A desktop user: login opens the browser (here: prints the URL), the user signs in and
    consents in Chromium, the loopback redirect completes the login; the cached login then
    serves print-access-token and start-tunnel."""
    audit = capture_audit(relay)
    process = await cli.start("login", *cli.relay_args, display=True)
    seen, match = await read_until(process, authorization_url(idp))
    assert seen.startswith("Your browser has been opened to visit:\n")
    url = match.group(1)
    assert "code_challenge_method=S256" in url
    assert "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in url

    ARTIFACTS.mkdir(exist_ok=True)
    async with chromium_page(LOGIN_TIMEOUT) as page:
        await page.goto(url)
        await page.fill('#login input[name="login"]', ALICE)
        await page.fill('#login input[name="password"]', PASSWORD)
        await page.screenshot(path=ARTIFACTS / "login-1-sign-in.png", full_page=True)
        await page.click('#login button[type="submit"]')
        await page.wait_for_selector('#consent button[type="submit"]')
        assert "Tunnel CLI" in await page.inner_text("body")
        await page.screenshot(path=ARTIFACTS / "login-2-consent.png", full_page=True)
        await page.click('#consent button[type="submit"]')
        await page.wait_for_url(re.compile(r"^http://127\.0\.0\.1:\d+/callback\?"))
        await page.wait_for_selector("text=Login complete")
        await page.screenshot(path=ARTIFACTS / "login-3-done.png", full_page=True)
        final_url = page.url
    assert "code=" in final_url
    assert "state=" in final_url

    result = (await cli.finish(process, stderr_seen=seen)).check()
    assert result.stdout == b""
    assert result.stderr.endswith(f"Logged in to {cli.server}.\n")

    token = await cli.access_token()
    identity = await relay.verifier.verify(token)
    assert identity.principal == f"user:{ALICE}"
    assert {"group:ops", "group:dev"} <= identity.members
    assert jwt_parts(token)[1]["client_id"] == CLI_CLIENT_ID
    cached = cli.cache()["tokens"]
    assert cached["access_token"] == token
    assert cached["refresh_token"]
    assert jwt_parts(cached["id_token"])[1]["email"] == ALICE

    # No token file, no credential file: start-tunnel uses the cached login.
    await cli.echo_through_tunnel(echo)
    assert decisions(audit) == [("allow", f"user:{ALICE}")]


async def test_device_flow_login(cli: Cli, relay: RunningServer, echo: TcpTarget) -> None:
    """No display (or --no-browser, or SSH): the device flow; the login is cached in a 0600
    file inside a 0700 directory. Bob is who the relay sees, and policy denies him vm1."""
    audit = capture_audit(relay)
    await device_login(cli, BOB)

    assert cli.cache_file.stat().st_mode & 0o777 == 0o600
    assert cli.cache_file.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in cli.cache_file.parent.iterdir()] == [cli.cache_file.name]
    cached = cli.cache()
    assert cached["profile"]["server"] == cli.server
    assert cached["profile"]["resource"] == RESOURCE

    token = await cli.access_token()
    assert token == cached["tokens"]["access_token"]  # still fresh: no refresh
    identity = await relay.verifier.verify(token)
    assert identity.principal == f"user:{BOB}"
    assert identity.groups == ("dev",)

    args = ["start-tunnel", "vm1", str(echo.port), "--listen-on-stdin", "--project=p", "--zone=z"]
    denied = await cli.run(*args, *cli.relay_args, stdin=b"hello")
    assert denied.returncode == 1
    assert denied.stdout == b""
    assert "4033" in denied.stderr
    assert "Traceback" not in denied.stderr
    assert echo.connections == 0
    assert decisions(audit) == [("deny", f"user:{BOB}")]


async def test_service_account_credential_file(
    cli: Cli, idp: DevIdp, relay: RunningServer, echo: TcpTarget, tmp_path: Path
) -> None:
    """A credential file (client credentials grant): no login, no cache."""
    audit = capture_audit(relay)
    credential = {
        "type": "service_account",
        "issuer": idp.issuer,
        "client_id": SERVICE_CLIENT_ID,
        "client_secret": SERVICE_CLIENT_SECRET,
        "resource": RESOURCE,
    }
    path = tmp_path / "svc-backup.json"
    path.write_text(json.dumps(credential), encoding="utf-8")
    path.chmod(0o600)

    result = (await cli.run("print-access-token", f"--credential-file={path}")).check()
    token = result.text.strip()
    identity = await relay.verifier.verify(token)
    assert identity.principal == SERVICE_ACCOUNT
    assert jwt_parts(token)[1]["aud"] == AUDIENCE

    await cli.echo_through_tunnel(echo, f"--credential-file={path}")
    assert decisions(audit) == [("allow", SERVICE_ACCOUNT)]
    assert not cli.cache_file.exists()

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**credential, "client_secret": "nope"}), encoding="utf-8")
    refused = await cli.run("print-access-token", f"--credential-file={wrong}")
    assert refused.returncode == 1
    assert refused.stdout == b""
    assert refused.stderr.startswith("ERROR: service account token request failed: invalid_client")
    assert "nope" not in refused.stderr
    assert "Traceback" not in refused.stderr


async def test_refresh_once_under_parallel_use(cli: Cli, idp: DevIdp, relay: RunningServer) -> None:
    """An expired access token is refreshed and the cache updated; four clients that find it
    expired at once (parallel ssh ProxyCommands) refresh it once, under the file lock: with
    refresh-token rotation a second refresh would hand out another access token, and a replay
    of the spent refresh token would fail (and revoke the grant)."""
    await device_login(cli, ALICE)
    before = cli.cache()["tokens"]
    cli.expire()

    token = await cli.access_token()
    assert token != before["access_token"]
    after = cli.cache()["tokens"]
    assert after["access_token"] == token
    assert after["expires_at"] > time.time() + 120
    assert after["refresh_token"] != before["refresh_token"]  # rotated
    assert after["id_token"]
    assert (await relay.verifier.verify(token)).principal == f"user:{ALICE}"

    cli.expire()
    results = await asyncio.gather(
        *(cli.run("print-access-token", *cli.relay_args) for _ in range(4))
    )
    for result in results:
        result.check()
    printed = {result.text.strip() for result in results}
    assert len(printed) == 1, "more than one refresh"
    (shared,) = printed
    assert shared != token
    latest = cli.cache()["tokens"]
    assert latest["access_token"] == shared
    assert latest["refresh_token"] != after["refresh_token"]
    assert (await relay.verifier.verify(shared)).principal == f"user:{ALICE}"
    # The grant is intact (no spent refresh token was replayed): the cached one still works.
    assert (await idp.refresh(latest["refresh_token"]))["access_token"]


async def test_key_rotation_mid_session(
    cli: Cli, idp: DevIdp, relay: RunningServer, echo: TcpTarget
) -> None:
    """The IdP rotates its signing key between two tunnels: the refreshed token (new kid) is
    accepted by the running relay at once."""
    audit = capture_audit(relay)
    await form_login(cli, idp, ALICE)
    old_kid = jwt_parts(cli.cache()["tokens"]["access_token"])[0]["kid"]
    await cli.echo_through_tunnel(echo)  # the relay now holds the old JWKS

    new_kid = await idp.rotate()
    assert new_kid != old_kid
    cli.expire()
    token = await cli.access_token()
    assert jwt_parts(token)[0]["kid"] == new_kid

    await cli.echo_through_tunnel(echo)
    assert decisions(audit) == [("allow", f"user:{ALICE}")] * 2
    assert echo.connections == 2


async def test_revoked_login_says_log_in_again(
    cli: Cli, idp: DevIdp, relay: RunningServer, echo: TcpTarget
) -> None:
    """The user's grant is revoked at the IdP: the refresh fails, and both commands say what to
    run, once, without a traceback; the target sees nothing."""
    audit = capture_audit(relay)
    await form_login(cli, idp, ALICE)
    assert await idp.revoke_user(ALICE) >= 1
    cli.expire()
    message = (
        f"ERROR: Your login for {cli.server} has expired or was revoked. Run:\n\n"
        f"    tunnel-client login --server {cli.server}\n"
    )

    result = await cli.run("print-access-token", *cli.relay_args)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr == message

    args = ["start-tunnel", "vm1", str(echo.port), "--listen-on-stdin", "--project=p", "--zone=z"]
    tunnel = await cli.run(*args, *cli.relay_args, stdin=b"hello")
    assert tunnel.returncode == 1
    assert tunnel.stdout == b""
    assert tunnel.stderr == message
    assert echo.connections == 0
    assert decisions(audit) == []


async def test_logout_revokes_and_forgets(cli: Cli, idp: DevIdp, relay: RunningServer) -> None:
    await form_login(cli, idp, ALICE)
    refresh_token = cli.cache()["tokens"]["refresh_token"]

    result = (await cli.run("logout", *cli.relay_args)).check()
    assert result.stderr == f"Logged out of {cli.server}.\n"
    assert not cli.cache_file.exists()
    with pytest.raises(TokenError) as revoked:  # revoked at the IdP, not only forgotten
        await idp.refresh(refresh_token)
    assert revoked.value.error == "invalid_grant"

    after = await cli.run("print-access-token", *cli.relay_args)
    assert after.returncode == 1
    assert after.stdout == b""
    assert after.stderr.startswith(f"ERROR: Not logged in to {cli.server}.")
    assert f"tunnel-client login --server {cli.server}" in after.stderr
    again = (await cli.run("logout", *cli.relay_args)).check()
    assert again.stderr == f"Not logged in to {cli.server}.\n"


async def test_identity_tokens(cli: Cli, idp: DevIdp, relay: RunningServer) -> None:
    """print-identity-token: the login's ID token, or with --audience a token for that resource
    from the refresh token; parallel runs share the refresh token under the lock (a replayed,
    rotated-out refresh token would revoke the whole grant)."""
    await form_login(cli, idp, ALICE)
    id_token = (await cli.run("print-identity-token", *cli.relay_args)).check().text.strip()
    claims = jwt_parts(id_token)[1]
    assert (claims["aud"], claims["email"], claims["iss"]) == (CLI_CLIENT_ID, ALICE, idp.issuer)

    args = ["print-identity-token", f"--audience={RESOURCE}", *cli.relay_args]
    results = await asyncio.gather(*(cli.run(*args) for _ in range(3)))
    for result in results:
        result.check()
        token = result.text.strip()
        assert (await relay.verifier.verify(token)).principal == f"user:{ALICE}"
    assert (await idp.refresh(cli.cache()["tokens"]["refresh_token"]))["access_token"]


async def test_cancelled_browser_login(cli: Cli, idp: DevIdp) -> None:
    """The user presses Cancel on the sign-in page: one clear error, nothing cached."""
    process = await cli.start("login", *cli.relay_args, display=True)
    seen, match = await read_until(process, authorization_url(idp))
    browser = _Browser()
    try:
        page = await browser.go("GET", match.group(1))
        forms = {f.id: f for f in page.forms()}
        assert "abort" in forms, page.text
        page = await browser.submit(page, forms["abort"])
    finally:
        await browser.close()
    assert page.url.startswith("http://127.0.0.1:")
    assert "Login failed" in page.text
    result = await cli.finish(process, stderr_seen=seen)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.endswith("\nERROR: login refused: End-User aborted interaction\n")
    assert "Traceback" not in result.stderr
    assert not cli.cache_file.exists()
