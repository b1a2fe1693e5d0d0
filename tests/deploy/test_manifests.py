"""deploy/kubernetes and deploy/container: schema validation of every manifest (offline, with
the Kubernetes OpenAPI schemas kubernetes-validate ships), the relay config of the ConfigMap
through the real config loader with the environment the Deployment gives a pod, and the
cross-references a schema cannot see (selectors, named ports, probe paths, mounted files,
grace periods, non-root). Each cross-check is a function that the last tests run on broken
copies of the manifests, to prove it fails when it should."""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tunnel_server.build import build_policy
from tunnel_server.config import ConfigError, ServerConfig, parse_config, read_yaml

from .files import (
    DOCKERFILE,
    K8S,
    REPO,
    SAMPLE_POD_IP,
    SAMPLE_POD_NAME,
    Doc,
    Manifests,
    config_path_of,
    container,
    container_env,
    container_port,
    containers,
    dockerfile_args,
    dockerfile_instructions,
    dockerfile_stages,
    exec_form,
    load_k8s,
    match_labels,
    matches,
    mounted_files,
    pod_labels,
    secret_value,
)

# The oldest Kubernetes minor the manifests must still apply to, and the newest with schemas.
K8S_VERSIONS = ("1.30", str(kubernetes_validate.latest_version()))
NAMESPACE = "tunnel"
RELAY = ("Deployment", "relay")
RELAY_CONTAINER = "relay"
# Secrets the operator creates (docs/deploy.md), not shipped: name -> keys the pods use.
EXTERNAL_SECRETS = {"relay-tls": {"tls.crt", "tls.key", "ca.crt"}}
# Kill timeout beyond preStop + drain_grace: the closes after the grace (each bounded to 5 s).
CLOSE_MARGIN = 5


def relay_workload(m: Manifests) -> Doc:
    return m.one(*RELAY)


def relay_container(m: Manifests) -> Doc:
    return container(relay_workload(m), RELAY_CONTAINER)


def image_command(m: Manifests) -> list[str]:
    """What the relay container runs: its command, or the image's ENTRYPOINT."""
    ctr = relay_container(m)
    if "command" in ctr:
        return [*ctr["command"], *ctr.get("args", [])]
    assert "args" not in ctr, "args without command would replace the ENTRYPOINT's arguments"
    final = dockerfile_stages(dockerfile_instructions(DOCKERFILE.read_text()))[-1]
    entrypoint = [i for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoint, "the Dockerfile's final stage has no ENTRYPOINT"
    return exec_form(entrypoint[-1])


def relay_env(m: Manifests) -> dict[str, str]:
    return container_env(m, relay_container(m))


def relay_config_text(m: Manifests) -> str:
    """relay.yaml as the pod sees it: the ConfigMap key mounted at the --config path."""
    path = PurePosixPath(config_path_of(image_command(m)))
    files = mounted_files(relay_workload(m), relay_container(m))
    assert path in files, f"{path} (the --config path) is not mounted from a ConfigMap or Secret"
    source = files.files[path]
    assert source.source_kind == "ConfigMap", f"{path} should come from a ConfigMap"
    return str(m.one("ConfigMap", source.source_name)["data"][source.key])


def relay_config(m: Manifests, env: dict[str, str] | None = None) -> ServerConfig:
    data = yaml.safe_load(relay_config_text(m))
    return parse_config(
        data, source="relay-config/relay.yaml", env=relay_env(m) if env is None else env
    )


def prestop_sleep(ctr: Doc) -> float:
    command = ctr.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if command and command[0].endswith("sleep"):
        return float(command[1])
    return float(ctr.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0))


# ---- cross-checks (each raises AssertionError or ConfigError) ---------------------------------


def check_namespaces(m: Manifests) -> None:
    assert [n["metadata"]["name"] for n in m.all("Namespace")] == [NAMESPACE]
    for doc in m.docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, (
                f"{doc['kind']} {doc['metadata']['name']} is not in namespace {NAMESPACE}"
            )


