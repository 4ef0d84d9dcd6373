"""Triton's own load tool, unmodified, against a real `vitserve serve` over gRPC and HTTP: a generic KServe v2 client
that reads the model's configuration and metadata and builds its requests from them (it stopped with "missing
tensor pixel_values" before both inputs were marked optional, and with "unable to set shape" while the metadata said
[-1] for an input whose configuration says dims [1])."""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from service.artifact import read_manifest
from tests.server import ROOT, metric_value, running_server

pytestmark = pytest.mark.timeout(300)
PERF_VENV = Path(os.environ.get("VITSERVE_PERF_VENV", ROOT / ".venv-perf"))
PERF_ANALYZER = PERF_VENV / "bin" / "perf_analyzer"
needs_perf_analyzer = pytest.mark.skipif(
    not PERF_ANALYZER.exists(), reason=f"perf_analyzer's environment {PERF_VENV} is missing: make perf-analyzer"
)


def cudart_dir() -> str:
    """perf_analyzer links libcudart.so.12 even for remote CPU servers; the nvidia-cuda-runtime-cu12 wheel has it."""
    found = sorted(PERF_VENV.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12"))
    assert found, "libcudart.so.12 missing from the perf_analyzer environment (nvidia-cuda-runtime-cu12)"
    return str(found[0].parent)


@needs_perf_analyzer
def test_perf_analyzer_runs_unchanged_over_grpc_and_http(tiny_artifact, tmp_path, photo_bytes):
    model = read_manifest(tiny_artifact).model.name
    jpeg = next(d for _, d in photo_bytes if d[:3] == b"\xff\xd8\xff")
    # BYTES input data: base64 of the serialised element (4-byte little-endian length, then the bytes).
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{"image": {"b64": base64.b64encode(struct.pack("<I", len(jpeg)) + jpeg).decode()}}]}))
    env = {**os.environ, "LD_LIBRARY_PATH": cudart_dir()}
    with running_server(tiny_artifact, tmp_path / "srv") as server:
        for protocol, url in (("grpc", server.grpc_address), ("http", server.url.removeprefix("http://"))):
            label = "grpc" if protocol == "grpc" else "v2-http"
            before = server.metrics()
            proc = subprocess.run(
                [str(PERF_ANALYZER), "-m", model, "-u", url, "-i", protocol, "--input-data", str(data),
                 "--concurrency-range", "4", "--measurement-interval", "1000", "--max-trials", "4",
                 "--stability-percentage", "100"],
                capture_output=True, text=True, timeout=120, env=env,
            )  # fmt: skip
            assert proc.returncode == 0, (protocol, proc.stdout[-3000:], proc.stderr[-3000:])
            measured = re.search(r"Throughput: ([\d.]+) infer/sec", proc.stdout)
            assert measured and float(measured.group(1)) > 0, proc.stdout[-2000:]
            after = server.metrics()
            ok = metric_value(after, "vitserve_requests_total", protocol=label, status="200") - \
                metric_value(before, "vitserve_requests_total", protocol=label, status="200")
            every = metric_value(after, "vitserve_requests_total", protocol=label) - metric_value(before, "vitserve_requests_total", protocol=label)
            requests = int(re.search(r"Request count: (\d+)", proc.stdout).group(1))
            assert ok >= requests > 0 and every == ok, (protocol, requests, ok, every)  # every request answered 200
