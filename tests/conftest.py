"""Shared fixtures: tiny ViTs built from a config in the session (nothing is downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness.servers import bypass_proxies_for_loopback

ROOT = Path(__file__).resolve().parents[1]
TINY_LABELS = [f"class_{i}" for i in range(10)]
bypass_proxies_for_loopback()  # every test talks to servers on 127.0.0.1: never through a proxy from the environment


def make_tiny_checkpoint(path: Path, *, seed: int = 0, image_size: int = 32, num_labels: int = 10, hidden: int = 64) -> Path:
    """A random ViTForImageClassification saved exactly as `vitserve finetune` would (safetensors + configs)."""
    from finetune.model import tiny_config, write_random_vit

    config = tiny_config(image_size=image_size, hidden_size=hidden, num_attention_heads=4, intermediate_size=hidden * 2)
    labels = [f"class_{i}" for i in range(num_labels)]
    return write_random_vit(path, config, seed=seed, labels=labels, head_std=0.5, head_bias_std=0.5)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `vitserve` program in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "vitserve.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """The machine is shared and tiny models gain nothing from threads: one, restored afterwards for other files."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-vit")


# The fewest parity images with which a perfect result can pass the 0.99 agreement gates (service.parity.images_needed
# gives 380): small exports in tests use this many.
GATE_IMAGES = "400"


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "tiny"
    proc = run_cli("export", str(tiny_checkpoint), "--output", str(out), "--max-images", GATE_IMAGES,
                   "--calibration-images", "64", "--max-batch", "16")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="session")
def photo_bytes() -> list[tuple[str, bytes]]:
    """Real photographs (scikit-image's), as JPEG/PNG bytes."""
    from export.gate_inputs import default_image_bytes

    return default_image_bytes(24)


def pytest_collection_modifyitems(config, items):
    import importlib.util

    from service.hardware import cuda_available

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is false)")
    no_trt = pytest.mark.skip(reason="needs the tensorrt package and a CUDA GPU")
    cuda = cuda_available()
    have_trt = importlib.util.find_spec("tensorrt") is not None and cuda
    for item in items:
        # Markers, not keywords: a parameter id such as "gpu" is a keyword too.
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(no_gpu)
        if item.get_closest_marker("tensorrt") and not have_trt:
            item.add_marker(no_trt)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on a free port (moto's, over HTTP); the environment a client needs to use it."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (make install)")
    import boto3

    from benchmarks.harness.servers import free_port

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fsspec's per-protocol setting from the environment
    client = boto3.client("s3", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="photos")
    yield env, client
    server.stop()
