"""The gate, re-checked where the model is served: a real `vitserve serve` runs the artifact's golden set through the
engine it is about to serve, skips an engine that disagrees under `auto`, and refuses to start with an explicit one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from service.artifact import read_manifest, sha256_file, write_manifest
from tests.server import ROOT, metric_value, running_server

pytestmark = pytest.mark.timeout(300)


def _rehash(artifact: Path, file: str) -> None:
    """Record a changed file's new checksum, as an export that produced it would have: the artifact is consistent
    (no tampering to detect), it just computes something else."""
    m = read_manifest(artifact)
    if m.golden is not None and m.golden.file == file:
        m = m.model_copy(update={"golden": m.golden.model_copy(update={"sha256": sha256_file(artifact / file)})})
    engines = [e.model_copy(update={"sha256": sha256_file(artifact / e.file)}) if e.file == file else e for e in m.engines]
    write_manifest(artifact, m.model_copy(update={"engines": engines}))


def _cpu_file(artifact: Path) -> str:
    return next(e.file for e in read_manifest(artifact).engines if e.format == "onnx" and e.device == "cpu")


@pytest.fixture
def engine_that_disagrees_here(tiny_artifact, tmp_path) -> Path:
    """The CPU ONNX file computes logits + 2 for class 0: what a kernel that misbehaves on this CPU would look like.
    Its export report still says it passed (where it was exported, it did)."""
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    path = art / _cpu_file(art)
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    for node in model.graph.node:  # rename the producer's output, then add the offset back under the old name
        node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
    shift = np.zeros((1, 10), dtype=np.float32)
    shift[0, 0] = 2.0
    model.graph.initializer.append(numpy_helper.from_array(shift, "vitserve_test_shift"))
    model.graph.node.append(helper.make_node("Add", [f"{out}_raw", "vitserve_test_shift"], [out]))
    onnx.save(model, str(path))
    _rehash(art, path.name)
    return art


def serve_refusal(artifact: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """`vitserve serve` expected to refuse: it must exit by itself (no restart loop), naming why."""
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, str(ROOT / "vitserve.py"), "serve", "--artifact", str(artifact), "--host", "127.0.0.1", "--port", "0", *extra],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env,
    )


def test_auto_skips_an_engine_that_disagrees_on_this_machine(engine_that_disagrees_here, tmp_path, photo_bytes):
    with running_server(engine_that_disagrees_here, tmp_path) as s:
        info = httpx.get(f"{s.url}/info", timeout=10).json()
        assert info["engine"]["engine"] == "pytorch-cpu-fp32"
        skipped, selected = info["engine_selection"]
        assert skipped["outcome"] == "skipped" and skipped["file"] == _cpu_file(engine_that_disagrees_here)
        check = skipped["startup_check"]
        assert not check["passed"] and check["max_abs_logit_diff"] == pytest.approx(2.0, abs=1.0)
        assert any("max |Δlogit|" in f for f in check["failures"]) and check["hardware"]["isa"]
        assert selected["outcome"] == "selected" and selected["startup_check"]["passed"]
        assert selected["startup_check"]["images"] == 32
        metrics = s.metrics()
        assert metric_value(metrics, "vitserve_startup_check_passed", engine=skipped["engine"]) == 0
        assert metric_value(metrics, "vitserve_startup_check_passed", engine="pytorch-cpu-fp32") == 1
        assert metric_value(metrics, "vitserve_startup_check_max_abs_logit_diff", engine=skipped["engine"]) > 1.0
        r = httpx.post(f"{s.url}/classify", files=[("images", ("a.jpg", photo_bytes[0][1]))], timeout=30)
        assert r.status_code == 200  # served, by the engine that agrees
        assert "skipped: startup check failed" in s.output() and "max |Δlogit|" in s.output()


def test_an_explicit_engine_that_disagrees_refuses_to_start(engine_that_disagrees_here, tmp_path):
    proc = serve_refusal(engine_that_disagrees_here, tmp_path, "--engine", "onnxruntime-cpu")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vitserve: refusing to serve: engine onnxruntime-cpu-")
    assert "startup check failed on this machine" in last and "max |Δlogit| 2" in last and "golden images" in last


def test_a_golden_set_that_disagrees_with_every_engine_refuses_to_start(tiny_artifact, tmp_path):
    """Tampered reference logits (checksum updated, so not caught as tampering): no engine agrees with them."""
    from safetensors.numpy import load_file, save_file

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    golden = load_file(art / "golden.safetensors")
    golden["reference_logits"] = golden["reference_logits"][:, ::-1].copy()  # every label's logit on another label
    save_file(golden, str(art / "golden.safetensors"))
    _rehash(art, "golden.safetensors")
    proc = serve_refusal(art, tmp_path)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "no engine may serve" in last and "onnxruntime-cpu" in last and "pytorch-cpu-fp32" in last
    assert "top-1 agreement" in last and "upper bound" in last
    assert json.loads((art / "manifest.json").read_text())["golden"]["images"] == 32
