"""What machine is this: the facts a parity result depends on (CPU model, its integer-math instruction sets, GPU).

INT8 kernels differ by instruction set (ONNX Runtime picks VNNI, AVX-512, AVX2 or SSE code at run time) and TensorRT
plans by GPU, so every parity figure records where it was measured: export's gate, and the service's startup check.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# The /proc/cpuinfo flags that decide which integer GEMM kernel ONNX Runtime runs (x86: VNNI accumulates in 32 bits;
# AVX2/AVX-512 without it use VPMADDUBSW, which saturates at 16 bits; ARM: dot-product and i8mm instructions).
INT8_RELEVANT_FLAGS = (
    "sse4_1", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "asimddp", "i8mm",
)  # fmt: skip


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith(("model name", "Model", "Hardware")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_features() -> list[str]:
    """The INT8-relevant instruction-set flags this CPU reports, sorted."""
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return sorted(f for f in INT8_RELEVANT_FLAGS if f in flags)


def cuda_available() -> bool:
    """The one CUDA check in vitserve (engines, tests, benchmarks and export ask this too)."""
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def describe(device: str = "cpu") -> dict[str, str]:
    """Where a figure was measured: the CPU and its flags, ONNX Runtime's version, and the GPU for CUDA engines."""
    facts = {"cpu": cpu_name(), "isa": " ".join(cpu_features()) or "unknown", "machine": platform.machine()}
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if device == "cuda":
        if cuda_available():  # which imported torch
            import torch

            facts["gpu"] = torch.cuda.get_device_name(0)
    return facts
