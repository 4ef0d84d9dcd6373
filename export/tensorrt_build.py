"""ONNX (FP16) → native TensorRT plan with an optimisation profile and a timing cache.

Written against the TensorRT 10/11 Python API as documented (``IBuilder.build_serialized_network``,
``IOptimizationProfile.set_shape``, ``IBuilderConfig.set_timing_cache``); the machines this project is
developed on cannot install TensorRT, so this path is exercised only by tests marked ``tensorrt``.
"""

from __future__ import annotations

from pathlib import Path

from service.hardware import cuda_available

INSTALL_HINT = (
    "TensorRT is not installed: on a CUDA machine run `pip install tensorrt` (or `pip install 'vitserve[gpu]'`); "
    "it cannot be installed on CPU-only machines"
)


class TensorRTUnavailable(RuntimeError):
    pass


def ensure_available() -> None:
    """Fail before any export work when a plan was asked for but cannot be built here."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTUnavailable(INSTALL_HINT)
    if not cuda_available():
        raise TensorRTUnavailable("building a TensorRT engine needs a CUDA GPU; none is visible")


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    *,
    input_name: str,
    input_size: tuple[int, int],
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    timing_cache: Path,
    workspace_gib: float = 8.0,
) -> dict[str, str]:
    """Build an FP16 plan; returns the facts to record (TensorRT version, GPU name)."""
    ensure_available()
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10+
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.set_flag(trt.BuilderFlag.FP16)
    h, w = input_size
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, 3, h, w), (opt_batch, 3, h, w), (max_batch, 3, h, w))
    config.add_optimization_profile(profile)

    # The timing cache makes rebuilds (same GPU, same TensorRT) take seconds instead of minutes.
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    plan_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "gpu_name": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda)}
