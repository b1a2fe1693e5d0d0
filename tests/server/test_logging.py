"""Production logging: secrets are redacted even from libraries' DEBUG header dumps."""

from __future__ import annotations

import logging

import pytest

from tunnel_server.ops.logs import RedactSecrets

from ..oidc_fixture import TestIssuer


@pytest.mark.parametrize(
    "template",
    [
        "> Authorization: Bearer {token}",
        "header authorization: bearer {token} end",
        "token={token}",
        "Proxy-Authorization: Basic {basic}",
    ],
)
async def test_secrets_are_redacted(issuer: TestIssuer, template: str) -> None:
    token = issuer.mint()
    record = logging.LogRecord(
        "websockets.client", logging.DEBUG, __file__, 1, template, None, None
    )
    record.msg = template.format(token=token, basic="YWxpY2U6c2VjcmV0")
    assert RedactSecrets().filter(record)
    message = record.getMessage()
    assert token not in message
    assert "YWxpY2U6c2VjcmV0" not in message
    assert "[redacted]" in message
