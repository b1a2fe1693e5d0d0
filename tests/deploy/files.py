"""Readers for the files of deploy/ (Dockerfile, Kubernetes YAML, haproxy.cfg, systemd units)
and the Kubernetes semantics the checks need (label selectors, named ports, env expansion,
volume projection). Pure functions on parsed data: the tests feed them mutated copies too."""

from __future__ import annotations

import base64
import copy
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
SYSTEMD_UNIT = DEPLOY / "systemd" / "tunnel-server.service"
COMPOSE = DEPLOY / "compose" / "compose.yaml"

Doc = dict[str, Any]

# What the kubelet would put in fieldRef variables, for one sample pod.
SAMPLE_POD_NAME = "relay-6d8f7c9b5-x2x5k"
SAMPLE_POD_IP = "10.1.2.3"
SAMPLE_FIELDS = {
    "metadata.name": SAMPLE_POD_NAME,
    "metadata.namespace": "tunnel",
    "status.podIP": SAMPLE_POD_IP,
    "status.hostIP": "192.0.2.10",
    "spec.nodeName": "node-a",
    "spec.serviceAccountName": "tunnel-relay",
}


# ---- Dockerfile -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comment lines (also inside a
    continuation) dropped, as BuildKit reads them."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = (pending + stripped).strip()
        pending = ""
        if not line:
            continue
        keyword, _, args = line.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each starting with its FROM."""
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def dockerfile_args(instructions: list[Instruction]) -> dict[str, str]:
    """Global ARG defaults (before the first FROM)."""
    out: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            out[name.strip()] = value.strip()
    return out


def exec_form(ins: Instruction) -> list[str]:
    value = json.loads(ins.args)
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    assert ok, f"{ins.keyword} must be the exec (JSON array) form, got {ins.args!r}"
    return list(value)


def config_path_of(command: list[str]) -> str:
    """The --config argument of ``tunnel-server serve``."""
    assert command[:2] == ["tunnel-server", "serve"], f"not tunnel-server serve: {command}"
    if "--config" in command:
        return command[command.index("--config") + 1]
    for arg in command:
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no --config in {command}")


# ---- Kubernetes -------------------------------------------------------------------------------


def load_k8s(directory: Path = K8S) -> dict[str, list[Doc]]:
    """Every document of every *.yaml (but kustomization.yaml), by file name."""
    out: dict[str, list[Doc]] = {}
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        out[path.name] = docs
    return out


@dataclass
class Manifests:
    docs: list[Doc]

    @classmethod
    def load(cls) -> Manifests:
        return cls([d for docs in load_k8s().values() for d in docs])

    def copy(self) -> Manifests:
        return Manifests(copy.deepcopy(self.docs))

    def all(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> Doc:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
        return found[0]

    def workloads(self) -> list[Doc]:
        return [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]

    def selected(self, selector: Mapping[str, str]) -> list[Doc]:
        """Workloads whose pods a label selector (matchLabels form) selects."""
        return [w for w in self.workloads() if matches(selector, pod_labels(w))]


def pod_labels(workload: Doc) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels") or {})


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """matchLabels semantics; an empty selector selects nothing here (never intended)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def match_labels(selector: Doc) -> dict[str, str]:
    assert not selector.get("matchExpressions"), "only matchLabels selectors are checked"
    return dict(selector.get("matchLabels") or {})


def containers(workload: Doc) -> list[Doc]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def container(workload: Doc, name: str) -> Doc:
    found = [c for c in containers(workload) if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no container {name!r}"
    return found[0]


def container_port(workload: Doc, port: int | str) -> int:
    """Resolve a named or numeric port against the workload's container ports."""
    declared = [p for c in containers(workload) for p in c.get("ports", [])]
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in declared), (
            f"{workload['metadata']['name']}: port {port} is not a container port"
        )
        return port
    for p in declared:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"{workload['metadata']['name']}: no container port named {port!r}")


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes dependent-variable expansion: $(VAR) of an earlier variable, $$ -> $, an
    unknown reference stays as written."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR_REF.sub(sub, value)


def secret_value(manifests: Manifests, name: str, key: str) -> str:
    secret = manifests.one("Secret", name)
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    if key in (secret.get("data") or {}):
        return base64.b64decode(secret["data"][key]).decode()
    raise AssertionError(f"Secret {name} has no key {key!r}")


