"""PyTorch engine: the artifact's safetensors weights in transformers' ViT, FP16/BF16 + SDPA on CUDA, FP32 on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.artifact import EngineFile
from service.engines.base import Engine

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchEngine(Engine):
    def __init__(self, weights: Path, entry: EngineFile, input_size: tuple[int, int], *, device: str, precision: str, threads: int = 0):
        import torch
        from transformers import ViTForImageClassification

        if device == "cpu" and precision != "fp32":
            raise ValueError("the PyTorch engine runs FP32 on CPU (half precision on CPU is slower, not faster)")
        self._torch = torch
        if device == "cpu" and threads:
            torch.set_num_threads(threads)  # the CPU budget's share (service/cpu_budget.py)
        dtype = getattr(torch, _DTYPES[precision])
        model = ViTForImageClassification.from_pretrained(
            Path(weights).parent, use_safetensors=True, dtype=dtype, attn_implementation="sdpa"
        )
        self._model = model.to(device).eval()
        self._dtype = dtype
        self._precision = precision
        super().__init__(entry, input_size, name=f"pytorch-{device}-{precision}", device=device, runtime=f"torch-{torch.__version__}")

    def run(self, pixels: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device, non_blocking=True).to(self._dtype)
            logits = self._model(pixel_values=x).logits
            return logits.float().cpu().numpy()

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "precision": self._precision}  # the file is FP32; it computes in this


def capture_cuda_graph(model, static_x):
    """One CUDA graph of ``model(pixel_values=static_x).logits``, by the torch.cuda.graph docs' recipe: warm up on a
    side stream (lazy initialisation must not happen inside the capture), then capture. Replaying it re-runs the model
    on whatever ``static_x`` holds; returns (graph, the logits tensor it writes). The GPU check and the engine sweep both
    capture with it."""
    import torch

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(pixel_values=static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(pixel_values=static_x).logits
    return graph, static_logits
