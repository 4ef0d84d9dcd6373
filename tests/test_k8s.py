"""The Kubernetes manifests render, validate, and agree with the service they deploy.

Every overlay is rendered by `kubectl kustomize` (skipped with a reason where kubectl is absent). Built-in kinds are
validated by kubernetes-validate in strict mode; the custom resources (KEDA ScaledObject, Prometheus Operator
ServiceMonitor and PrometheusRule), which it has no schema for, are checked field by field against the field lists
of their projects' own CRD files (tests/data/crd_fields.json). Then the cross-checks: probes, ports, settings,
metric names, grace periods, the hardened pod, and the image the overlays name.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from service import metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRD_FIELDS = json.loads((Path(__file__).parent / "data" / "crd_fields.json").read_text())
OVERLAYS = ["cpu", "gpu", "gpu-hpa", "cpu-scale-to-zero"]
EXPORTED_METRICS = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")


@cache
def render(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def kind(overlay: str, name: str) -> dict:
    [doc] = [d for d in render(overlay) if d["kind"] == name]
    return doc


def container(overlay: str) -> dict:
    return kind(overlay, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(overlay: str) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(overlay)["env"]}


def metric_names(promql: str) -> set[str]:
    """The vitserve_* metrics a PromQL expression reads (series names without their histogram/counter suffixes)."""
    return {re.sub(r"_(bucket|sum|count|total)$", "", m) for m in re.findall(r"\bvitserve_\w+", promql)}


# ---- rendering and schemas -----------------------------------------------------------------------------------------
@needs_kubectl
def test_the_default_kustomization_is_the_gpu_overlay():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [d for d in yaml.safe_load_all(out.stdout) if d] == list(render("gpu"))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_pass_strict_validation(overlay):
    import kubernetes_validate

    builtin = [d for d in render(overlay) if d["kind"] not in CRD_FIELDS["kinds"]]  # the rest: the next test
    assert {d["kind"] for d in builtin} >= {"Deployment", "Service", "PodDisruptionBudget"}
    for doc in builtin:
        # Raises ValidationError naming the field on any unknown or mistyped property.
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _check_fields(value, allowed, path: str) -> list[str]:
    """Every key of ``value`` appears in ``allowed`` (a tree of field names; "*" admits any key: a map)."""
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _check_fields(item, allowed, f"{path}[{i}]")]
    if not isinstance(value, dict) or allowed.get("*"):
        return []
    bad = []
    for key, sub in value.items():
        if key not in allowed:
            bad.append(f"{path}.{key}")
        elif allowed[key]:
            bad += _check_fields(sub, allowed[key], f"{path}.{key}")
    return bad


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_use_only_fields_their_crds_define(overlay):
    custom = [d for d in render(overlay) if d["kind"] in CRD_FIELDS["kinds"]]
    assert {"ServiceMonitor", "PrometheusRule"} <= {d["kind"] for d in custom}
    for doc in custom:
        crd = CRD_FIELDS["kinds"][doc["kind"]]
        assert doc["apiVersion"] == crd["apiVersion"]
        assert _check_fields(doc["spec"], crd["spec"], f"{doc['kind']}.spec") == []
        for trigger in doc["spec"].get("triggers", []):
            assert trigger["type"] == "prometheus"
            assert set(trigger["metadata"]) <= set(CRD_FIELDS["keda_prometheus_trigger_metadata"]), trigger["metadata"]


def test_the_field_check_catches_a_misspelt_field():
    crd = CRD_FIELDS["kinds"]["ScaledObject"]["spec"]
    assert _check_fields({"minReplicaCount": 1, "triggers": [{"type": "x", "metadta": {}}]}, crd, "s") == ["s.triggers[0].metadta"]


# ---- the pod ------------------------------------------------------------------------------------------------------
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_hardened_as_the_bentoml_images_user(overlay):
    from bentoml._internal.container.generate import BENTO_UID_GID  # the UID `bentoml build`'s Dockerfile creates

    pod = kind(overlay, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == BENTO_UID_GID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(overlay)["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    # Every path the service writes is an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container(overlay)["volumeMounts"]}
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    env = env_of(overlay)
    for var in ("BENTOML_HOME", "TMPDIR", "HOME"):
        assert any(env[var] == p or env[var].startswith(p + "/") for p, name in mounts.items() if name in empty_dirs), var


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_settings_match_the_service(overlay):
    c = container(overlay)
    pod = kind(overlay, "Deployment")["spec"]["template"]["spec"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    env = env_of(overlay)
    settings = {f"VITSERVE_{k.upper()}" for k in Settings.model_fields}
    assert {k for k in env if k.startswith("VITSERVE_")} <= settings
    Settings(**{k.removeprefix("VITSERVE_").lower(): v for k, v in env.items() if k.startswith("VITSERVE_")})  # valid values
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 3000, "grpc": int(env["VITSERVE_GRPC_PORT"])}
    service_ports = {p["name"]: p["targetPort"] for p in kind(overlay, "Service")["spec"]["ports"]}
    assert service_ports == {"http": "http", "grpc": "grpc"}
    # kubelet's SIGKILL never cuts a drain short: preStop, then the service's own grace period, must fit.
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["VITSERVE_GRACE_PERIOD_S"])


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdb_and_spread_select_the_deployments_pods(overlay):
    labels = kind(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert kind(overlay, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spread = kind(overlay, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(s["labelSelector"]["matchLabels"].items() <= labels.items() for s in spread)


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu", "gpu-hpa"])
def test_gpu_overlay_places_one_gpu_pod_on_gpu_nodes(overlay):
    pod = kind(overlay, "Deployment")["spec"]["template"]["spec"]
    c = container(overlay)
    assert c["image"] == "vitserve:gpu"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    probe = c["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 300  # loading, checking and warming ViT-L


@needs_kubectl
@pytest.mark.parametrize("overlay", ["cpu", "cpu-scale-to-zero"])
def test_cpu_overlay_requests_the_cores_the_cpu_budget_plans_for(overlay):
    c = container(overlay)
    assert c["image"] == "vitserve:cpu"
    r = c["resources"]
    assert r["requests"]["cpu"] == r["limits"]["cpu"] == env_of(overlay)["VITSERVE_CPU_CORES"]  # Guaranteed QoS
    assert "nvidia.com/gpu" not in r["limits"]


def test_readme_builds_the_images_the_overlays_name():
    readme = (ROOT / "docs" / "deploying.md").read_text()  # the README's long form: docs/deploying.md, "Images"
    assert "bentoml build -f bentofile.gpu.yaml" in readme
    assert "bentoml containerize vitserve-gpu:latest -t vitserve:gpu" in readme
    assert "bentoml containerize vitserve:latest -t vitserve:cpu" in readme
    assert yaml.safe_load((ROOT / "bentofile.gpu.yaml").read_text())["name"] == "vitserve-gpu"
    assert yaml.safe_load((ROOT / "bentofile.yaml").read_text())["name"] == "vitserve"


# ---- autoscaling --------------------------------------------------------------------------------------------------
@needs_kubectl
@pytest.mark.parametrize("overlay", ["cpu", "gpu", "cpu-scale-to-zero"])
def test_keda_scales_the_deployment_on_metrics_the_service_exports(overlay):
    so = kind(overlay, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == kind(overlay, "Deployment")["metadata"]["name"]
    read = set().union(*(metric_names(t["metadata"]["query"]) for t in so["spec"]["triggers"]))
    assert read == {"vitserve_queue_depth", "vitserve_queue_wait_duration_seconds", "vitserve_batch_inference_duration_seconds"}
    assert read <= EXPORTED_METRICS
    assert (so["spec"]["minReplicaCount"] == 0) == (overlay == "cpu-scale-to-zero")


@needs_kubectl
def test_hpa_reads_the_adapters_rules_with_kedas_thresholds():
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    rules = adapter["rules"]["custom"]
    for rule in rules:
        assert metric_names(rule["seriesQuery"]) | metric_names(rule["metricsQuery"]) <= EXPORTED_METRICS
    hpa = kind("gpu-hpa", "HorizontalPodAutoscaler")
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"]}
    assert set(targets) <= {r["name"]["as"] for r in rules}
    keda = {t["name"]: float(t["metadata"]["threshold"]) for t in kind("gpu", "ScaledObject")["spec"]["triggers"]}
    quantity = {k: float(v[:-1]) / 1000 if v.endswith("m") else float(v) for k, v in targets.items()}
    assert quantity == {"vitserve_queue_depth": keda["queue-depth"], "vitserve_queue_wait_p90_seconds": keda["queue-wait-p90"],
                        "vitserve_engine_busy": keda["engine-busy"]}
    assert hpa["spec"]["behavior"] == kind("gpu", "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]


@needs_kubectl
def test_alerts_read_metrics_the_service_exports():
    rules = [r for g in kind("gpu", "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == {"VitserveHighP99Latency", "VitserveRefusingRequests", "VitserveNotReady",
                                          "VitserveEngineFailing"}
    for rule in rules:
        assert metric_names(rule["expr"]) and metric_names(rule["expr"]) <= EXPORTED_METRICS, rule["expr"]


# ---- the hardened pod, run for real --------------------------------------------------------------------------------
def _can_build_the_pods_sandbox() -> str | None:
    """Why tests/hardened_serve.sh cannot run here, or None."""
    import os

    if os.geteuid() != 0:
        return "setting up the read-only mounts and dropping to UID 1034 needs root"
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"mount namespaces are not allowed here: {probe.stderr.strip()}"


@pytest.mark.timeout(300)
def test_vitserve_serves_as_the_hardened_pod_runs(tmp_path, photo_bytes):
    """UID 1034 with no capabilities or new privileges, root filesystem and project read-only, only the pod's
    emptyDirs (BENTOML_HOME with HOME inside, /tmp) writable: the demo artifact still loads, checks, warms and serves."""
    import os
    import tempfile

    import httpx

    from benchmarks.harness.servers import free_port, running

    why = _can_build_the_pods_sandbox()
    if why:
        pytest.skip(why)
    home = Path(tempfile.mkdtemp(prefix="vitserve-bentoml-home-", dir="/var/tmp"))  # not under /tmp: a fresh /tmp hides it
    port, grpc_port = free_port(), free_port()
    cmd = ["bash", str(ROOT / "tests" / "hardened_serve.sh"), str(home), "--artifact", "service/demo_artifact",
           "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VITSERVE_GRPC_PORT": str(grpc_port), "VITSERVE_DECODE_THREADS": "2", "BENTOML_DO_NOT_TRACK": "True"}
    try:
        with running("hardened", cmd, env, tmp_path, port, ready_timeout=180) as server:
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines() if ":\t" in line)
            assert status["Uid"].split()[:2] == ["1034", "1034"]
            assert status["NoNewPrivs"].strip() == "1" and int(status["CapEff"], 16) == 0
            name, data = photo_bytes[0]
            r = httpx.post(f"{server.url}/classify", files=[("images", (name, data))], timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["top1"]["label"]
            assert "vitserve_requests_total" in httpx.get(f"{server.url}/metrics", timeout=10).text
        # What it wrote went to the BentoML-home emptyDir, owned by the pod's user.
        assert any(p.stat().st_uid == 1034 for p in home.rglob("*"))
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ---- batch prediction: an Indexed Job and its merge -----------------------------------------------------------------
JOBS = ["predict", "predict-gpu", "predict-merge"]


@cache
def render_job(name: str) -> dict:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "jobs" / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    [job] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return job


@needs_kubectl
@pytest.mark.parametrize("name", JOBS)
def test_batch_jobs_pass_strict_validation_and_run_the_hardened_pod(name):
    import kubernetes_validate
    from bentoml._internal.container.generate import BENTO_UID_GID

    job = render_job(name)
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    pod = job["spec"]["template"]["spec"]
    serving = kind("cpu", "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == serving["securityContext"] and pod["securityContext"]["runAsUser"] == BENTO_UID_GID
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    [c] = pod["containers"]
    assert c["securityContext"] == container("cpu")["securityContext"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["TMPDIR"] == "/tmp" and env["HOME"].startswith("/tmp/")  # the only writable paths: volumes
    assert 'python vitserve.py predict "$IMAGES" --output "$OUTPUT"' in c["command"][-1]
    assert env["IMAGES"] == "/data/images" and env["OUTPUT"] == "/data/predictions/preds.csv"  # or s3://... URLs
    assert mounts["/data/images"] == "images" and [m for m in c["volumeMounts"] if m["name"] == "images"][0]["readOnly"]
    assert c["envFrom"] == [{"secretRef": {"name": "vitserve-storage", "optional": True}}]  # bucket credentials, if any


@needs_kubectl
def test_the_indexed_job_and_the_merge_agree_on_the_number_of_shards():
    job, merge = render_job("predict"), render_job("predict-merge")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["backoffLimitPerIndex"] >= 1
    [c] = spec["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert int(env["JOB_COMPLETIONS"]) == spec["completions"]  # Kubernetes passes only JOB_COMPLETION_INDEX
    assert f"--merge-shards {spec['completions']}" in merge["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "--resume" in c["command"][-1]  # a replaced pod continues its part
    assert any(r["action"] == "FailJob" and r["onExitCodes"]["values"] == [2] for r in spec["podFailurePolicy"]["rules"])


@needs_kubectl
def test_the_gpu_job_places_one_gpu_pod_on_gpu_nodes():
    pod = render_job("predict-gpu")["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"] == "vitserve:gpu" and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def render_all(name: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "jobs" / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@needs_kubectl
def test_the_multi_node_finetune_job_finds_its_rendezvous_and_runs_the_hardened_pod():
    import kubernetes_validate

    docs = render_all("finetune")
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    [job] = [d for d in docs if d["kind"] == "Job"]
    [service] = [d for d in docs if d["kind"] == "Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    [c] = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    script = " ".join(c["command"])
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] == int(env["NNODES"])
    assert int(env["GPUS_PER_NODE"]) == c["resources"]["limits"]["nvidia.com/gpu"]
    # Index 0's stable name, through the headless Service every pod is a subdomain of.
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert f"--rdzv-endpoint {job['metadata']['name']}-0.{service['metadata']['name']}:29400" in script
    assert "--rdzv-backend c10d" in script and '--nnodes "$NNODES"' in script and "-m finetune" in script
    assert '[ -d "$RUN_DIR/train_state" ] && resume="--resume"' in script  # a retried pod continues the run
    serving = kind("gpu", "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == serving["securityContext"]
    assert c["securityContext"] == container("gpu")["securityContext"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert env["RUN_DIR"].startswith("/runs/") and "persistentVolumeClaim" in {v["name"]: v for v in pod["volumes"]}[mounts["/runs"]]
