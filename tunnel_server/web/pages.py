"""The few HTML pages the proxy itself serves, and what a failed browser sign-in tells the user
(HTTP mode's and the console's). Every dynamic value is HTML-escaped."""

from __future__ import annotations

from html import escape

from .oidc_code import FailureKind, SignInFailed

_STYLE = "body{font-family:sans-serif;max-width:40em;margin:4em auto;line-height:1.5}"


def page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<meta name='viewport' content='width=device-width'><style>{_STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>"
    )


def sign_out_form(csrf: str, label: str = "Sign out") -> str:
    return (
        "<form method='post' action='/_tunnel/sign_out'>"
        f"<input type='hidden' name='csrf' value='{escape(csrf)}'>"
        f"<button type='submit' id='sign-out'>{escape(label)}</button></form>"
    )


def denied(email: str, request_id: str, csrf: str | None) -> str:
    who = f"<p>You are signed in as <b id='who'>{escape(email)}</b>.</p>"
    switch = sign_out_form(csrf, "Sign in as another user") if csrf else ""
    return page(
        "Access denied",
        "<p id='denied'>You don't have access to this application.</p>"
        + who
        + "<p>If you need access, ask the application's administrator to grant it to your "
        f"account, and give them this reference: <code>{escape(request_id)}</code>.</p>" + switch,
    )


def signed_out() -> str:
    return page(
        "Signed out",
        "<p id='signed-out'>You have been signed out.</p><p><a href='/'>Sign in again</a></p>",
    )


def sign_out_confirm(csrf: str) -> str:
    return page("Sign out", sign_out_form(csrf))


_TELL = "tell your administrator and give them the reference below (the relay's log says why)"
# A failed sign-in: the status, what happened, what to do. The reference shown with it is in the
# failure's audit record, with the detail the page leaves out (it may name provider internals).
SIGN_IN_FAILURES: dict[FailureKind, tuple[int, str, str]] = {
    "state": (
        400,
        "This sign-in link is invalid or has expired.",
        "A sign-in must finish in the browser that started it, within a few minutes, and each "
        "link works once. Start again.",
    ),
    "provider": (
        401,
        "The identity provider did not sign you in.",
        "If you cancelled, start again. If it refuses again, ask your administrator whether "
        "your account may sign in here, and give them the reference below.",
    ),
    "unreachable": (
        503,
        "The identity provider cannot be reached right now.",
        f"Try again in a minute. If it keeps failing, {_TELL}.",
    ),
    "exchange": (
        502,
        "The identity provider did not complete the sign-in: it refused the relay's request "
        "for your tokens.",
        f"Start again. If it keeps failing, the relay's client settings may be wrong: {_TELL}.",
    ),
    "id_token": (
        401,
        "The identity provider's answer could not be verified, so you are not signed in.",
        f"Start again. If it keeps failing, {_TELL}.",
    ),
    "not_allowed": (
        403,
        "You signed in, but your account may not use this.",
        "Ask an administrator for access, or sign in as another user.",
    ),
}


def sign_in_failure(failure: SignInFailed) -> tuple[int, str, str]:
    """Status, what happened (with the provider's error code when it sent one), what to do."""
    status, what, todo = SIGN_IN_FAILURES[failure.kind]
    if failure.provider_error is not None:
        what = what.removesuffix(".") + f" (it answered {failure.provider_error})."
    return status, what, todo


def sign_in_failed(
    failure: SignInFailed, reference: str, start_again: str = "/_tunnel/sign_in"
) -> tuple[int, str]:
    """HTTP mode's page for a failed sign-in, and its status."""
    status, what, todo = sign_in_failure(failure)
    body = (
        f"<p id='what'>{escape(what)}</p><p id='todo'>{escape(todo)}</p>"
        f"<p>Reference: <code id='reference'>{escape(reference)}</code></p>"
        f"<p><a id='start-again' href='{escape(start_again)}'>Start again</a></p>"
    )
    return status, page("Sign-in failed", body)


def unknown_host(host: str) -> str:
    """HTTP mode has no application at ``host`` (as the request named it)."""
    return page(
        "No application here",
        f"<p id='unknown-host'>This relay serves no application at <b>{escape(host)}</b>.</p>"
        "<p>Check the address. If an application should be here, its route is missing from "
        "the relay's configuration (<code>http.routes</code>): tell its operator.</p>",
    )


def unavailable() -> str:
    return page(
        "Temporarily unavailable",
        "<p id='unavailable'>Sign-in is temporarily unavailable. Try again in a few seconds."
        "</p><p><a href=''>Retry</a></p>",
    )
