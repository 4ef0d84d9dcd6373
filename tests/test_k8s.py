"""The Kubernetes manifests agree with the service they deploy: probe paths, metric names, grace periods."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from service import metrics
from service.settings import Settings

K8S = Path(__file__).resolve().parents[1] / "k8s"


def docs() -> dict[str, dict]:
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            out[d["kind"]] = d
    return out


def test_every_manifest_parses_and_kustomization_lists_them():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_probes_use_the_service_routes_and_grace_covers_the_drain():
    pod = docs()["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert set(env) <= {f"VITSERVE_{k.upper()}" for k in Settings.model_fields}
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["VITSERVE_GRACE_PERIOD_S"])


def test_autoscaling_metrics_exist_in_the_service():
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}
    rules = yaml.safe_load(docs()["ConfigMap"]["data"]["config.yaml"])["rules"]
    for rule in rules:
        source = re.match(r"(\w+)", rule["seriesQuery"]).group(1)
        assert source.removesuffix("_bucket") in exported, source
    hpa_metrics = {m["pods"]["metric"]["name"] for m in docs()["HorizontalPodAutoscaler"]["spec"]["metrics"]}
    assert hpa_metrics <= {r["name"]["as"] for r in rules}
