"""Decision latency of the policy engine for 1,000 bindings with CEL conditions (p50/p99, µs).

Pure CPU, no I/O. Two shapes: "indexed" (bindings name groups; each caller is in 5 of 200
groups, so the member index leaves a few dozen candidates) and "worst" (every binding names
allAuthenticatedUsers and matches the resource and port, and every condition is false, so all
1,000 conditions run for each decision). Also prints load (parse + compile) and explain times.

    .venv/bin/python -m bench.policy [--samples N] [--seed S]
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from tunnel_server.access.policy import AccessRequest, Policy, evaluate, explain, parse_policy

BINDINGS = 1000
GROUPS = 200
ZONES = ["europe-west1-b", "europe-west1-c", "us-east1-b", "asia-east1-a"]
CONDITIONS = [
    "request.time.getHours('Europe/Paris') >= 7 && request.time.getHours('Europe/Paris') < 20",
    "destination.port in [22, 3389]",
    "'mfa' in auth.claims.amr",
    "inIpRange(source.ip, '10.0.0.0/8')",
    "request.time < timestamp('2030-01-01T00:00:00Z') && device.managed == true",
    "'corp_network' in request.auth.access_levels",
    "resource.labels.env == 'prod' || destination.port == 22",
    "auth.claims.groups.exists(g, g.startsWith('team-'))",
]
LEVELS: dict[str, Any] = {
    "corp_network": {"ip_subnetworks": ["10.0.0.0/8", "2001:db8::/32"]},
    "managed_device": {"device": {"managed": True, "encrypted": True}},
    "desktop": {"device": {"os": ["linux", "macos"]}},
    "office_hours": {
        "time": {
            "days": ["mon", "tue", "wed", "thu", "fri"],
            "start": "07:00",
            "end": "20:00",
            "tz": "Europe/Paris",
        }
    },
    "us_hours": {"time": {"start": "06:00", "end": "22:00", "tz": "America/New_York"}},
    "trusted": {"required_levels": ["corp_network", "managed_device"]},
    "either": {"combine": "OR", "required_levels": ["corp_network", "managed_device"]},
    "offsite": {"ip_subnetworks": ["10.0.0.0/8"], "negate": True},
}


def _resources(rng: random.Random) -> dict[str, Any]:
    shape = rng.randrange(3)
    if shape == 0:
        return {"instances": [f"prod/{rng.choice(ZONES)}/vm-{rng.randrange(500)}"]}
    if shape == 1:
        return {"instances": [f"prod/{rng.choice(ZONES)}/*"]}
    return {"labels": {"env": rng.choice(["prod", "dev"])}}


def make_policy(rng: random.Random, *, worst: bool) -> dict[str, Any]:
    bindings = []
    for n in range(BINDINGS):
        groups = {f"group:team-{rng.randrange(GROUPS)}" for _ in range(rng.randint(1, 3))}
        binding: dict[str, Any] = {
            "name": f"b{n}",
            "members": ["allAuthenticatedUsers"] if worst else sorted(groups),
            "role": "tunnelUser",
            "resources": {"instances": ["*"]} if worst else _resources(rng),
            "ports": [22, "3389", "8000-8100"],
            "condition": {"title": f"c{n}", "expression": rng.choice(CONDITIONS)},
        }
        if worst:
            binding["condition"]["expression"] = "destination.port == 8080 && " + rng.choice(
                CONDITIONS
            )
        elif rng.random() < 0.3:
            binding["access_levels"] = [rng.choice(sorted(LEVELS))]
        bindings.append(binding)
    deny = [
        {
            "name": f"d{n}",
            "members": [f"group:team-{rng.randrange(GROUPS)}"],
            "condition": "!('managed_device' in request.auth.access_levels) && "
            "destination.port == 3389",
        }
        for n in range(20)
    ]
    return {"access_levels": LEVELS, "bindings": bindings, "deny": deny}


def make_requests(rng: random.Random, count: int) -> list[AccessRequest]:
    out = []
    for n in range(count):
        groups = {f"group:team-{rng.randrange(GROUPS)}" for _ in range(5)}
        zone = rng.choice(ZONES)
        out.append(
            AccessRequest(
                frozenset({f"user:u{n}@example.com", "domain:example.com", *groups}),
                f"instance:prod/{zone}/vm-{rng.randrange(500)}",
                rng.choice([22, 3389, 8080]),
                source_ip=rng.choice(["10.1.2.3", "192.0.2.7", "2001:db8::5"]),
                principal=f"user:u{n}@example.com",
                labels={"env": rng.choice(["prod", "dev"])},
                device={"managed": rng.random() < 0.7, "encrypted": True, "os": "linux"},
                claims={"amr": rng.choice([["pwd"], ["pwd", "mfa"]]), "groups": ["team-1"]},
            )
        )
    return out


def measure(
    call: Callable[[AccessRequest, Policy, float], object],
    policy: Policy,
    requests: list[AccessRequest],
    now: float,
    samples: int,
) -> list[float]:
    for request in requests[:200]:  # warm-up
        call(request, policy, now)
    out = []
    for n in range(samples):
        request = requests[n % len(requests)]
        start = time.perf_counter_ns()
        call(request, policy, now)
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(label: str, values: list[float]) -> None:
    print(
        f"| {label} | {len(values)} | {percentile(values, 0.5):.1f} | "
        f"{percentile(values, 0.9):.1f} | {percentile(values, 0.99):.1f} | "
        f"{statistics.fmean(values):.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=4)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    now = dt.datetime(2024, 3, 29, 15, 0, tzinfo=dt.UTC).timestamp()
    requests = make_requests(rng, 1000)
    print("| scenario | samples | p50 µs | p90 µs | p99 µs | mean µs |")
    print("|---|---|---|---|---|---|")
    loads = []
    for worst in (False, True):
        data = make_policy(rng, worst=worst)
        start = time.perf_counter()
        policy = parse_policy(data, "bench")
        load_ms = (time.perf_counter() - start) * 1000
        shape = "worst: 1,000 candidates" if worst else "indexed"
        latencies = measure(evaluate, policy, requests, now, args.samples)
        allowed = sum(evaluate(r, policy, now).allowed for r in requests) / len(requests)
        candidates = statistics.fmean(len(policy.allow_candidates(r.members)) for r in requests)
        report(
            f"evaluate, {shape} ({candidates:.0f} candidates, {allowed:.0%} allowed)",
            latencies,
        )
        report(f"explain, {shape}", measure(explain, policy, requests, now, args.samples // 100))
        loads.append(f"load + compile of {BINDINGS} bindings ({shape}): {load_ms:.0f} ms")
    print("\n".join(["", *loads]))


if __name__ == "__main__":
    main()
