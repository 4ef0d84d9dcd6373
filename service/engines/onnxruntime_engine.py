"""ONNX Runtime engine: CPU EP here; CUDA or TensorRT EP where onnxruntime-gpu is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.artifact import EngineFile
from service.engines.base import Engine

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def tensorrt_provider_options(entry: EngineFile, input_size: tuple[int, int], cache_dir: Path | None) -> dict[str, object]:
    """ONNX Runtime's TensorRT EP options: FP16, a cached engine, and one optimisation profile covering every batch
    from 1 to the entry's maximum, tuned for its opt_batch (as export's native plan is, export/tensorrt_build.py). Without explicit profile shapes the EP builds for the first shape it sees and
    rebuilds the whole engine (minutes for ViT-L) at each new batch size the batcher sends."""
    h, w = input_size
    name = entry.inputs[0].name
    shape = lambda batch: f"{name}:{batch}x3x{h}x{w}"  # noqa: E731 - the EP's "input:d0xd1x..." format
    options: dict[str, object] = {
        "trt_fp16_enable": True, "trt_engine_cache_enable": True,
        "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(max(1, min(entry.opt_batch, entry.max_batch))),
        "trt_profile_max_shapes": shape(entry.max_batch),
    }  # fmt: skip
    if cache_dir is not None:
        options["trt_engine_cache_path"] = str(cache_dir)
    return options


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def session_options(intra_op_threads: int = 0):
    """Every session's fixed options (``vitserve bench engine-turns`` adds its pool settings to these)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = intra_op_threads  # 0 = one per physical core
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one batch at a time: intra-op parallelism only
    return opts


class OnnxRuntimeEngine(Engine):
    def __init__(
        self,
        path: Path,
        entry: EngineFile,
        input_size: tuple[int, int],
        *,
        provider: str = "cpu",
        intra_op_threads: int = 0,
        idle_spinning: bool = True,
        trt_cache_dir: Path | None = None,
    ):
        import onnxruntime as ort

        if PROVIDERS[provider][0] not in available_providers():
            raise RuntimeError(
                f"ONNX Runtime here has no {PROVIDERS[provider][0]} (available: {available_providers()}); "
                "install onnxruntime-gpu in place of onnxruntime for CUDA/TensorRT"
            )
        opts = session_options(intra_op_threads)
        if not idle_spinning:
            # The CPU budget gives these cores to decoding between batches (service/cpu_budget.py): the pool stops
            # spinning the moment a run returns. Inside a run it spins: a ViT's parallel regions follow each other
            # closely, and putting the threads to sleep between them (allow_spinning=0, before) made every batch 9-24 %
            # slower for no less CPU (`vitserve bench engine-turns`, 2-core Xeon: ViT-S at batch 4 183 → 168 ms, the
            # demo at batch 32 10.4 → 8.4 ms a call).
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        providers: list = list(PROVIDERS[provider])
        if provider == "tensorrt":
            providers[0] = ("TensorrtExecutionProvider", tensorrt_provider_options(entry, input_size, trt_cache_dir))
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self._input = entry.inputs[0].name
        self._output = entry.outputs[0].name
        scheme = f"-{entry.quantization.scheme}" if entry.quantization is not None else ""
        super().__init__(
            entry, input_size, name=f"onnxruntime-{provider}-{entry.precision}{scheme}",
            device="cpu" if provider == "cpu" else "cuda", runtime=f"onnxruntime-{ort.__version__}",
        )  # fmt: skip
        # Dynamic INT8 quantises activations with one scale per *tensor*, computed at run time over the whole batch,
        # so an image's logits would depend on its batch-mates. One image per call keeps every client's answer
        # independent of the others. Static INT8 (calibrated constant scales), FP32 and FP16 batch freely.
        self.per_image = entry.batch_dependent

    def run(self, pixels: np.ndarray) -> np.ndarray:
        if self.per_image and len(pixels) > 1:
            return np.concatenate([self._run(pixels[i : i + 1]) for i in range(len(pixels))])
        return self._run(pixels)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        (logits,) = self._session.run([self._output], {self._input: pixels})
        return logits.astype(np.float32, copy=False)

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "providers": ",".join(self._session.get_providers()), "per_image": str(self.per_image).lower()}
