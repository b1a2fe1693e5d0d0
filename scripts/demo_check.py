"""``make demo-check``: the demo's printed commands run end to end against a running stack
(discovery, readiness, device-flow login as alice, ssh, HTTP mode, the console's sign-in)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import ssl
from collections.abc import Awaitable, Callable, Sequence
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import aiohttp

from .demo_services import (
    ALICE,
    PASSWORD,
    ROOT,
    WEB_APP,
    Demo,
    DemoError,
    console_url,
    web_url,
)

STEP_TIMEOUT = 60.0  # per step


class FormParser(HTMLParser):
    """A page's forms: id ("" when none) -> (action, inputs with their values)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.forms: dict[str, tuple[str, dict[str, str]]] = {}
        self._current: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = a.get("id", "")
            self.forms[self._current] = (a.get("action", ""), {})
        elif tag == "input" and self._current is not None and a.get("name"):
            self.forms[self._current][1][a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        self._current = None if tag == "form" else self._current


async def approve_device(url: str, email: str) -> None:
    """What the user does in the browser: confirm the code, sign in, allow."""
    answers: dict[str, dict[str, str]] = {
        "op.deviceConfirmForm": {},
        "login": {"login": email, "password": PASSWORD},
        "consent": {},
        "": {},  # a page that submits itself with JavaScript
    }
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        method, data = "GET", dict[str, str]()
        for _ in range(6):
            async with session.request(method, url, data=data) as page:
                text, url = await page.text(), str(page.url)
            if "Signed in" in text:
                return
            forms = FormParser(text).forms
            form = next((name for name in answers if name in forms), None)
            if form is None:
                raise DemoError(f"unexpected page at {url}:\n{text[:500]}")
            action, fields = forms[form]
            method, url, data = "POST", urljoin(url, action), fields | answers[form]
    raise DemoError("the device approval did not finish")


async def launch(argv: Sequence[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    """A printed command, from the repository root like the user."""
    pipe = asyncio.subprocess.PIPE
    return await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=pipe, stderr=pipe
    )


async def check_login(demo: Demo, env: dict[str, str]) -> None:
    process = await launch([*demo.client("login"), "--no-browser"], env)
    assert process.stderr is not None
    try:
        seen = b""
        while (found := re.search(rb"\(or open (\S+)\)", seen)) is None:
            line = await process.stderr.readline()
            if not line:
                raise DemoError(f"login printed no verification URL:\n{seen.decode()}")
            seen += line
        await approve_device(found[1].decode(), ALICE)
        seen += await process.stderr.read()
        if await process.wait() != 0 or b"Logged in to" not in seen:
            raise DemoError(f"login failed:\n{seen.decode(errors='replace')}")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def check_ssh(demo: Demo, env: dict[str, str]) -> None:
    process = await launch([*demo.ssh(), "--", "-o", "BatchMode=yes", "echo demo-ok"], env)
    out, err = await process.communicate()
    if process.returncode != 0 or b"demo-ok\n" not in out:
        raise DemoError(f"ssh exited with {process.returncode}: {(out + err).decode()}")


async def check_http(demo: Demo, url: str, expect: str) -> None:
    context = ssl.create_default_context(cafile=demo.env["TUNNEL_CA_FILE"])
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as answer:
        text = await answer.text()
    if answer.status != 200 or expect not in text:
        raise DemoError(f"{url}: HTTP {answer.status} {text[:200]}")


async def check_web(demo: Demo, env: dict[str, str]) -> None:
    """The printed curl command: alice's access token (aud tunnel) as a bearer token; the demo
    app shows the email from the signed assertion. Host is set by hand: not every resolver
    knows *.localhost (browsers and curl do)."""
    process = await launch(demo.client("print-access-token"), env)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise DemoError(f"print-access-token exited with {process.returncode}: {err.decode()}")
    headers = {"Host": f"{WEB_APP}.localhost:{demo.http_port}", "Accept": "text/html"}
    headers["Authorization"] = f"Bearer {out.decode().strip()}"
    url = f"http://127.0.0.1:{demo.http_port}/"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers, allow_redirects=False) as answer:
            text = await answer.text()
    expect = f"Verified identity: <b id='email'>{ALICE}</b>"
    if answer.status != 200 or expect not in text:
        raise DemoError(f"{web_url(demo.http_port)}/: HTTP {answer.status} {text[:300]}")


async def check_error_pages(demo: Demo) -> None:
    """What a browser sees when something is wrong: a stale sign-in link (400) and an address
    HTTP mode does not serve (404) each get a page saying so."""
    url = f"http://127.0.0.1:{demo.http_port}"
    pages = [
        (f"{WEB_APP}.localhost", "/_tunnel/callback?state=stale&code=x", 400,
         "This sign-in link is invalid or has expired."),
        ("typo.localhost", "/", 404, "This relay serves no application at <b>typo.localhost:"),
    ]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for host, path, status, expect in pages:
            headers = {"Host": f"{host}:{demo.http_port}", "Accept": "text/html"}
            async with session.get(url + path, headers=headers, allow_redirects=False) as answer:
                text = await answer.text()
            if answer.status != status or expect not in text:
                raise DemoError(f"http://{host}{path}: HTTP {answer.status} {text[:300]}")


async def check_console(demo: Demo) -> None:
    """The console asks for sign-in, and sign-in goes to the IdP."""
    async with aiohttp.ClientSession() as session:
        async with session.get(console_url(demo.admin_port), allow_redirects=False) as answer:
            location = answer.headers.get("Location", "")
        if answer.status != 302 or not location.startswith("/console/sign_in"):
            raise DemoError(f"console: HTTP {answer.status} {location}")
        url = urljoin(console_url(demo.admin_port), location)
        async with session.get(url, allow_redirects=False) as answer:
            if not answer.headers.get("Location", "").startswith(demo.issuer):
                raise DemoError(f"console sign-in: HTTP {answer.status}, not to the IdP")


async def check_admin_cli(demo: Demo, env: dict[str, str]) -> None:
    """Step 6: alice's token lists the relay's tunnels over the admin listener, and policy
    explain says why bob is refused."""
    process = await launch(demo.client("print-access-token"), env)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise DemoError(f"print-access-token exited with {process.returncode}: {err.decode()}")
    token_file = Path(env["TUNNEL_CLIENT_HOME"]) / "admin.token"
    token_file.write_bytes(out)
    for argv, code, expect in [  # policy explain exits 1 for a refusal
        (demo.sessions_list(token_file), 0, b""),
        (demo.explain_bob(), 1, b"decision: DENY"),
    ]:
        process = await launch(argv, env)
        out, err = await process.communicate()
        if process.returncode != code or expect not in out:
            text = (out + err).decode(errors="replace")
            raise DemoError(f"{shlex.join(argv)} exited with {process.returncode}: {text}")


async def check(demo: Demo) -> None:
    client_home = demo.state / "check-client"  # not the user's own logins
    shutil.rmtree(client_home, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")} | demo.env
    env |= {"TUNNEL_CLIENT_HOME": str(client_home), "TUNNEL_CLIENT_TOKEN_STORE": "file"}
    discovery = f"{demo.issuer}/.well-known/openid-configuration"
    readyz = f"https://127.0.0.1:{demo.relay_port}/readyz"
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("IdP discovery", lambda: check_http(demo, discovery, f'"issuer":"{demo.issuer}"')),
        ("relay /readyz", lambda: check_http(demo, readyz, "ready")),
        ("device-flow login as alice", lambda: check_login(demo, env)),
        ("tunnel-client ssh ... 'echo demo-ok'", lambda: check_ssh(demo, env)),
        ("HTTP mode (demo web app)", lambda: check_web(demo, env)),
        ("HTTP mode's sign-in failure and unknown-host pages", lambda: check_error_pages(demo)),
        ("admin console sign-in", lambda: check_console(demo)),
        ("tunnel-server sessions list, policy explain", lambda: check_admin_cli(demo, env)),
    ]
    for name, step in steps:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await step()
        except (DemoError, OSError, aiohttp.ClientError, TimeoutError) as exc:
            raise DemoError(f"check failed: {name}: {str(exc) or 'timed out'}") from None
        print(f"ok: {name}", flush=True)
