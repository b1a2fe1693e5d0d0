"""A real OpenID Connect provider for tests: deploy/dev-idp (npm ``oidc-provider``) on loopback,
with browser-free drivers for its pages, so tests get real user tokens from the device flow and
the authorization code flow (PKCE), service-account tokens, refresh, revocation and key rotation.

    async with DevIdp() as idp:
        tokens = await idp.device_login(ALICE)
        verifier = OidcVerifier(idp.issuer, [AUDIENCE])
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final
from urllib.parse import parse_qsl, quote_plus, urlencode, urljoin, urlsplit

import aiohttp

from .oidc_fixture import MINTED

IDP_DIR: Final = Path(__file__).resolve().parents[1] / "deploy" / "dev-idp"
NODE: Final = shutil.which("node")
NPM: Final = shutil.which("npm")

CLI_CLIENT_ID: Final = "tunnel-cli"  # public, PKCE, loopback redirect on any port, device flow
SERVICE_CLIENT_ID: Final = "svc-backup"  # confidential, client_credentials
SERVICE_CLIENT_SECRET: Final = "svc-backup-secret"
WEB_CLIENT_ID: Final = "tunnel-web"  # confidential, authorization code + PKCE
WEB_CLIENT_SECRET: Final = "tunnel-web-secret"
AUDIENCE: Final = "tunnel"  # `aud` of every access token
RESOURCE: Final = "urn:identity-tunnel:relay"  # RFC 8707 indicator; the default for every client
PASSWORD: Final = "demo-password"  # development only
ALICE: Final = "alice@example.com"  # groups ops, dev
BOB: Final = "bob@example.com"  # groups dev
MALLORY: Final = "mallory@example.com"  # no groups
USER_SCOPES: Final = "openid email profile groups offline_access"
DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"

NPM_CI_TIMEOUT: Final = 300.0
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 5.0
HTTP_TIMEOUT: Final = 10.0
MAX_HOPS: Final = 20


def missing_tools() -> str | None:
    """Why the dev IdP cannot run here, or None."""
    if NODE is None:
        return "node not installed"
    if NPM is None and not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        return "npm not installed and deploy/dev-idp/node_modules missing"
    return None


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a compact JWS, unverified: for assertions on what the IdP issued."""

    def segment(value: str) -> dict[str, Any]:
        decoded = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        assert isinstance(decoded, dict)
        return decoded

    head, body, _ = token.split(".")
    return segment(head), segment(body)


class IdpError(RuntimeError):
    """The dev IdP could not be started, or a page did not go as expected."""


class TokenError(Exception):
    """An OAuth error response (RFC 6749 §5.2)."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status = status
        self.error = str(body.get("error", ""))
        self.description = str(body.get("error_description", ""))
        super().__init__(f"HTTP {status} {self.error}: {self.description}")


@dataclass
class _Form:
    id: str | None
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)


class _FormParser(HTMLParser):
    """Forms with their hidden and prefilled inputs (buttons are not submitted)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []
        self._current: _Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = _Form(a.get("id"), a.get("action", ""), a.get("method", "get").upper())
            self.forms.append(self._current)
        elif tag == "input" and self._current is not None and a.get("name"):
            self._current.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


@dataclass
class _Page:
    status: int
    url: str
    text: str = ""
    redirect: str | None = None  # set when we stopped at a redirect to the client

    def forms(self) -> list[_Form]:
        parser = _FormParser()
        parser.feed(self.text)
        return parser.forms


