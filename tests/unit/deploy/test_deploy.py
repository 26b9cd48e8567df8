"""deploy/: Prometheus config and rules pass promtool; every metric they use exists; the
Kubernetes manifests and compose files validate; the compose profile "pacs" (Orthanc,
OHIF, the service) is wired together (OHIF's nginx configuration, run in nginx:
tests/process/deploy/test_ohif_nginx.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service import metrics
from tests.helpers import REPO, missing_tool
from tests.unit.deploy.test_orthanc_recipe import substituted

DEPLOY = REPO / "deploy"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing_tool("promtool", "prometheus")
    return found


def _our_metric_names() -> set[str]:
    names = set()
    for value in vars(metrics).values():
        describe = getattr(value, "describe", None)
        if callable(describe) and hasattr(value, "_name"):
            base = value._name
            names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return names


def test_prometheus_rules_and_config_pass_promtool(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus/rules.yml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The config names the rules by their in-container path; check it beside a copy.
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    shutil.copy(DEPLOY / "prometheus/rules.yml", tmp_path / "rules.yml")
    config["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rules_and_dashboard_use_only_metrics_that_exist() -> None:
    known = _our_metric_names()
    texts = [
        (DEPLOY / "prometheus/rules.yml").read_text(),
        json.dumps(json.loads((DEPLOY / "grafana/dashboards/gradcam.json").read_text())),
    ]
    used = {name for text in texts for name in re.findall(r"\bgradcam_[a-z_]+", text)}
    assert used, "nothing found to check"
    assert used <= known, used - known


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool = _promtool()
    tested = subprocess.run(
        [promtool, "test", "rules", "rules_test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    tests = yaml.safe_load((DEPLOY / "prometheus/rules_test.yml").read_text())["tests"]
    alerted = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert {
        "GradcamServerErrors",
        "GradcamSlowExplanations",
        "GradcamQueueBacklog",
        "GradcamNoReadyReplicas",
    } <= alerted


# The Kubernetes version the manifests are validated against (kubernetes-validate).
KUBERNETES = "1.30.0"


def test_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    manifests = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES,
            *map(str, manifests),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    # Every resource passed, but the ServiceMonitor, a CRD without a schema there.
    assert output.count("passed for resource") == 5, output
    assert "kind ServiceMonitor" in output


def _documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()))


def test_every_deployment_has_a_memory_limit_the_budget_takes_from() -> None:
    """The memory budget defaults to 90 % of the cgroup limit: each container has one,
    and none sets a budget above it."""
    for name in ("gradcam.yaml", "gradcam-gpu.yaml"):
        deployment = next(d for d in _documents(name) if d["kind"] == "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        limit = container["resources"]["limits"]["memory"]
        assert limit.endswith("Gi"), limit
        env = {item["name"]: item.get("value") for item in container["env"]}
        budget = env.get("GRADCAM_MEMORY_BUDGET_MB")
        assert budget is None or int(budget) <= 0.9 * int(limit[:-2]) * 1024


def test_gpu_deployment_takes_one_gpu_per_pod_with_one_engine() -> None:
    [gpu] = _documents("gradcam-gpu.yaml")
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["GRADCAM_DEVICE"] == "cuda" and env["GRADCAM_ENGINES"] == "1"
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts == {"tokens", "models", "weights"}
    assert env["GRADCAM_MODELS_FILE"].startswith("/etc/gradcam/models/")


def test_scaling_fits_the_deployments_and_the_service() -> None:
    hpa, pdb, monitor = _documents("scaling.yaml")
    deployment, service = _documents("gradcam.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in _our_metric_names()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 2 * 30 + 5  # both drains (GRADCAM_SHUTDOWN_TIMEOUT_S) and the preStop
    for name in ("gradcam.yaml", "gradcam-gpu.yaml"):
        image = _documents(name)[0]["spec"]["template"]["spec"]["containers"][0]["image"]
        assert not image.endswith(":latest") and ":" in image, image


def test_compose_and_kubernetes_files_parse() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    by_profile = {
        name: tuple(service.get("profiles", ())) for name, service in compose["services"].items()
    }
    assert by_profile == {
        "gradcam": (),
        "prometheus": (),
        "grafana": (),
        "orthanc": ("pacs",),
        "ohif": ("pacs",),
    }
    for service in compose["services"].values():
        assert ":" in service["image"] and not service["image"].endswith(":latest")
    documents = _documents("gradcam.yaml")
    kinds = [d["kind"] for d in documents]
    assert kinds == ["Deployment", "Service"]
    container = documents[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["lifecycle"]["preStop"]
    # Authentication on, with probes that need no token; metrics on their own port.
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["GRADCAM_AUTH_TOKENS_FILE"].startswith("/etc/gradcam/tokens/")
    assert env.get("GRADCAM_AUTH_EXEMPT") is None  # the default exempts exactly the probes
    assert env["GRADCAM_METRICS_PORT"] == "9100"
    assert "GRADCAM_AUTH_TOKENS" in compose["services"]["gradcam"]["environment"]
    from service.contract.settings import Settings

    assert Settings().auth_exempt == "/healthz,/readyz,/v2/health/live,/v2/health/ready"


def test_the_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    linted = subprocess.run(
        [hadolint, str(DEPLOY.parent / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def _compose() -> list[str]:
    """Docker Compose v2 (``docker compose``) if the docker CLI has it, else Debian's
    ``docker-compose``; both check a file against the Compose specification."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    found = shutil.which("docker-compose")
    if found:
        return [found]
    missing_tool("docker compose", "docker-compose")


