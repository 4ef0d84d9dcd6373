"""Native TensorRT engine (TensorRT 10/11 Python API, tensor-address execution via execute_async_v3).

Written to NVIDIA's documented API; not exercised on the machines this project is developed on (no
TensorRT there). Device buffers are torch CUDA tensors, so no pycuda/cuda-python dependency is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.artifact import EngineFile
from service.engines.base import Engine


class TensorRTEngine(Engine):
    def __init__(self, path: Path, entry: EngineFile, input_size: tuple[int, int]):
        import tensorrt as trt
        import torch

        from service.hardware import cuda_available

        if not cuda_available():
            raise RuntimeError("the TensorRT engine needs a CUDA GPU")
        built_on = entry.build.get("gpu_name")
        here = torch.cuda.get_device_name(0)
        if built_on and built_on != here:
            # Plans are specific to the GPU model (and TensorRT version) they were built on.
            raise RuntimeError(f"TensorRT plan {entry.file} was built on {built_on}, this GPU is {here}; rebuild it")
        self._trt = trt
        self._torch = torch
        # The Runtime that deserialised a plan must outlive the engine (TensorRT's documented object lifetimes).
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (version mismatch?)")
        self._context = self._engine.create_execution_context()
        self._input = entry.inputs[0].name
        self._output = entry.outputs[0].name
        self._stream = torch.cuda.Stream()
        super().__init__(entry, input_size, name=f"tensorrt-cuda-{entry.precision}", device="cuda", runtime=f"tensorrt-{trt.__version__}")

    def run(self, pixels: np.ndarray) -> np.ndarray:
        torch = self._torch
        batch = pixels.shape[0]
        producer = torch.cuda.current_stream()  # where the input copy and the output allocation are ordered
        x = torch.from_numpy(pixels).to("cuda", non_blocking=True).contiguous()
        self._context.set_input_shape(self._input, tuple(x.shape))
        out_shape = tuple(self._context.get_tensor_shape(self._output))
        y = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self._context.set_tensor_address(self._input, x.data_ptr())
        self._context.set_tensor_address(self._output, y.data_ptr())
        # TensorRT runs on its own stream: that stream must first wait for the copy enqueued on the producer's (asking
        # from inside `torch.cuda.stream(self._stream)` would make the stream wait on itself, and race the copy).
        self._stream.wait_stream(producer)
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self._stream.synchronize()
        return y[:batch].cpu().numpy()
