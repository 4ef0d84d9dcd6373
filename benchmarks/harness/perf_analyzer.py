"""Triton's own load tool, perf_analyzer (C++), as the client for the KServe v2 protocols (gRPC and HTTP binary).

Why beside our Python clients: on cores shared with the server, the client's CPU comes out of the server's. A
grpc.aio client spends about as much CPU per call as the server it loads (measured ~0.9 ms per call against our
gRPC front, docs/serving.md "The front door"), so Python-client figures understate every gRPC server alike and
compress the differences between them; perf_analyzer is what Triton users load servers with, and costs far less.
It runs unchanged from the `tritonclient[all]==2.40.0` wheel (`make perf-analyzer`), against our server and Triton
the same way. Throughput and p99 are perf_analyzer's own (the mean over its measurement windows); the server's CPU
is read from /proc over a window inside its run, divided by that throughput.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PERF_VENV = Path(os.environ.get("VITSERVE_PERF_VENV", ROOT / ".venv-perf"))
PERF_ANALYZER = PERF_VENV / "bin" / "perf_analyzer"
PROTOCOLS = {"grpc": "grpc", "v2-binary": "http"}  # ours → perf_analyzer's -i (its HTTP client sends binary tensors)


def available() -> bool:
    return PERF_ANALYZER.exists()


def environment() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even for remote CPU servers; the nvidia-cuda-runtime-cu12 wheel has it."""
    found = sorted(PERF_VENV.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12"))
    if not found:
        raise RuntimeError(f"libcudart.so.12 missing from {PERF_VENV} (make perf-analyzer)")
    return {**os.environ, "LD_LIBRARY_PATH": str(found[0].parent)}


def input_file(image: bytes, workdir: Path) -> Path:
    """The one image as perf_analyzer's --input-data: BYTES are base64 of the 4-byte length and the bytes."""
    path = workdir / "perf_analyzer_input.json"
    element = base64.b64encode(struct.pack("<I", len(image)) + image).decode()
    path.write_text(json.dumps({"data": [{"image": {"b64": element}}]}))
    return path


async def closed_loop(protocol: str, url: str, grpc_target: str | None, image: bytes, model: str, *, concurrency: int,
                      warmup_s: float, duration_s: float, workdir: Path, server_cpu_s) -> dict:
    """``concurrency`` requests in flight for warmup + duration (three measurement windows), the same dict as
    front_door.closed_loop's."""
    target = grpc_target if protocol == "grpc" else url.removeprefix("http://")
    windows = 3
    interval_ms = int((warmup_s + duration_s) * 1000 / windows)
    cmd = [str(PERF_ANALYZER), "-m", model, "-u", target, "-i", PROTOCOLS[protocol],
           "--input-data", str(input_file(image, workdir)), "--concurrency-range", str(concurrency),
           "--measurement-interval", str(interval_ms), "--max-trials", str(windows), "--stability-percentage", "100"]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                env=environment())
    output = asyncio.create_task(proc.communicate())
    await asyncio.sleep(warmup_s)
    cpu_before, t0 = server_cpu_s(), time.perf_counter()
    await asyncio.sleep(duration_s * 0.9)  # inside its windows, whatever its start-up took
    cpu_after, t1 = server_cpu_s(), time.perf_counter()
    stdout, _ = await output
    text = stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}): {text[-2000:]}")
    throughput = float(re.search(r"Throughput: ([\d.]+) infer/sec", text).group(1))
    p50, p99 = (float(re.search(rf"p{q} latency: (\d+) usec", text).group(1)) / 1000 for q in (50, 99))
    requests = int(re.search(r"Request count: (\d+)", text).group(1))
    cpu_cores = (cpu_after - cpu_before) / (t1 - t0)
    return {
        "protocol": protocol, "concurrency": concurrency, "client": "perf_analyzer", "images_per_s": round(throughput, 1),
        "latency": {"p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}, "statuses": {"200": requests},
        "server_cpu_cores": round(cpu_cores, 2),
        "server_cpu_ms_per_image": round(cpu_cores / max(throughput, 1e-9) * 1000, 3),
    }
