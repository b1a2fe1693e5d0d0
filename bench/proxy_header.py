"""What the relay's identity in PROXY v2 costs per tunnel (issue 17), in microseconds of one
core: signing the assertion (the project's ``AssertionSigner``, ES256, with the tunnel claims),
packing the header (addresses and the 0xE0/0xE1 TLVs, docs/upstream-identity.md), and, on the
upstream, ``tunnel_upstream`` parsing and verifying it (a JWKS dict, a distinct header per
tunnel, no replay cache). Medians of ``--rounds`` timings of ``--count`` iterations each.

    python -m bench.proxy_header [--count 2000] [--rounds 5] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import struct
import time
from collections.abc import Callable
from pathlib import Path

from tunnel_server.web.assertion import AssertionSigner
from tunnel_upstream import IdentityCheck, parse_proxy_header, verify_identity

from .http_report import write_section

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
ISSUER = "https://relay.example.com:8445"
AUDIENCE = "tcp:db-1"


def pack(source: tuple[str, int], target: tuple[str, int], tunnel_id: str, token: str) -> bytes:
    """A PROXY v2 header as docs/upstream-identity.md lays it out (TCP over IPv4 here)."""
    tlvs = b"".join(
        struct.pack("!BH", kind, len(value)) + value
        for kind, value in ((0xE0, tunnel_id.encode()), (0xE1, token.encode()))
    )
    src, dst = ipaddress.ip_address(source[0]).packed, ipaddress.ip_address(target[0]).packed
    body = src + dst + struct.pack("!HH", source[1], target[1]) + tlvs
    return SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def sign(signer: AssertionSigner, tunnel_id: str) -> str:
    return signer.sign(
        audience=AUDIENCE, subject="alice", email="alice@example.com", groups=["ops"],
        access_levels=["corp"], principal="user:alice@example.com",
        extra={"instance": "db-1", "port": 5432, "tunnel_id": tunnel_id},
    )  # fmt: skip


def timed(work: Callable[[int], object], count: int, rounds: int) -> float:
    """Median µs per call of ``work(i)``."""
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        for i in range(count):
            work(i)
        samples.append((time.perf_counter() - began) / count * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    signer = AssertionSigner(ISSUER)
    token = sign(signer, "t-0")
    header = pack(("203.0.113.7", 50123), ("10.0.0.5", 5432), "t-0", token)
    check = IdentityCheck(AUDIENCE, ISSUER, jwks=signer.jwks(), replays=None)
    # A header per tunnel, each verified once (as every tunnel's assertion is its own).
    unique = iter(
        [pack(("203.0.113.7", 50123), ("10.0.0.5", 5432), f"t-{i}", sign(signer, f"t-{i}"))
         for i in range(args.count * args.rounds)]
    )  # fmt: skip

    def read(_: int) -> object:
        parsed = parse_proxy_header(next(unique))
        assert parsed is not None
        return verify_identity(parsed[0], check)

    rows = [
        ("relay: sign the assertion (ES256)", timed(lambda i: sign(signer, f"t-{i}"), args.count,
                                                     args.rounds)),
        ("relay: pack the header", timed(lambda i: pack(("203.0.113.7", 50123),
                                                        ("10.0.0.5", 5432), "t-0", token),
                                         args.count, args.rounds)),
        ("upstream: parse and verify (tunnel_upstream)", timed(read, args.count, args.rounds)),
    ]  # fmt: skip
    text = "\n".join(
        [
            "## PROXY v2 identity header, per tunnel (issue 17)",
            "",
            f"`python -m bench.proxy_header`: µs of one core per tunnel, medians of "
            f"{args.rounds} × {args.count}; {len(header)} header bytes; load average {load:.2f}.",
            "",
            "| step | µs |",
            "|---|---:|",
            *(f"| {name} | {us:.1f} |" for name, us in rows),
        ]
    )
    print(text)
    if args.out:
        write_section(args.out, text + "\n", name="proxy-header")


if __name__ == "__main__":
    main()