def check_workload_selectors(m: Manifests) -> None:
    for w in m.workloads():
        name = w["metadata"]["name"]
        selector = match_labels(w["spec"]["selector"])
        assert matches(selector, pod_labels(w)), f"{name}: selector does not match its pods"
        assert m.selected(selector) == [w], f"{name}: its selector also selects other pods"


def check_services(m: Manifests) -> None:
    expected = {"relay": RELAY, "relay-metrics": RELAY, "redis": ("StatefulSet", "redis")}
    names = {s["metadata"]["name"] for s in m.all("Service")}
    assert names == set(expected), f"Services {sorted(names)}"
    for svc in m.all("Service"):
        name = svc["metadata"]["name"]
        selected = m.selected(svc["spec"]["selector"])
        target = m.one(*expected[name])
        assert selected == [target], (
            f"Service {name} selects {[w['metadata']['name'] for w in selected]}, "
            f"not {expected[name][1]}"
        )
        for port in svc["spec"]["ports"]:
            container_port(target, port.get("targetPort", port["port"]))
        assert svc["spec"].get("sessionAffinity", "None") == "None", (
            f"Service {name}: no session affinity (resumes are forwarded between nodes)"
        )


def check_relay_service_ports(m: Manifests, config: ServerConfig) -> None:
    deployment = relay_workload(m)
    svc = m.one("Service", "relay")
    targets = {container_port(deployment, p["targetPort"]) for p in svc["spec"]["ports"]}
    assert targets == {config.listen.port}, f"Service relay targets {targets}"
    assert [p["port"] for p in svc["spec"]["ports"]] == [443]
    metrics = m.one("Service", "relay-metrics")
    assert config.metrics is not None
    assert {container_port(deployment, p["targetPort"]) for p in metrics["spec"]["ports"]} == {
        config.metrics.listen.port
    }


def check_probes(m: Manifests, config: ServerConfig) -> None:
    deployment = relay_workload(m)
    ctr = relay_container(m)
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    scheme = "HTTPS" if config.tls is not None else "HTTP"
    for probe, path in expected.items():
        assert probe in ctr, f"relay container has no {probe}"
        get = ctr[probe]["httpGet"]
        assert get["path"] == path, f"{probe} path {get['path']} (expected {path})"
        port = container_port(deployment, get["port"])
        assert port == config.listen.port, (
            f"{probe} port {port}, relay listens on {config.listen.port}"
        )
        assert get.get("scheme", "HTTP") == scheme, f"{probe} scheme (the relay serves {scheme})"


def check_metrics_scrape(m: Manifests, config: ServerConfig) -> None:
    deployment = relay_workload(m)
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert config.metrics is not None, "relay.yaml has no metrics section"
    assert config.metrics.listen.host == "0.0.0.0", "metrics must listen beyond loopback"
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/path") == "/metrics"
    port = int(annotations["prometheus.io/port"])
    assert port == config.metrics.listen.port == container_port(deployment, "metrics")


def check_grace(m: Manifests, config: ServerConfig) -> None:
    spec = relay_workload(m)["spec"]["template"]["spec"]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    needed = prestop_sleep(relay_container(m)) + config.tunnel.drain_grace + CLOSE_MARGIN
    assert grace > needed, (
        f"terminationGracePeriodSeconds {grace} must exceed preStop + drain_grace + "
        f"{CLOSE_MARGIN} = {needed}"
    )


def check_cluster_env(m: Manifests, config: ServerConfig) -> None:
    """The per-pod overrides land where they must: node id = pod name, advertise URL = this
    pod's IP on the relay port (wss when the relay serves TLS), Redis URL = the Redis Service."""
    assert config.state.backend == "redis"
    assert config.cluster is not None
    assert config.cluster.node_id == SAMPLE_POD_NAME, f"node_id {config.cluster.node_id}"
    url = urlsplit(config.cluster.advertise_url)
    assert url.hostname == SAMPLE_POD_IP, f"advertise_url {config.cluster.advertise_url}"
    assert url.port == config.listen.port, f"advertise_url port {url.port}"
    assert url.scheme == ("wss" if config.tls is not None else "ws"), f"advertise_url {url.scheme}"
    assert config.state.redis_url is not None
    redis_url = urlsplit(config.state.redis_url)
    svc = m.one("Service", str(redis_url.hostname).split(".")[0])
    assert redis_url.port in [p["port"] for p in svc["spec"]["ports"]], "Redis port"
    assert m.selected(svc["spec"]["selector"]) == [m.one("StatefulSet", "redis")], "Redis"
    password = urlsplit(relay_env(m)["TUNNEL_REDIS_URL"]).password
    redis_env = container_env(m, container(m.one("StatefulSet", "redis"), "redis"))
    assert password == redis_env["REDIS_PASSWORD"], "relays and Redis use different passwords"


