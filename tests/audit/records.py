"""One audit record of every type the relay writes (fields as docs/audit.md lists them), for
round trips through the audit store; strings include markup, quotes and non-ASCII text."""

from __future__ import annotations

from typing import Any

ALICE = "user:alice@example.com"
BOB = "user:bob@example.com"
VM1 = "instance:p/z/vm1"
SID = "8mX2aaaaaaaaaaaaaaaaaaaaaaaaaaaa-abcdefgh"

# (event, fields) in the order AuditLog.record takes them.
EVERY_TYPE: list[tuple[str, dict[str, Any]]] = [
    ("handshake", {"decision": "deny", "reason": "expired", "status": 401,
                   "source_ip": "203.0.113.7"}),
    ("handshake", {"decision": "deny", "reason": "too many tunnels for this principal (limit 2)",
                   "status": 429, "principal": BOB, "source_ip": "::1"}),
    ("decision", {"decision": "allow", "reason": "allowed by access[0]", "principal": ALICE,
                  "source_ip": "127.0.0.1", "device": None, "resource": VM1,
                  "host": None, "address": "127.0.0.1", "port": 22, "binding": "access[0]",
                  "rule": 0, "dialect": "native", "tunnel_id": SID}),
    ("decision", {"decision": "deny", "reason": "no binding grants tunnelUser", "principal": BOB,
                  "source_ip": "127.0.0.1", "device": "dev-1", "resource": VM1, "port": 5432,
                  "binding": None, "dialect": "iap"}),
    ("decision", {"decision": "allow", "reason": "dial timeout", "principal": ALICE,
                  "resource": "group:p/r/n/g", "host": "db.internal", "address": "10.0.0.5",
                  "port": 5432, "result": "backend_unreachable", "dialect": "native"}),
    ("resume", {"decision": "allow", "principal": ALICE, "source_ip": "127.0.0.1",
                "tunnel_id": SID, "ack": 1048576}),
    ("resume", {"decision": "forward", "principal": ALICE, "tunnel_id": SID}),
    ("resume", {"decision": "deny", "reason": "sid unknown", "principal": BOB,
                "source_ip": "127.0.0.1"}),
    ("reauth", {"decision": "deny", "reason": "token expired", "principal": ALICE,
                "tunnel_id": SID}),
    ("revoke", {"tunnel_id": SID, "principal": ALICE, "reason": "session revoked",
                "by": "user:root@example.com"}),
    ("revocation_received", {"kind": "user", "subject": BOB, "by": None, "origin": "relay-2"}),
    ("admin", {"decision": "deny", "reason": "not an admin", "principal": BOB, "status": 403}),
    ("limit_warning", {"tunnel_id": SID, "principal": ALICE, "limit": "idle_timeout",
                       "closes_in": 59.5}),
    ("backpressure", {"reason": "unread pongs: reading paused", "source_ip": "127.0.0.1",
                      "buffered": 1048577}),
    ("drain", {"phase": "start", "grace": 30.0, "tunnels": 3}),
    ("drain", {"phase": "end", "closed": 3, "seconds": 30.004}),
    ("tunnel_closed", {"tunnel_id": SID, "principal": ALICE, "resource": VM1,
                       "address": "127.0.0.1", "port": 22, "source_ip": "127.0.0.1",
                       "bytes_from_client": 48213, "bytes_to_client": 1928734,
                       "bytes_acked_by_client": 1928734, "resumes": 1, "duration": 312.4,
                       "close_code": 1000, "close_reason": "finished"}),
    ("http", {"decision": "deny", "reason": "no binding grants webUser", "app": "demo",
              "principal": "user:<img src=x onerror=alert(1)>@example.com", "status": 403,
              "host": "demo.localhost", "path": "/a?\"b\"=<c>", "method": "GET"}),
    ("http_login", {"decision": "allow", "principal": "user:zoë@example.com"}),
    ("http_logout", {"principal": ALICE}),
    ("http_close", {"principal": ALICE, "app": "demo", "reason": "session ended"}),
    ("console", {"action": "revoke_session", "principal": "user:root@example.com",
                 "subject": SID, "closed": 1, "decision": "allow"}),
]  # fmt: skip
