"""SSH login names granted by a binding: literal names, or templates filled from the verified
identity (``{email_local}``: the email's part before ``@``; ``{sub}``; ``{email}``), turned into
the principals of an SSH certificate. A template whose value would not be a valid login name
(for example no email) grants nothing."""

from __future__ import annotations

import re
from collections.abc import Iterable

# A login name or template: what OpenSSH and useradd accept, plus {placeholders}.
LOGIN_TEMPLATE = r"^([a-z_][a-z0-9_.-]{0,31}|\{(email_local|email|sub)\}[a-z0-9_.-]{0,16})$"
_LOGIN = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_EMAIL_LOGIN = re.compile(r"^[a-z_][a-z0-9_.@+-]{0,63}$")


def render_logins(templates: Iterable[str], *, email: str | None, subject: str) -> tuple[str, ...]:
    """The login names ``templates`` grant this identity, in order, without duplicates."""
    values = {
        "{email_local}": email.partition("@")[0].lower() if email else None,
        "{email}": email.lower() if email else None,
        "{sub}": subject.lower(),
    }
    out: list[str] = []
    for template in templates:
        name = template
        for placeholder, value in values.items():
            if placeholder in name:
                if value is None:
                    name = ""
                    break
                name = name.replace(placeholder, value)
        pattern = _EMAIL_LOGIN if "{email}" in template else _LOGIN
        if name and pattern.match(name) and name not in out:
            out.append(name)
    return tuple(out)