def container_env(manifests: Manifests, ctr: Doc) -> dict[str, str]:
    """The environment the kubelet would give the container, for the sample pod."""
    env: dict[str, str] = {}
    for item in ctr.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[name] = SAMPLE_FIELDS[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[name] = secret_value(manifests, ref["name"], ref["key"])
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[name] = str(manifests.one("ConfigMap", ref["name"])["data"][ref["key"]])
        else:
            raise AssertionError(f"env {name}: unsupported valueFrom {sorted(source)}")
    return env


@dataclass
class ProjectedFile:
    """A file a volume puts into the container: where it comes from."""

    source_kind: str  # ConfigMap or Secret
    source_name: str
    key: str


@dataclass
class MountedFiles:
    """Container path -> the ConfigMap/Secret key behind it."""

    files: dict[PurePosixPath, ProjectedFile] = field(default_factory=dict)

    def __contains__(self, path: PurePosixPath) -> bool:
        return path in self.files


def _volume_items(volume: Doc) -> Iterator[tuple[str, str, str, str]]:
    """(kind, name, key, relative path) of each file a volume holds, for volumes whose files
    are listed explicitly (items) -- the form the checks require for config and secrets."""
    sources: list[tuple[str, Doc]] = []
    if "configMap" in volume:
        sources.append(("ConfigMap", volume["configMap"]))
    elif "secret" in volume:
        sources.append(("Secret", {**volume["secret"], "name": volume["secret"]["secretName"]}))
    elif "projected" in volume:
        for src in volume["projected"]["sources"]:
            if "configMap" in src:
                sources.append(("ConfigMap", src["configMap"]))
            elif "secret" in src:
                sources.append(("Secret", src["secret"]))
    for kind, src in sources:
        items = src.get("items")
        assert items, f"volume {volume['name']}: list the {kind} keys it mounts (items)"
        for item in items:
            yield kind, src["name"], item["key"], item["path"]


def mounted_files(workload: Doc, ctr: Doc) -> MountedFiles:
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    out = MountedFiles()
    for mount in ctr.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if not any(k in volume for k in ("configMap", "secret", "projected")):
            continue
        assert "subPath" not in mount, (
            f"{mount['mountPath']}: subPath mounts never see ConfigMap/Secret updates"
        )
        base = PurePosixPath(mount["mountPath"])
        for kind, name, key, rel in _volume_items(volume):
            out.files[base / rel] = ProjectedFile(kind, name, key)
    return out


# ---- haproxy.cfg ------------------------------------------------------------------------------


def haproxy_sections(text: str) -> dict[tuple[str, str], list[str]]:
    """(section keyword, name) -> its directive lines, comments and blank lines dropped."""
    heads = {"global", "defaults", "frontend", "backend", "listen", "resolvers", "peers"}
    out: dict[tuple[str, str], list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith("#") else ""
        if not line:
            continue
        words = line.split()
        if words[0] in heads and not raw[:1].isspace():
            current = out.setdefault((words[0], words[1] if len(words) > 1 else ""), [])
            continue
        assert current is not None, f"directive outside a section: {raw!r}"
        current.append(line)
    return out


def haproxy_servers(lines: list[str]) -> dict[str, tuple[str, int]]:
    """server NAME HOST:PORT ... -> {NAME: (HOST, PORT)}."""
    out: dict[str, tuple[str, int]] = {}
    for line in lines:
        words = line.split()
        if words[0] == "server":
            host, _, port = words[2].rpartition(":")
            out[words[1]] = (host, int(port))
    return out


_DURATION = re.compile(r"^(\d+)(us|ms|s|m|h|d)?$")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def haproxy_seconds(value: str) -> float:
    """HAProxy time format: a bare number is milliseconds."""
    m = _DURATION.match(value)
    assert m, f"not an HAProxy duration: {value!r}"
    return int(m.group(1)) * (_UNIT_SECONDS[m.group(2)] if m.group(2) else 1e-3)


# ---- systemd ----------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """[Section] -> key -> every value assigned (in order)."""
    out: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"setting outside a section: {raw!r}"
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def systemd_seconds(value: str) -> float:
    """A systemd time span (45, 45s, 1min 30s, 2m)."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "ms": 1e-3}
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*([a-z]*)", value):
        total += int(number) * units[unit]
    return total


def command_words(value: str) -> list[str]:
    """An Exec*= command line without its special prefixes (-, @, :, +, !)."""
    return shlex.split(value.lstrip("-@:+!"))
