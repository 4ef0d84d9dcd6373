"""Step environment: GPU, driver, CUDA, versions, and the measured ceiling (dense matmul TFLOP/s)."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.gpu_check.plan import tail_of
from benchmarks.gpu_check.run import Budget, Run
from benchmarks.harness.results import NO_GPU
from benchmarks.harness.sweep import matmul_tflops

EXTRA_VERSIONS = ("torchvision", "timm", "numpy", "pillow", "pydantic", "fastapi", "starlette", "uvicorn", "prometheus-client",
                  "safetensors", "httpx", "pytest", "grpcio", "onnxscript", "matplotlib", "scikit-image", "psutil")  # fmt: skip


def nvidia_smi() -> dict:
    fields = "name,driver_version,memory.total,power.limit,clocks.max.sm,pcie.link.gen.max"
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "why": f"{type(e).__name__}: {e}"}
    if proc.returncode != 0:
        return {"available": False, "why": tail_of(proc.stderr or proc.stdout, 300)}
    return {"available": True, "gpus": [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in proc.stdout.strip().splitlines()]}


def step_environment(run: Run, budget: Budget) -> dict:
    from importlib import metadata

    import torch

    from service.engines.onnxruntime_engine import available_providers

    versions = {}
    for dist in EXTRA_VERSIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    out: dict = {
        "python": sys.executable, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": run.cuda, "onnxruntime_providers": available_providers(), "versions": versions,
        "nvidia_smi": nvidia_smi(), "skipped": {},
    }  # fmt: skip
    if run.cuda:
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                      "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count()}
        pairs = [("cuda", "bf16"), ("cuda", "fp16")]
    else:
        out["skipped"]["gpu"] = NO_GPU
        out["skipped"]["cuda matmul"] = "no CUDA GPU: the CPU's matmul is measured instead"
        pairs = [("cpu", "fp32"), ("cpu", "bf16")]
    out["matmul"] = []
    for device, precision in pairs:
        m = matmul_tflops(device, precision, run.plan.matmul_n, runs=20 if device == "cuda" else 3)
        out["matmul"].append(m)
        run.ceilings[(device, precision)] = m["tflops"]
        run.log(f"  matmul {device} {precision} {m['n']}³: {m['tflops']} TFLOP/s (median of {m['runs']})")
    return out


