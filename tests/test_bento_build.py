"""`bentoml build` packages the service and its artifact; the built Bento serves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from service.artifact import read_manifest
from tests.server import ROOT, free_port, stop

pytestmark = pytest.mark.timeout(400)


def check_image_recipe(bento: Path, *, gpu: bool) -> None:
    """The Dockerfile `bentoml build` generated, as `bentoml containerize` will build it: the non-root user the
    hardened pods run as (k8s/base), both ports, and only the packages this image's engine needs."""
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    pod = yaml.safe_load((ROOT / "k8s" / "base" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    uid = pod["securityContext"]["runAsUser"]
    assert f"ARG BENTO_USER_UID={uid}" in dockerfile and f"ARG BENTO_USER_GID={uid}" in dockerfile
    assert re.search(r"^USER bentoml$", dockerfile, re.M)
    assert {int(p) for p in re.findall(r"^EXPOSE (\d+)$", dockerfile, re.M)} >= {3000, 8001}
    assert ("FROM nvidia/cuda" in dockerfile) == gpu
    # the C++ gRPC front is compiled in the image from the Bento's source, never copied from the build machine
    assert "-o /usr/local/bin/vitserve-grpc-front $BENTO_PATH/src/service/native/grpc_front.cc" in dockerfile
    assert (bento / "src" / "service" / "native" / "grpc_front.cc").is_file()
    assert not (bento / "src" / "service" / "native" / "vitserve-grpc-front").exists()
    from service.settings import Settings

    s = Settings()  # the container runs `bentoml serve` with what `vitserve serve` would pass
    assert f'CMD ["--timeout-keep-alive", "{s.keep_alive_s}", "--backlog", "{s.backlog}"]' in dockerfile
    requirements = {re.split(r"[<>=~!\[ ]", line)[0].lower() for line in
                    (bento / "env" / "python" / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")}
    if gpu:
        assert {"onnxruntime-gpu", "tensorrt", "torch"} <= requirements and "onnxruntime" not in requirements
    else:  # the CPU image serves ONNX: no torch, transformers or CUDA runtime
        assert "onnxruntime" in requirements and not requirements & {"torch", "transformers", "onnxruntime-gpu", "tensorrt"}


def test_gpu_bento_builds_with_the_gpu_packages_only(tmp_path):
    home = tmp_path / "bentoml_home"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    src = tmp_path / "project"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "__pycache__", "runs", "data", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", "bentofile.gpu.yaml", "--output", "tag"], cwd=src,
                           env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("vitserve-gpu:")
    check_image_recipe(home / "bentos" / "vitserve-gpu" / tag.split(":")[1], gpu=True)


def test_bentoml_build_then_serve_the_bento(tmp_path, tiny_artifact):
    home = tmp_path / "bentoml_home"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    # Build from a copy of the project with a test artifact under artifacts/, as a user would ship one.
    src = tmp_path / "project"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "__pycache__", "runs", "data", "*.egg-info"))
    shutil.copytree(tiny_artifact, src / "artifacts" / "tiny")
    build = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=src, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("vitserve:")
    bento_src = home / "bentos" / "vitserve" / tag.split(":")[1] / "src"
    assert (bento_src / "service" / "app.py").is_file()
    assert (bento_src / "artifacts" / "tiny" / "manifest.json").is_file()
    check_image_recipe(bento_src.parent, gpu=False)
    predicts_from_its_own_sources(bento_src, tiny_artifact, tmp_path)

    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", tag, "--port", str(port), "--host", "127.0.0.1"],
                            env={**env, "VITSERVE_ARTIFACT": "artifacts/tiny", "VITSERVE_GRPC_PORT": str(grpc_port)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=10).json()
        assert info["model"]["name"] == read_manifest(tiny_artifact).model.name
        import grpc

        from service.protos import grpc_service_pb2 as pb
        from service.protos import grpc_service_pb2_grpc as pb_grpc

        ready = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}")).ServerReady(pb.ServerReadyRequest(), timeout=10)
        assert ready.ready  # the Bento's packages carry the gRPC front-end too
    finally:
        stop(proc)


def predicts_from_its_own_sources(bento_src: Path, artifact: Path, tmp_path: Path) -> None:
    """`vitserve predict` runs from the Bento's sources alone (the batch Job's command): every project module it
    imports is a file inside the Bento, none is picked up from this checkout."""
    images = tmp_path / "predict-images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images / "red.png")
    out = tmp_path / "predict-out" / "preds.csv"
    script = (
        "import sys; sys.path.insert(0, '.')\n"
        "from predict.cli import main\n"
        f"code = main([{str(images)!r}, '--artifact', {str(artifact)!r}, '--output', {str(out)!r}, '--shard', '0/1'])\n"
        "mods = [m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)]\n"
        f"outside = [f for f in mods if f.startswith({str(ROOT)!r} + '/') and not f.startswith(({str(bento_src)!r}, sys.prefix))]\n"
        "print('OUTSIDE', outside[:10]); sys.exit(code)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=bento_src, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OUTSIDE []" in run.stdout, run.stdout
    assert out.with_name("preds.shard-00000-of-00001.csv").read_text().count("red.png") == 1
