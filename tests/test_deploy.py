"""deploy/: Prometheus config and rules pass promtool; every metric they use exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service import metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
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
    rules = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus/rules.yml")],
                           capture_output=True, text=True, timeout=30, check=False)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The config names the rules by their in-container path; check it beside a copy.
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    shutil.copy(DEPLOY / "prometheus/rules.yml", tmp_path / "rules.yml")
    config["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                             capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rules_and_dashboard_use_only_metrics_that_exist() -> None:
    known = _our_metric_names()
    texts = [(DEPLOY / "prometheus/rules.yml").read_text(),
             json.dumps(json.loads((DEPLOY / "grafana/dashboards/gradcam.json").read_text()))]
    used = {name for text in texts for name in re.findall(r"\bgradcam_[a-z_]+", text)}
    assert used, "nothing found to check"
    assert used <= known, used - known


def test_compose_and_kubernetes_files_parse() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"gradcam", "prometheus", "grafana"}
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes/gradcam.yaml").read_text()))
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
    from service.settings import Settings

    assert Settings().auth_exempt == "/healthz,/readyz"