class _Browser:
    """Cookies and redirects like a browser, without JavaScript; stops at the client's redirect."""

    def __init__(self, stop_at: str | None = None) -> None:
        self.stop_at = stop_at
        self.session = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies for 127.0.0.1
            timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT),
        )

    async def close(self) -> None:
        await self.session.close()

    async def go(self, method: str, url: str, data: Mapping[str, str] | None = None) -> _Page:
        for _ in range(MAX_HOPS):
            async with self.session.request(
                method, url, data=data, allow_redirects=False
            ) as response:
                text = await response.text()
                location = response.headers.get("Location")
                if response.status not in (301, 302, 303, 307, 308) or location is None:
                    return _Page(response.status, url, text)
            url = urljoin(url, location)
            if self.stop_at is not None and url.startswith(self.stop_at):
                return _Page(response.status, url, redirect=url)
            if response.status in (301, 302, 303):
                method, data = "GET", None
        raise IdpError(f"too many redirects, last {url}")

    async def submit(self, page: _Page, form: _Form, **values: str) -> _Page:
        return await self.go(form.method, urljoin(page.url, form.action), {**form.fields, **values})

    async def sign_in(self, page: _Page, email: str, password: str) -> _Page:
        """Answer the device-code, login and consent pages until none is left."""
        for _ in range(MAX_HOPS):
            if page.redirect is not None or page.status != 200:
                break
            forms = {f.id: f for f in page.forms()}
            if "login" in forms:
                page = await self.submit(page, forms["login"], login=email, password=password)
                if page.status == 401:
                    raise IdpError(f"login refused for {email}")
            elif "consent" in forms:
                page = await self.submit(page, forms["consent"])
            elif "op.deviceConfirmForm" in forms:
                page = await self.submit(page, forms["op.deviceConfirmForm"])
            elif None in forms and len(forms) == 1:  # form_post auto-submit page
                page = await self.submit(page, forms[None])
            else:
                break
        return page


