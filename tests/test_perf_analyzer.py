"""Triton's own load tool, unmodified, against a real `vitserve serve` over gRPC and HTTP: a generic KServe v2 client
that reads the model's configuration and metadata and builds its requests from them (it stopped with "missing
tensor pixel_values" before both inputs were marked optional, and with "unable to set shape" while the metadata said
[-1] for an input whose configuration says dims [1])."""

from __future__ import annotations

import re
import subprocess

import pytest

from benchmarks.harness import perf_analyzer
from service.artifact import read_manifest
from tests.server import metric_value, running_server

pytestmark = pytest.mark.timeout(300)
needs_perf_analyzer = pytest.mark.skipif(
    not perf_analyzer.available(), reason=f"perf_analyzer's environment {perf_analyzer.PERF_VENV} is missing: make perf-analyzer"
)


@needs_perf_analyzer
def test_perf_analyzer_runs_unchanged_over_grpc_and_http(tiny_artifact, tmp_path, photo_bytes):
    model = read_manifest(tiny_artifact).model.name
    jpeg = next(d for _, d in photo_bytes if d[:3] == b"\xff\xd8\xff")
    data = perf_analyzer.input_file(jpeg, tmp_path)  # BYTES: base64 of the 4-byte length and the bytes
    env = perf_analyzer.environment()
    with running_server(tiny_artifact, tmp_path / "srv") as server:
        for protocol, url in (("grpc", server.grpc_address), ("http", server.url.removeprefix("http://"))):
            label = "grpc" if protocol == "grpc" else "v2-http"
            before = server.metrics()
            proc = subprocess.run(
                [str(perf_analyzer.PERF_ANALYZER), "-m", model, "-u", url, "-i", protocol, "--input-data", str(data),
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
