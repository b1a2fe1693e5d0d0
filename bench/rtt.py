"""1-byte ping-pong through a local port: blocking socket, TCP_NODELAY, one byte out and one
back per sample, after a warm-up. Prints one JSON line: samples, p50 and p99 in microseconds.

    python -m bench.rtt PORT [--count N] [--max-seconds S]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ping_pong(port: int, count: int, warmup: int, max_seconds: float) -> list[float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples: list[float] = []
        clock = time.perf_counter_ns
        deadline = time.monotonic() + max_seconds
        for n in range(warmup + count):
            start = clock()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError("connection closed during ping-pong")
            if n >= warmup:
                samples.append((clock() - start) / 1000)
                if len(samples) % 64 == 0 and time.monotonic() > deadline:
                    break
        return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--max-seconds", type=float, default=2.0)
    args = parser.parse_args()
    samples = sorted(ping_pong(args.port, args.count, args.warmup, args.max_seconds))
    result = {
        "samples": len(samples),
        "p50": statistics.median(samples),
        "p99": percentile(samples, 0.99),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