def check_files_mounted(m: Manifests, config: ServerConfig) -> None:
    """Every file relay.yaml names is mounted into the container from a ConfigMap or Secret
    the manifests define (or one of EXTERNAL_SECRETS, with a documented key)."""
    config_dir = PurePosixPath(config_path_of(image_command(m))).parent
    files = mounted_files(relay_workload(m), relay_container(m))
    named: list[Path] = []
    if config.tls is not None:
        named += [config.tls.cert_file, config.tls.key_file]
    if config.policy_file is not None:
        named.append(config.policy_file)
    if config.cluster is not None:
        named += [p for p in (config.cluster.secret_file, config.cluster.ca_file) if p]
    for path in named:
        full = config_dir / PurePosixPath(path)
        assert full in files, f"{path} (as {full}) is not mounted into the relay container"
    for source in files.files.values():
        if source.source_kind == "Secret" and source.source_name in EXTERNAL_SECRETS:
            assert source.key in EXTERNAL_SECRETS[source.source_name]
        elif source.source_kind == "Secret":
            secret_value(m, source.source_name, source.key)
        else:
            assert source.key in m.one("ConfigMap", source.source_name)["data"]


def check_security(m: Manifests, relay_uid: int) -> None:
    for w in m.workloads():
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp"
        assert pod.get("automountServiceAccountToken") is False, f"{name}: API token mounted"
        for ctr in containers(w):
            sc = ctr.get("securityContext", {})
            uid = sc.get("runAsUser", psc.get("runAsUser"))
            assert isinstance(uid, int), f"{name}: runAsUser {uid!r}"
            assert uid > 0, f"{name}: runAsUser {uid!r}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}: privilege escalation"
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}: writable root filesystem"
            assert sc.get("privileged", False) is False, f"{name}: privileged"
            caps = sc.get("capabilities", {})
            assert caps.get("drop") == ["ALL"], f"{name}: capabilities"
            assert not caps.get("add"), f"{name}: capabilities"
            assert "requests" in ctr.get("resources", {}), f"{name}: resources"
    relay_pod = relay_workload(m)["spec"]["template"]["spec"]
    uid = (
        relay_container(m)
        .get("securityContext", {})
        .get("runAsUser", relay_pod["securityContext"].get("runAsUser"))
    )
    assert uid == relay_uid, f"relay runs as {uid}, the image's USER is {relay_uid}"
    sa = relay_pod.get("serviceAccountName")
    assert sa in [s["metadata"]["name"] for s in m.all("ServiceAccount")], f"no ServiceAccount {sa}"


def check_availability(m: Manifests) -> None:
    deployment = relay_workload(m)
    labels = pod_labels(deployment)
    pdbs = m.all("PodDisruptionBudget")
    assert len(pdbs) == 1, "one PodDisruptionBudget for the relays"
    pdb = pdbs[0]
    selector = match_labels(pdb["spec"]["selector"])
    assert matches(selector, labels), "the PodDisruptionBudget does not select the relay pods"
    assert m.selected(selector) == [deployment], "the PodDisruptionBudget selects other pods"
    hpa = m.one("HorizontalPodAutoscaler", "relay")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    ), f"the HPA scales {ref}, not the relay Deployment"
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 3 <= low <= deployment["spec"]["replicas"] <= high
    assert [x["resource"]["name"] for x in hpa["spec"]["metrics"]] == ["cpu"]
    assert all("cpu" in ctr["resources"]["requests"] for ctr in containers(deployment)), (
        "CPU utilization needs CPU requests"
    )
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] == 1
    else:
        assert 1 <= pdb["spec"]["minAvailable"] < low, "the PDB would block every eviction"
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "a rollout must not drop below the replica count"


