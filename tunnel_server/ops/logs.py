"""The relay's log output: one handler on stderr, JSON lines (audit records pass through as
they are) or text, and a filter that keeps bearer credentials and JWTs out of every line."""

from __future__ import annotations

import json
import logging
import re
import sys


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "tunnel.audit":
            return record.getMessage()  # already a JSON record
        entry = {
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_SECRET = re.compile(
    r"(?i)(bearer\s+|basic\s+)[A-Za-z0-9._~+/=-]+"  # credentials in headers
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # anything shaped like a JWT
)


class RedactSecrets(logging.Filter):
    """Last line of defence: no record leaves with a bearer credential or a JWT in it, even
    when a library logs request headers at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRET.sub(lambda m: (m.group(1) or "") + "[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(fmt: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactSecrets())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    # httpx2 (the browser sign-in's client, web.oidc_code) logs every request at INFO: the
    # audit record already says how each sign-in ended.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
