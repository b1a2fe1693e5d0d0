"""The few HTML pages the proxy itself serves. Every dynamic value is HTML-escaped."""

from __future__ import annotations

from html import escape

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


def login_failed(reason: str) -> str:
    return page(
        "Sign-in failed",
        f"<p>{escape(reason)}</p><p><a href='/_tunnel/sign_in'>Try again</a></p>",
    )


def unavailable() -> str:
    return page(
        "Temporarily unavailable",
        "<p id='unavailable'>Sign-in is temporarily unavailable. Try again in a few seconds."
        "</p><p><a href=''>Retry</a></p>",
    )