def check_network_policies(m: Manifests) -> None:
    relay = relay_workload(m)
    redis = m.one("StatefulSet", "redis")
    policies = {p["metadata"]["name"]: p for p in m.all("NetworkPolicy")}
    deny = policies["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {}
    assert deny["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny
    redis_policy = policies["redis"]["spec"]
    assert m.selected(match_labels(redis_policy["podSelector"])) == [redis]
    (rule,) = redis_policy["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "Redis admits pods of this namespace only"
    assert m.selected(match_labels(peer["podSelector"])) == [relay], "Redis admits the relays"
    assert [container_port(redis, p["port"]) for p in rule["ports"]] == [6379]
    relay_policy = policies["relay"]["spec"]
    assert m.selected(match_labels(relay_policy["podSelector"])) == [relay]
    ports = [container_port(relay, p["port"]) for r in relay_policy["ingress"] for p in r["ports"]]
    assert sorted(ports) == [8443, 9464], f"relay ingress ports {ports}"


CHECKS: dict[str, Callable[[Manifests, ServerConfig], None]] = {
    "namespaces": lambda m, c: check_namespaces(m),
    "workload_selectors": lambda m, c: check_workload_selectors(m),
    "services": lambda m, c: check_services(m),
    "relay_service_ports": check_relay_service_ports,
    "probes": check_probes,
    "metrics_scrape": check_metrics_scrape,
    "grace": check_grace,
    "cluster_env": check_cluster_env,
    "files_mounted": check_files_mounted,
    "security": lambda m, c: check_security(m, dockerfile_user()[0]),
    "availability": lambda m, c: check_availability(m),
    "network_policies": lambda m, c: check_network_policies(m),
}


def check_all(m: Manifests) -> None:
    config = relay_config(m)
    for check in CHECKS.values():
        check(m, config)


# ---- Dockerfile -------------------------------------------------------------------------------


def dockerfile_user() -> tuple[int, int]:
    final = dockerfile_stages(dockerfile_instructions(DOCKERFILE.read_text()))[-1]
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the final stage has no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), f"USER {users[-1]} must be numeric"
    assert not gid or gid.isdigit(), f"USER {users[-1]} must be numeric"
    return int(uid), int(gid or uid)


def test_dockerfile_runs_non_root_with_the_manifests_config_path() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    stages = dockerfile_stages(instructions)
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    base = dockerfile_args(instructions)
    for stage in stages:
        image = re.sub(
            r"\$\{?(\w+)\}?", lambda mm: base.get(mm.group(1), mm.group(0)), stage[0].args
        )
        assert image.split()[0].startswith("python:3.11-slim"), f"base image {image}"
    final = stages[-1]
    keywords = [i.keyword for i in final]
    assert "ENTRYPOINT" in keywords
    assert "USER" in keywords
    last_user = max(n for n, k in enumerate(keywords) if k == "USER")
    entrypoint = max(n for n, k in enumerate(keywords) if k == "ENTRYPOINT")
    assert last_user < entrypoint, "USER must be set before the ENTRYPOINT"
    assert not any(k in ("RUN", "COPY", "ADD") for k in keywords[last_user:]), (
        "nothing may run or be copied as the final user after USER"
    )
    uid, gid = dockerfile_user()
    assert min(uid, gid) >= 1000, f"USER {uid}:{gid} should be an unprivileged id"
    command = exec_form(final[entrypoint])
    assert config_path_of(command) == "/etc/tunnel/relay.yaml"
    exposed = {int(p.split("/")[0]) for i in final if i.keyword == "EXPOSE" for p in i.args.split()}
    config = relay_config(Manifests.load())
    assert config.metrics is not None
    assert {config.listen.port, config.metrics.listen.port} <= exposed
    build = " ".join(i.args for i in stages[0] if i.keyword == "RUN")
    assert re.search(r"pip install [^&]*\.\[uvloop\]", build), "install the package with uvloop"
    assert not any(i.keyword == "ADD" for i in instructions), "COPY, never ADD (no remote URLs)"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, closely enough for these paths: a path is left out when it or
    a parent directory matches; `**/` matches at any depth; the last matching line wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        pat = pattern.removeprefix("!").strip("/")
        if pat.startswith("**/"):
            tail = pat[3:]
            hit = any(fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], tail) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(p, pat) for p in prefixes)
        if hit:
            ignored = not pattern.startswith("!")
    return ignored