class DevIdp:
    """deploy/dev-idp/server.js on 127.0.0.1:0 (``npm ci`` first if node_modules is missing)."""

    def __init__(
        self,
        *,
        access_token_ttl: int = 300,
        refresh_token_ttl: int = 3600,
        id_token_ttl: int = 3600,
        client_credentials_ttl: int | None = None,
        users: Sequence[Mapping[str, Any]] | None = None,
        web_redirects: Sequence[str] = (),
        extra_args: Sequence[str] = (),
    ) -> None:
        self._args = [
            *("--host", "127.0.0.1", "--port", "0", "--exit-on-stdin-close"),
            *("--access-token-ttl", str(access_token_ttl)),
            *("--refresh-token-ttl", str(refresh_token_ttl)),
            *("--id-token-ttl", str(id_token_ttl)),
        ]
        if client_credentials_ttl is not None:
            self._args += ["--client-credentials-ttl", str(client_credentials_ttl)]
        for uri in web_redirects:
            self._args += ["--web-redirect", uri]
        self._args += extra_args
        self._users = users
        self._admin_token = secrets.token_urlsafe(24)
        self._process: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._metadata: dict[str, Any] | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.issuer = ""
        self.port = 0

    async def __aenter__(self) -> DevIdp:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- process ---------------------------------------------------------------------------------

    async def start(self) -> None:
        # One retry: about 1 start in 100 printed nothing within START_TIMEOUT on a loaded
        # machine (cause not found; the error says what stdout held). A second start works.
        try:
            await self._start_once()
        except IdpError:
            await self.stop()
            await self._start_once()

    async def _start_once(self) -> None:
        if NODE is None:
            raise IdpError("node not installed")
        await ensure_node_modules()
        args = list(self._args)
        if self._users is not None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dev-idp-")
            users_file = Path(self._tmp.name) / "users.json"
            users_file.write_text(json.dumps(list(self._users)))
            args += ["--users", str(users_file)]
        self._process = await asyncio.create_subprocess_exec(
            NODE,
            "server.js",
            *args,
            cwd=IDP_DIR,
            env={**os.environ, "DEV_IDP_ADMIN_TOKEN": self._admin_token},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self._process.stdout is not None
        assert self._process.stderr is not None
        self._stderr_task = asyncio.create_task(self._drain(self._process.stderr))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await self._process.stdout.readline()
            ready = json.loads(line)
            self.issuer, self.port = str(ready["issuer"]), int(ready["port"])
        except (TimeoutError, ValueError, KeyError, TypeError) as exc:
            await asyncio.sleep(0.1)  # let the last stderr lines arrive
            seen = locals().get("line", b"")
            raise IdpError(
                f"dev IdP did not start ({type(exc).__name__}; stdout {seen!r}):\n"
                + "\n".join(self.log)
            ) from None
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.log.append(line.decode(errors="replace").rstrip())

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if process is not None and process.stdin is not None:
            process.stdin.close()
        task, self._stderr_task = self._stderr_task, None
        if task is not None:
            with contextlib.suppress(TimeoutError):  # a timeout cancels the task
                async with asyncio.timeout(STOP_TIMEOUT):
                    await task
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- plain HTTP ------------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise IdpError("dev IdP is not running")
        return self._session

    async def metadata(self) -> dict[str, Any]:
        """The discovery document."""
        if self._metadata is None:
            url = f"{self.issuer}/.well-known/openid-configuration"
            async with self.session.get(url) as response:
                response.raise_for_status()
                self._metadata = await response.json()
        return self._metadata

    async def endpoint(self, name: str) -> str:
        return str((await self.metadata())[name])

    async def jwks(self) -> dict[str, Any]:
        async with self.session.get(await self.endpoint("jwks_uri")) as response:
            response.raise_for_status()
            result: dict[str, Any] = await response.json(content_type=None)
            return result

    async def _admin(self, path: str, params: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        async with self.session.post(
            f"{self.issuer}/admin/{path}",
            params=list(params),
            headers={"Authorization": f"Bearer {self._admin_token}"},
        ) as response:
            body: dict[str, Any] = await response.json()
            if response.status != 200:
                raise IdpError(f"admin/{path}: HTTP {response.status} {body}")
            return body

    async def rotate(self, alg: str = "RS256", *, retire: bool = False) -> str:
        """A new signing key (first in the JWKS, used from now on); old ones stay published
        unless ``retire``. Returns the new kid."""
        params = [("alg", alg)] + [("retire", "1")] * retire
        return str((await self._admin("rotate", params))["kid"])

    async def revoke_user(self, email: str) -> int:
        """Revoke every grant (refresh tokens included) of a user; returns how many."""
        return int((await self._admin("revoke", [("user", email)]))["revoked_grants"])

    async def set_groups(self, email: str, groups: Sequence[str]) -> None:
        """Change a user's groups: tokens issued from now on (refreshes too) carry them."""
        await self._admin("groups", [("user", email), *(("group", g) for g in groups)])

    async def _post(
        self,
        endpoint: str,
        form: Mapping[str, str],
        client_id: str,
        client_secret: str | None,
    ) -> tuple[int, dict[str, Any]]:
        data, headers = dict(form), {}
        if client_secret is None:
            data["client_id"] = client_id
        else:  # RFC 6749 §2.3.1: form-encode both, then Basic
            pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        async with self.session.post(
            await self.endpoint(endpoint), data=data, headers=headers
        ) as response:
            text = await response.text()
            body = json.loads(text) if text else {}
            return response.status, body

    async def token(
        self,
        form: Mapping[str, str],
        *,
        client_id: str = CLI_CLIENT_ID,
        client_secret: str | None = None,
    ) -> dict[str, Any]:
        """POST to the token endpoint; the JSON response, or TokenError."""
        status, body = await self._post("token_endpoint", form, client_id, client_secret)
        if status != 200:
            raise TokenError(status, body)
        # The session-wide log scan (tests/conftest.py) checks these never reach a log line.
        MINTED.extend(
            str(body[k]) for k in ("access_token", "refresh_token", "id_token") if body.get(k)
        )
        return body

    async def client_credentials(
        self,
        client_id: str = SERVICE_CLIENT_ID,
        secret: str = SERVICE_CLIENT_SECRET,
        resource: str | None = RESOURCE,
        scope: str | None = None,
    ) -> dict[str, Any]:
        form = {"grant_type": "client_credentials"}
        if resource is not None:
            form["resource"] = resource
        if scope is not None:
            form["scope"] = scope
        return await self.token(form, client_id=client_id, client_secret=secret)

    async def refresh(
        self,
        refresh_token: str,
        *,
        client_id: str = CLI_CLIENT_ID,
        client_secret: str | None = None,
    ) -> dict[str, Any]:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self.token(form, client_id=client_id, client_secret=client_secret)

    async def revoke(
        self,
        token: str,
        *,
        hint: str = "refresh_token",
        client_id: str = CLI_CLIENT_ID,
        client_secret: str | None = None,
    ) -> None:
        """RFC 7009 revocation; revoking a refresh token revokes its whole grant."""
        form = {"token": token, "token_type_hint": hint}
        status, body = await self._post("revocation_endpoint", form, client_id, client_secret)
        if status != 200:
            raise TokenError(status, body)

    async def introspect(
        self,
        token: str,
        *,
        client_id: str = SERVICE_CLIENT_ID,
        client_secret: str = SERVICE_CLIENT_SECRET,
    ) -> dict[str, Any]:
        form = {"token": token}
        status, body = await self._post("introspection_endpoint", form, client_id, client_secret)
        if status != 200:
            raise TokenError(status, body)
        return body

    # -- user flows, driven like a browser -------------------------------------------------------

    async def device_login(
        self,
        email: str,
        password: str = PASSWORD,
        *,
        scope: str = USER_SCOPES,
        client_id: str = CLI_CLIENT_ID,
        resource: str | None = None,
    ) -> dict[str, Any]:
        """RFC 8628: start a device authorization, approve it on the verification page (code
        confirmation, login, consent), then redeem the device code. The token response."""
        form = {"scope": scope}
        if resource is not None:
            form["resource"] = resource
        status, started = await self._post("device_authorization_endpoint", form, client_id, None)
        if status != 200:
            raise TokenError(status, started)
        browser = _Browser()
        try:
            page = await browser.go("GET", str(started["verification_uri_complete"]))
            page = await browser.sign_in(page, email, password)
        finally:
            await browser.close()
        if page.status != 200 or "Signed in" not in page.text:
            raise IdpError(f"device approval did not finish: HTTP {page.status} {page.url}")
        grant = {"grant_type": DEVICE_GRANT, "device_code": str(started["device_code"])}
        return await self.token(grant, client_id=client_id)

    async def authorize(
        self,
        email: str,
        password: str = PASSWORD,
        *,
        redirect_uri: str,
        code_challenge: str | None,
        client_id: str = CLI_CLIENT_ID,
        scope: str = USER_SCOPES,
        state: str | None = None,
        nonce: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Authorization request, login and consent; the parameters the client's redirect_uri
        receives (``code`` and ``state``, or ``error``). Nothing needs to listen there."""
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state or secrets.token_urlsafe(16),
            "nonce": nonce or secrets.token_urlsafe(16),
        }
        if code_challenge is not None:
            params |= {"code_challenge": code_challenge, "code_challenge_method": "S256"}
        params |= dict(extra or {})
        browser = _Browser(stop_at=redirect_uri)
        try:
            url = f"{await self.endpoint('authorization_endpoint')}?{urlencode(params)}"
            page = await browser.go("GET", url)
            page = await browser.sign_in(page, email, password)
        finally:
            await browser.close()
        if page.redirect is None:
            raise IdpError(f"no redirect to the client: HTTP {page.status} {page.url}")
        return dict(parse_qsl(urlsplit(page.redirect).query))

    async def code_login(
        self,
        email: str,
        password: str = PASSWORD,
        *,
        redirect_uri: str = "http://127.0.0.1:8400/callback",
        client_id: str = CLI_CLIENT_ID,
        client_secret: str | None = None,
        scope: str = USER_SCOPES,
    ) -> dict[str, Any]:
        """Authorization code + PKCE S256 end to end; the token response."""
        verifier, challenge = pkce_pair()
        result = await self.authorize(
            email,
            password,
            redirect_uri=redirect_uri,
            code_challenge=challenge,
            client_id=client_id,
            scope=scope,
            # oidc-provider drops offline_access without it (OIDC Core §11), like tunnel-client
            extra={"prompt": "consent"},
        )
        if "code" not in result:
            raise IdpError(f"authorization failed: {result}")
        form = {
            "grant_type": "authorization_code",
            "code": result["code"],
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        return await self.token(form, client_id=client_id, client_secret=client_secret)


async def ensure_node_modules() -> None:
    """``npm ci`` in deploy/dev-idp, only when node_modules is missing (one process at a time)."""
    if (IDP_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        return
    if NPM is None:
        raise IdpError("npm not installed and deploy/dev-idp/node_modules missing")
    lock = await asyncio.to_thread(_lock, IDP_DIR / "package-lock.json")
    try:
        if (IDP_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
            return
        process = await asyncio.create_subprocess_exec(
            NPM,
            "ci",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            cwd=IDP_DIR,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(NPM_CI_TIMEOUT):
                output, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise IdpError("npm ci timed out in deploy/dev-idp") from None
        if process.returncode != 0:
            raise IdpError(f"npm ci failed in deploy/dev-idp:\n{output.decode(errors='replace')}")
    finally:
        lock.close()


def _lock(path: Path) -> BinaryIO:
    handle = path.open("rb")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle
