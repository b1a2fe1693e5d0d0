"""Compare the three Python CEL runtimes on policy-style expressions: correctness and speed.

The runtimes are optional (only the chosen one is a dependency); missing ones are skipped.

    .venv/bin/pip install cel-python common-expression-language cel-expr-python
    .venv/bin/python -m bench.cel_runtimes [--number N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NOW = dt.datetime(2024, 3, 29, 17, 30, tzinfo=dt.UTC)  # a Friday, 18:30 in Paris
ERROR = "error"  # expected: an evaluation or compile error (fail closed)
FALSE_OR_ERROR = "false|error"  # either is a safe answer

VARIABLES: dict[str, Any] = {
    "request.time": NOW,
    "request.host": "app.example.com",
    "request.path": "/api/v2/items",
    "request.auth.access_levels": ["corp_network"],
    "source.ip": "10.1.2.3",
    "destination.ip": "2001:db8::7",
    "destination.port": 22,
    "destination.host": "DB.internal",
    "device": {"id": "dev-42", "managed": True, "encrypted": True, "os": "linux"},
    "auth.claims": {"groups": ["ops", "sre-eu"], "amr": ["pwd", "mfa"]},
}

CASES: list[tuple[str, object]] = [
    (
        "request.time.getHours('Europe/Paris') >= 8 && request.time.getHours('Europe/Paris') < 18",
        False,
    ),
    ("request.time.getDayOfWeek('Europe/Paris') in [1, 2, 3, 4, 5]", True),
    ("request.time.getHours('Asia/Kolkata') == 23", True),
    ("request.time < timestamp('2030-01-01T00:00:00Z')", True),
    ("request.time - timestamp('2024-03-29T00:00:00Z') > duration('12h')", True),
    ("'corp_network' in request.auth.access_levels", True),
    ("destination.port in [22, 3389]", True),
    ("destination.port >= 8000 && destination.port <= 8080", False),
    ("request.path.startsWith('/api/') && request.host.endsWith('.example.com')", True),
    ("request.path.matches('^/api/v[0-9]+/')", True),
    ("destination.host.lowerAscii() == 'db.internal'", True),
    ("inIpRange(source.ip, '10.0.0.0/8')", True),
    ("inIpRange(destination.ip, '2001:db8::/32')", True),
    ("device.managed && device.encrypted && device.os in ['linux', 'macos']", True),
    ("has(device.id) && device.id.startsWith('dev-')", True),
    ("auth.claims.groups.exists(g, g.startsWith('sre-'))", True),
    ("size(auth.claims.amr) > 1 && 'mfa' in auth.claims.amr", True),
    ("device.serial == 'x'", ERROR),
    ("destination.port / 0 == 1", ERROR),
    ("false && device.serial == 'x'", False),
    ("device.serial == 'x' || true", True),
    ("destination.port == 'twenty-two'", FALSE_OR_ERROR),
    ("request.time.getHours('Mars/Olympus') == 1", ERROR),
    ("requst.time.getHours() == 1", ERROR),
    ("request.time.getHours(", ERROR),
    ("int(request.time) > 0", True),
]

SPEED = {
    "typical": "request.time < timestamp('2030-01-01T00:00:00Z')"
    " && 'corp_network' in request.auth.access_levels && destination.port == 22",
    "time zone": "request.time.getHours('Europe/Paris') < 19",
    "custom function": "inIpRange(source.ip, '10.0.0.0/8')",
}


def in_ip_range(ip: object, cidr: object) -> bool:
    return ipaddress.ip_address(str(ip)) in ipaddress.ip_network(str(cidr), strict=False)


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@dataclass
class Runtime:
    name: str
    compile: Callable[[str], Any]
    activation: Callable[[dict[str, Any]], Any]
    run: Callable[[Any, Any], Any]  # raises on an evaluation error


def celpy_runtime(*, compiled: bool = False) -> Runtime:
    celpy: Any = importlib.import_module("celpy")
    ct: Any = importlib.import_module("celpy.celtypes")
    env = celpy.Environment(runner_class=celpy.CompiledRunner if compiled else None)

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return ct.MapType({ct.StringType(k): conv(x) for k, x in v.items()})
        if isinstance(v, list):
            return ct.ListType([conv(x) for x in v])
        if isinstance(v, bool):
            return ct.BoolType(v)
        if isinstance(v, int):
            return ct.IntType(v)
        if isinstance(v, dt.datetime):
            return ct.TimestampType(v)
        return ct.StringType(v)

    def compile_(text: str) -> Any:
        return env.program(env.compile(text), functions={"inIpRange": in_ip_range})

    def activation(flat: dict[str, Any]) -> Any:
        return {k: conv(v) for k, v in nested(flat).items()}

    def run(program: Any, act: Any) -> Any:
        value = program.evaluate(act)
        if isinstance(value, Exception):
            raise value
        return value

    name = "cel-python (celpy" + (", CompiledRunner)" if compiled else ")")
    return Runtime(name, compile_, activation, run)


def celpy_compiled_runtime() -> Runtime:
    return celpy_runtime(compiled=True)


def rust_runtime() -> Runtime:
    cel: Any = importlib.import_module("cel")
    functions = {"inIpRange": in_ip_range}

    def activation(flat: dict[str, Any]) -> Any:
        return cel.Context(variables=nested(flat), functions=functions)

    return Runtime("common-expression-language", cel.compile, activation, lambda p, a: p.execute(a))


def cpp_runtime() -> Runtime:
    cel: Any = importlib.import_module("cel_expr_python.cel")
    strings: Any = importlib.import_module("cel_expr_python.ext.ext_strings")
    t = cel.Type
    dyn_map = t.Map(t.STRING, t.DYN)
    types = {
        "request.time": t.TIMESTAMP,
        "request.auth.access_levels": t.List(t.STRING),
        "destination.port": t.INT,
        "device": dyn_map,
        "auth.claims": dyn_map,
    }
    overload = cel.Overload(
        "inIpRange_string_string",
        return_type=t.BOOL,
        parameters=[t.STRING, t.STRING],
        impl=in_ip_range,
    )
    env = cel.NewEnv(
        variables={name: types.get(name, t.STRING) for name in VARIABLES},
        extensions=[strings.ExtStrings()],
        functions=[cel.FunctionDecl("inIpRange", [overload])],
    )

    def run(program: Any, act: Any) -> Any:
        value = program.eval(act)
        if value.type() == t.ERROR:
            raise RuntimeError(value.value())
        return value.value()

    return Runtime("cel-expr-python", env.compile, env.Activation, run)


def outcome(runtime: Runtime, text: str, act: Any) -> str:
    try:
        program = runtime.compile(text)
    except Exception:  # noqa: BLE001 - any failure is an outcome to tabulate
        return "load error"
    try:
        value = runtime.run(program, act)
    except Exception:  # noqa: BLE001
        return "eval error"
    return repr(value.__bool__() if type(value).__name__ == "BoolType" else value)


def correct(expected: object, got: str) -> bool:
    if expected == ERROR:
        return got in ("load error", "eval error")
    if expected == FALSE_OR_ERROR:
        return got in ("load error", "eval error", "False")
    return got == repr(expected)


def speed(runtime: Runtime, text: str, number: int) -> tuple[float, float] | None:
    """µs per evaluation with a prepared activation, and including building the activation."""
    program = runtime.compile(text)
    act = runtime.activation(VARIABLES)
    try:
        runtime.run(program, act)
    except Exception:  # noqa: BLE001 - unsupported here
        return None
    start = time.perf_counter()
    for _ in range(number):
        runtime.run(program, act)
    warm = (time.perf_counter() - start) / number * 1e6
    start = time.perf_counter()
    for _ in range(number):
        runtime.run(program, runtime.activation(VARIABLES))
    cold = (time.perf_counter() - start) / number * 1e6
    return warm, cold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=5000)
    args = parser.parse_args()
    logging.getLogger("celpy").setLevel(logging.CRITICAL)  # it logs every evaluation error
    runtimes: list[Runtime] = []
    for factory in (celpy_compiled_runtime, celpy_runtime, rust_runtime, cpp_runtime):
        try:
            runtimes.append(factory())
        except ImportError as exc:
            print(f"skipped: {exc}")
    print("| expression | expected | " + " | ".join(r.name for r in runtimes) + " |")
    print("|---|---|" + "---|" * len(runtimes))
    score = dict.fromkeys((r.name for r in runtimes), 0)
    acts = {r.name: r.activation(VARIABLES) for r in runtimes}
    for text, expected in CASES:
        cells = []
        for runtime in runtimes:
            got = outcome(runtime, text, acts[runtime.name])
            ok = correct(expected, got)
            score[runtime.name] += ok
            cells.append(got if ok else f"**{got}** ✗")
        print(f"| `{text}` | {expected} | " + " | ".join(cells) + " |")
    print("| correct | | " + " | ".join(f"{score[r.name]}/{len(CASES)}" for r in runtimes) + " |")
    print(
        "\n| µs per evaluation (prepared activation / new activation) | "
        + " | ".join(r.name for r in runtimes)
        + " |"
    )
    print("|---|" + "---|" * len(runtimes))
    for label, text in SPEED.items():
        cells = []
        for runtime in runtimes:
            result = speed(runtime, text, args.number)
            cells.append("n/a" if result is None else f"{result[0]:.1f} / {result[1]:.1f}")
        print(f"| {label}: `{text}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