def test_dockerignore_keeps_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    dockerfiles = [DOCKERFILE, REPO / "deploy" / "compose" / "dev-idp.Dockerfile"]
    sources: list[str] = []
    for dockerfile in dockerfiles:
        for ins in dockerfile_instructions(dockerfile.read_text()):
            if ins.keyword == "COPY" and not ins.args.startswith("--from"):
                sources += ins.args.split()[:-1]
    assert sources
    for source in sources:
        path = source.rstrip("/")
        assert (REPO / path).exists(), f"COPY {source}: no such file in the repository"
        assert not _dockerignored(path, patterns), f"COPY {source} is excluded by .dockerignore"
    for secret_like in (".venv/bin/python", ".git/config", "deploy/dev-idp/node_modules/x"):
        assert _dockerignored(secret_like, patterns), f"{secret_like} reaches the build context"


# ---- Kubernetes -------------------------------------------------------------------------------


def _all_docs() -> list[tuple[str, Doc]]:
    return [
        (f"{name}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for name, docs in load_k8s().items()
        for doc in docs
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), _all_docs(), ids=[w for w, _ in _all_docs()])
def test_manifest_matches_the_kubernetes_schema(where: str, doc: Doc, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} (Kubernetes {version}): {exc.message} at {list(exc.path)}")


