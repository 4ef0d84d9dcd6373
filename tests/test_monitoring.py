"""What operators get beside /metrics: the alert rules and the Grafana dashboard. Every PromQL expression in both is
parsed by Prometheus' own `promtool` (Debian's prometheus package), and every vitserve_* series they read is one a
real `vitserve serve` exposes, with the suffix its type gives it (a misspelt name or a counter read without _total
fails here, where Prometheus itself would silently return nothing)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.server import ROOT, running_server

MONITORING = ROOT / "k8s" / "components" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian's prometheus package; make test installs it)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def alert_rules() -> list[dict]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def dashboard_expressions() -> dict[str, str]:
    """Panel title + legend → expression, with Grafana's variables as Prometheus would receive them."""
    dashboard = json.loads((MONITORING / "vitserve-dashboard.json").read_text())
    out = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$namespace", "default")
            out[f"{panel['title']} / {target['legendFormat']}"] = expr
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(metric, label) is Grafana's, not PromQL: its metric is checked
            out[f"variable {variable['name']}"] = re.match(r"label_values\((\w+),", variable["definition"]).group(1)
    return out


def promtool_check(expressions: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`promtool check rules` on the expressions as recording rules: Prometheus' own parser."""
    rules = {"groups": [{"name": "check", "rules": [
        {"record": f"check:expression_{i}", "expr": expr} for i, expr in enumerate(expressions.values())]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def exposed_types(metrics_text: str) -> dict[str, str]:
    """Metric family → type from an exposition's TYPE lines (a counter's family is named without _total)."""
    return {re.sub(r"_total$", "", name) if kind == "counter" else name: kind
            for name, kind in re.findall(r"^# TYPE (vitserve_\w+) (\w+)$", metrics_text, re.M)}


def declared_types() -> dict[str, str]:
    """Every vitserve_* family service/metrics.py declares. A labelled counter appears in /metrics only once one of
    its series has a sample (engine failures, say), so those are checked against the declaration."""
    from service import metrics

    return {m._name: m._type for m in vars(metrics).values() if hasattr(m, "_name") and m._name.startswith("vitserve_")}


def unknown_series(expression: str, types: dict[str, str]) -> list[str]:
    """The vitserve_* series in ``expression`` that the exposition does not have (name and type's suffix)."""
    missing = []
    for series in set(re.findall(r"\bvitserve_\w+", expression)):
        ok = any(series == base + suffix for base, kind in types.items() for suffix in SUFFIXES.get(kind, ("",)))
        if not ok:
            missing.append(series)
    return missing


@pytest.fixture(scope="module")
def metrics_types(tiny_artifact, tmp_path_factory, photo_bytes) -> dict[str, str]:
    with running_server(tiny_artifact, tmp_path_factory.mktemp("monitoring")) as server:
        r = httpx.post(f"{server.url}/classify", files={"images": photo_bytes[0]}, timeout=60)
        assert r.status_code == 200, r.text
        bad = httpx.post(f"{server.url}/classify", files={"images": ("x.jpg", b"not an image", "image/jpeg")}, timeout=60)
        assert bad.status_code == 415, bad.text
        exposed = exposed_types(server.metrics())
    declared = declared_types()
    assert exposed.items() <= declared.items()  # the declarations are what the server exposes
    # What this server exposed after one answer and one refusal: every family but those that need a failure to appear.
    assert set(declared) - set(exposed) <= {"vitserve_engine_failures", "vitserve_slow_clients", "vitserve_admissions"}, \
        set(declared) - set(exposed)
    return declared


@needs_promtool
def test_promtool_parses_every_alert_and_dashboard_expression(tmp_path):
    expressions = {rule["alert"]: rule["expr"] for rule in alert_rules()} | dashboard_expressions()
    assert len(expressions) >= 20
    result = promtool_check(expressions, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout, result.stdout


@needs_promtool
def test_promtool_refuses_a_broken_expression(tmp_path):
    result = promtool_check({"broken": "sum by (le (rate(vitserve_requests_total[5m]))"}, tmp_path)
    assert result.returncode != 0 and "parse error" in (result.stdout + result.stderr).lower()


def test_every_series_the_dashboard_and_alerts_read_is_exposed_by_a_real_server(metrics_types):
    assert {"vitserve_request_duration_seconds": "histogram", "vitserve_requests": "counter"}.items() <= metrics_types.items()
    expressions = {rule["alert"]: rule["expr"] for rule in alert_rules()} | dashboard_expressions()
    missing = {name: unknown_series(expr, metrics_types) for name, expr in expressions.items()}
    assert {k: v for k, v in missing.items() if v} == {}


def test_a_misspelt_or_mis_suffixed_series_is_caught(metrics_types):
    assert unknown_series("rate(vitserve_request_duration_second_bucket[5m])", metrics_types) == ["vitserve_request_duration_second_bucket"]
    assert unknown_series("rate(vitserve_requests[5m])", metrics_types) == ["vitserve_requests"]  # a counter needs _total
    assert unknown_series("rate(vitserve_requests_total[5m])", metrics_types) == []


def test_the_dashboard_ships_as_a_configmap_grafana_loads():
    rendered = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / "gpu")], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    maps = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "vitserve-grafana-dashboard"]
    assert len(maps) == 1 and maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(maps[0]["data"]["vitserve-dashboard.json"]) == json.loads((MONITORING / "vitserve-dashboard.json").read_text())