def _compose_config(
    *files: str, env: dict[str, str], profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    command = [*_compose(), "--project-directory", str(DEPLOY)]
    for name in files:
        command += ["-f", str(DEPLOY / name)]
    for profile in profiles:
        command += ["--profile", profile]
    # HOME: compose reads the user's docker config; keep the test's own.
    return subprocess.run(
        [*command, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ["PATH"], "HOME": "/tmp", **env},
    )


@pytest.mark.slow  # docker-compose config, several times
def test_compose_files_pass_docker_compose_config() -> None:
    token = {"GRADCAM_AUTH_TOKENS": "compose-test-token-0123456789"}
    base = _compose_config("docker-compose.yml", env=token)
    assert base.returncode == 0, base.stderr
    resolved = yaml.safe_load(base.stdout)["services"]
    assert resolved["gradcam"]["environment"]["GRADCAM_AUTH_TOKENS"] == token["GRADCAM_AUTH_TOKENS"]
    # A memory limit, which the service's memory budget takes 90 % of.
    # (Compose v2 resolves it to bytes, docker-compose 1.x keeps "4g".)
    assert str(resolved["gradcam"]["mem_limit"]) in ("4g", str(4 * 2**30))
    # Prometheus and Grafana get their files from deploy/, and those files exist.
    for service in ("prometheus", "grafana"):
        for volume in resolved[service]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            assert Path(source).exists(), (service, source)
    gpu = _compose_config("docker-compose.yml", "docker-compose.gpu.yml", env=token)
    assert gpu.returncode == 0, gpu.stderr
    service = yaml.safe_load(gpu.stdout)["services"]["gradcam"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1
    assert service["environment"]["GRADCAM_DEVICE"] == "cuda"
    assert service["environment"]["GRADCAM_METRICS_PORT"] == "9100"  # the base file's, kept
    # Without a token the file refuses to start, with its message.
    refused = _compose_config("docker-compose.yml", env={})
    assert refused.returncode != 0 and "set GRADCAM_AUTH_TOKENS" in refused.stderr


def _published(service: dict) -> dict[int, str]:
    """A resolved service's ports: container port → the host address and port."""
    found = {}
    for port in service["ports"]:
        if isinstance(port, dict):  # Compose v2
            found[int(port["target"])] = f"{port.get('host_ip', '')}:{port['published']}"
        else:  # docker-compose 1.x: "127.0.0.1:3001:8080/tcp"
            host, published, target = port.split("/")[0].rsplit(":", 2)
            found[int(target)] = f"{host}:{published}"
    return found


@pytest.mark.slow  # docker-compose config, twice
def test_the_pacs_profile_wires_orthanc_ohif_and_the_service() -> None:
    """``--profile pacs``: Orthanc runs the recipe (deploy/orthanc/) and calls the service
    with its token; the service may read and store on that Orthanc; OHIF's nginx reads
    it at /dicom-web; the files mounted exist; the OHIF image is deploy/ohif/VERSION's."""
    token = "compose-test-token-0123456789"
    resolved = _compose_config(
        "docker-compose.yml", env={"GRADCAM_AUTH_TOKENS": token}, profiles=("pacs",)
    )
    assert resolved.returncode == 0, resolved.stderr
    services = yaml.safe_load(resolved.stdout)["services"]
    assert {"gradcam", "orthanc", "ohif"} <= set(services)
    mounts = {}
    for name in ("orthanc", "ohif"):
        for volume in services[name]["volumes"]:
            if isinstance(volume, str):
                volume = dict(zip(("source", "target"), volume.split(":")[:2], strict=True))
            mounts[volume["target"]] = volume["source"]
            if volume["source"].startswith("/"):  # a file of deploy/, not a named volume
                assert Path(volume["source"]).exists(), (name, volume)
    orthanc, ohif, service = services["orthanc"], services["ohif"], services["gradcam"]
    assert orthanc["image"].startswith("orthancteam/orthanc:")
    assert ohif["image"] == "ohif/app:v" + (DEPLOY / "ohif/VERSION").read_text().strip()
    # Orthanc's configuration as it starts there: the recipe, with the compose environment.
    env = orthanc["environment"]
    config = json.loads(substituted((DEPLOY / "orthanc/orthanc.json").read_text(), env))
    assert Path(mounts["/etc/orthanc/orthanc.json"]).name == "orthanc.json"
    assert Path(mounts[config["PythonScript"]]).name == "gradcam_router.py"
    assert mounts[config["StorageDirectory"]] == "orthanc-db"
    assert config["RemoteAccessAllowed"] is True and config["StableAge"] == 10
    router = config["GradcamRouter"]
    assert router["ServiceUrl"] == "http://gradcam:8000" and router["ServiceToken"] == token
    assert router["Report"] == "dicom-sr" and router["Format"] == "dicom-sc"
    # The service may use the DICOMweb root the router gives it, and nothing else.
    assert service["environment"]["GRADCAM_DICOMWEB_SERVERS"] == router["DicomWebUrl"]
    assert router["DicomWebUrl"] == f"http://orthanc:{config['HttpPort']}/dicom-web"
    # On this host's loopback only (no authentication on Orthanc or OHIF).
    assert _published(orthanc) == {8042: "127.0.0.1:8042", 4242: "127.0.0.1:4242"}
    assert config["HttpPort"] == 8042 and config["DicomPort"] == 4242
    nginx = (DEPLOY / "ohif/nginx.conf").read_text()
    assert _published(ohif) == {8080: "127.0.0.1:3001"} and "listen 8080;" in nginx
    assert f"set $orthanc http://orthanc:{config['HttpPort']};" in nginx
    # nginx's entrypoint makes its configuration from the template, with the names it
    # serves (and nothing else of the environment) put in.
    assert ohif["entrypoint"] == ["/docker-entrypoint.sh"] and ohif["command"][0] == "nginx"
    assert mounts["/etc/nginx/templates/default.conf.template"].endswith("deploy/ohif/nginx.conf")
    assert ohif["environment"]["OHIF_SERVER_NAMES"] == "127.0.0.1 localhost"
    assert ohif["environment"]["NGINX_ENVSUBST_FILTER"] == "^OHIF_"
    assert set(re.findall(r"\$\{(\w+)\}", nginx)) == {"OHIF_SERVER_NAMES"}
    assert mounts["/usr/share/nginx/html/app-config.js"].endswith("deploy/ohif/app-config.js")
    app_config = (DEPLOY / "ohif/app-config.js").read_text()
    assert "qidoRoot: '/dicom-web'" in app_config and "wadoRoot: '/dicom-web'" in app_config
    # Without the profile, neither starts.
    plain = _compose_config("docker-compose.yml", env={"GRADCAM_AUTH_TOKENS": token})
    assert plain.returncode == 0, plain.stderr
