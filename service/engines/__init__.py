"""Engine selection: which runtime serves this artifact on this machine.

``auto`` prefers, on a CUDA GPU: a native TensorRT plan built for this GPU, then ONNX Runtime's
TensorRT/CUDA EPs on the FP16 ONNX, then PyTorch FP16; on CPU: the CPU ONNX file export chose (FP32 or
INT8, whichever was faster and passed the gate), then PyTorch FP32.
"""

from __future__ import annotations

import logging
from typing import Literal

from service.artifact import Artifact, EngineFile
from service.engines.base import Engine

log = logging.getLogger("vitserve.engines")

EngineChoice = Literal[
    "auto", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "pytorch-cpu", "pytorch-cuda"
]
ENGINE_CHOICES: tuple[str, ...] = EngineChoice.__args__  # type: ignore[attr-defined]


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _ort_has(provider: str) -> bool:
    from service.engines.onnxruntime_engine import available_providers

    return provider in available_providers()


def candidates(artifact: Artifact, choice: str, cuda: bool | None = None) -> list[tuple[str, EngineFile]]:
    """Ordered (engine kind, file) pairs to try for ``choice``; ``auto`` lists every viable one."""
    m = artifact.manifest
    cuda = cuda_available() if cuda is None else cuda
    cpu_onnx = next((e for e in m.engines if e.format == "onnx" and e.device == "cpu"), None)
    gpu_onnx = m.engine(format="onnx", precision="fp16")
    plan = m.engine(format="tensorrt")
    weights = m.engine(format="safetensors")
    table: dict[str, EngineFile | None] = {
        "tensorrt": plan,
        "onnxruntime-tensorrt": gpu_onnx,
        "onnxruntime-cuda": gpu_onnx,
        "pytorch-cuda": weights,
        "onnxruntime-cpu": cpu_onnx or m.engine(format="onnx", precision="fp32"),
        "pytorch-cpu": weights,
    }
    if choice != "auto":
        entry = table.get(choice)
        if entry is None:
            raise ValueError(f"engine {choice!r} needs a file the artifact {artifact.root} does not have")
        if not _passed(entry):
            raise ValueError(f"{entry.file} failed its parity gate at export ({'; '.join(entry.parity.failures)}); refusing to serve it")
        return [(choice, entry)]
    order = ["tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "pytorch-cuda"] if cuda else []
    order += ["onnxruntime-cpu", "pytorch-cpu"]
    usable = {
        "tensorrt": lambda: _importable("tensorrt"),
        "onnxruntime-tensorrt": lambda: _ort_has("TensorrtExecutionProvider"),
        "onnxruntime-cuda": lambda: _ort_has("CUDAExecutionProvider"),
        "pytorch-cuda": lambda: True,
        "onnxruntime-cpu": lambda: True,
        "pytorch-cpu": lambda: True,
    }
    # A file that failed its parity gate is never chosen automatically: it answers differently from the model.
    return [(k, table[k]) for k in order if table[k] is not None and _passed(table[k]) and usable[k]()]


def _passed(entry: EngineFile) -> bool:
    return entry.parity is None or entry.parity.passed


def build_engine(kind: str, artifact: Artifact, entry: EngineFile, *, intra_op_threads: int = 0) -> Engine:
    size = artifact.manifest.preprocessing.input_size
    path = artifact.path(entry)
    if kind.startswith("onnxruntime-"):
        from service.engines.onnxruntime_engine import OnnxRuntimeEngine

        provider = kind.removeprefix("onnxruntime-")
        return OnnxRuntimeEngine(
            path, entry, size, provider=provider, intra_op_threads=intra_op_threads, trt_cache_dir=artifact.root / "trt_cache"
        )
    if kind == "tensorrt":
        from service.engines.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(path, entry, size)
    if kind in ("pytorch-cuda", "pytorch-cpu"):
        from service.engines.torch_engine import TorchEngine

        device = kind.removeprefix("pytorch-")
        return TorchEngine(path, entry, size, device=device, precision="fp16" if device == "cuda" else "fp32")
    raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_CHOICES)}")


def load_engine(artifact: Artifact, choice: str = "auto", *, intra_op_threads: int = 0) -> Engine:
    """Verify the chosen file's checksum, then load it. ``auto`` falls through failures to the next candidate."""
    if choice not in ENGINE_CHOICES:
        raise ValueError(f"unknown engine {choice!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    options = candidates(artifact, choice)
    if not options:
        raise RuntimeError(f"no engine in {artifact.root} can run on this machine")
    errors = []
    for kind, entry in options:
        artifact.verify([entry])  # a checksum failure is fatal, never a reason to fall through
        try:
            engine = build_engine(kind, artifact, entry, intra_op_threads=intra_op_threads)
        except Exception as e:  # noqa: BLE001 - try the next candidate, report all at the end
            if choice != "auto":
                raise
            log.warning("engine %s unavailable: %s", kind, e)
            errors.append(f"{kind}: {e}")
            continue
        log.info("engine selected: %s (%s)", engine.name, engine.describe())
        return engine
    raise RuntimeError("no engine could be loaded: " + "; ".join(errors))