def test_schema_validation_rejects_an_unknown_field() -> None:
    pdb = copy.deepcopy(Manifests.load().one("PodDisruptionBudget", "relay"))
    pdb["spec"]["maxUnavailabel"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pdb, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    assert sorted(kustomization["resources"]) == sorted(load_k8s())


@pytest.mark.parametrize("name", list(CHECKS))
def test_cross_check(name: str) -> None:
    m = Manifests.load()
    CHECKS[name](m, relay_config(m))


def test_configmap_relay_config_is_valid_with_the_pod_environment(tmp_path: Path) -> None:
    """Like `tunnel-server check-config` in a pod: the ConfigMap and Secret files as the
    projected volume lays them out, the Deployment's environment, the real loader and the
    policy builder."""
    m = Manifests.load()
    config_path = PurePosixPath(config_path_of(image_command(m)))
    for path, source in mounted_files(relay_workload(m), relay_container(m)).files.items():
        target = tmp_path / path.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.source_kind == "ConfigMap":
            content = str(m.one("ConfigMap", source.source_name)["data"][source.key])
        elif source.source_name in EXTERNAL_SECRETS:
            content = f"(operator-provided {source.key})\n"
        else:
            content = secret_value(m, source.source_name, source.key)
        target.write_text(content)
    relay_yaml = tmp_path / config_path.relative_to("/")
    config = parse_config(
        read_yaml(relay_yaml), source=str(config_path), base_dir=relay_yaml.parent, env=relay_env(m)
    )
    build_policy(config)  # the policy file parses against this inventory
    assert config.cluster is not None
    assert config.cluster.secret_file is not None
    assert config.cluster.secret_file.exists()


def test_configmap_needs_the_per_pod_environment() -> None:
    """Without TUNNEL_ADVERTISE_URL a pod must refuse to start rather than advertise a wrong
    address (the ConfigMap deliberately has none)."""
    m = Manifests.load()
    env = relay_env(m)
    del env["TUNNEL_ADVERTISE_URL"]
    with pytest.raises(ConfigError, match="advertise_url"):
        relay_config(m, env)


def test_placeholder_cluster_secret_cannot_be_used(tmp_path: Path) -> None:
    """The shipped Secret's placeholder is refused by the relay: the example never runs with a
    publicly known cluster key."""
    m = Manifests.load()
    config = relay_config(m)
    assert config.cluster is not None
    placeholder = tmp_path / "cluster-secret"
    placeholder.write_text(secret_value(m, "relay-cluster", "cluster-secret"))
    cluster = config.cluster.model_copy(update={"secret_file": placeholder})
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        cluster.secret_bytes()


# ---- the cross-checks fail on broken manifests ------------------------------------------------


def _relay_ctr_path(rest: str) -> str:
    return f"spec.template.spec.containers.0.{rest}"


BREAKAGES: list[tuple[str, tuple[str, str], str, Any, str]] = [
    # (id, (kind, name), path, new value, message the checks must give)
    ("pdb-selector", ("PodDisruptionBudget", "relay"),
     "spec.selector.matchLabels.app\\.kubernetes\\.io/component", "relays", "PodDisruptionBudget"),
    ("service-selector", ("Service", "relay"), "spec.selector", {"app": "relay"}, "Service relay"),
    ("service-target-port", ("Service", "relay"), "spec.ports.0.targetPort", "metrics", "targets"),
    ("hpa-target", ("HorizontalPodAutoscaler", "relay"), "spec.scaleTargetRef.name", "relays",
     "HPA scales"),
    ("readiness-port", RELAY, _relay_ctr_path("readinessProbe.httpGet.port"), "metrics",
     "readinessProbe port"),
    ("readiness-path", RELAY, _relay_ctr_path("readinessProbe.httpGet.path"), "/healthz",
     "readinessProbe path"),
    ("probe-scheme", RELAY, _relay_ctr_path("livenessProbe.httpGet.scheme"), "HTTP",
     "livenessProbe scheme"),
    ("short-grace", RELAY, "spec.template.spec.terminationGracePeriodSeconds", 35,
     "terminationGracePeriodSeconds"),
    ("root", RELAY, "spec.template.spec.securityContext.runAsUser", 0, "runAsUser"),
    ("writable-root", RELAY, _relay_ctr_path("securityContext.readOnlyRootFilesystem"), False,
     "writable root"),
    ("config-mount", RELAY, _relay_ctr_path("volumeMounts.0.mountPath"), "/etc/relay",
     "not mounted"),
    ("node-id", RELAY, _relay_ctr_path("env.2.value"), "relay", "node_id"),
    ("advertise-port", RELAY, _relay_ctr_path("env.3.value"), "wss://$(POD_IP):443",
     "advertise"),
    ("redis-host", RELAY, _relay_ctr_path("env.5.value"), "redis://:$(REDIS_PASSWORD)@cache:6379/0",
     "Service 'cache'"),
    ("redis-netpol", ("NetworkPolicy", "redis"),
     "spec.ingress.0.from.0.podSelector.matchLabels.app\\.kubernetes\\.io/component", "redis",
     "admits the relays"),
    ("secret-key", RELAY, "spec.template.spec.volumes.0.projected.sources.2.secret.items.0.key",
     "cluster-key", "no key"),
]  # fmt: skip


def _apply(m: Manifests, target: tuple[str, str], path: str, value: Any) -> None:
    doc = m.one(*target)
    # a label key holds dots: "\\." in the path is a literal dot
    parts = [p.replace("\0", ".") for p in path.replace("\\.", "\0").split(".")]
    node: Any = doc
    for key in parts[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


@pytest.mark.parametrize(
    ("target", "path", "value", "message"),
    [b[1:] for b in BREAKAGES],
    ids=[b[0] for b in BREAKAGES],
)
def test_cross_checks_catch(target: tuple[str, str], path: str, value: Any, message: str) -> None:
    m = Manifests.load()
    check_all(m)  # the shipped manifests pass...
    _apply(m, target, path, value)
    with pytest.raises((AssertionError, ConfigError, KeyError), match=re.escape(message)):
        check_all(m)  # ...and this one change fails them
