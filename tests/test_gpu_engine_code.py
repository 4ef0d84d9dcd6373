"""What the GPU engines ask of CUDA, TensorRT and ONNX Runtime, read on a machine without them: the native TensorRT
engine's stream order (traced through stand-ins that record each call, since neither a GPU nor TensorRT exists here)
and the TensorRT provider's optimisation profile (its options, read as ONNX Runtime would receive them). The engines
themselves run in the GPU-marked tests and in `benchmarks.gpu_check`."""

from __future__ import annotations

import contextlib

import numpy as np

from service.artifact import EngineFile, TensorSpec
from service.engines.onnxruntime_engine import tensorrt_provider_options
from service.engines.tensorrt_engine import TensorRTEngine


def _entry(max_batch: int = 32, opt_batch: int = 16) -> EngineFile:
    return EngineFile(
        file="model.plan", format="tensorrt", precision="fp16", device="cuda", max_batch=max_batch, opt_batch=opt_batch,
        sha256="0" * 64, inputs=[TensorSpec(name="pixel_values", dtype="float32", shape=["batch", 3, 224, 224])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", 10])],
    )


class _Trace:
    """Stand-ins for the few torch.cuda and TensorRT calls the engine makes, each recorded in order."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.default = _Stream("default", self)
        self.current = self.default

    # torch
    float32 = np.float32

    def from_numpy(self, array):
        return _Tensor(array, self, where="host")

    def empty(self, shape, dtype, device):
        self.calls.append(("alloc", self.current.name))
        return _Tensor(np.zeros(shape, dtype=np.float32), self, where="cuda")

    @property
    def cuda(self):
        return self

    def current_stream(self):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        before, self.current = self.current, s
        try:
            yield
        finally:
            self.current = before


class _Stream:
    def __init__(self, name: str, trace: _Trace):
        self.name, self.trace, self.cuda_stream = name, trace, f"handle-{name}"

    def wait_stream(self, other):
        self.trace.calls.append(("wait", self.name, other.name))

    def synchronize(self):
        self.trace.calls.append(("synchronize", self.name))


class _Tensor:
    def __init__(self, array, trace: _Trace, where: str):
        self.array, self.trace, self.where = array, trace, where
        self.shape = array.shape

    def to(self, device, non_blocking=False):
        self.trace.calls.append(("copy to device", self.trace.current.name))
        return _Tensor(self.array, self.trace, where="cuda")

    def contiguous(self):
        return self

    def data_ptr(self):
        return id(self.array)

    def __getitem__(self, index):
        return _Tensor(self.array[index], self.trace, self.where)

    def cpu(self):
        return self

    def numpy(self):
        return self.array


class _Context:
    def __init__(self, trace: _Trace, labels: int):
        self.trace, self.labels, self.batch = trace, labels, None

    def set_input_shape(self, name, shape):
        self.batch = shape[0]

    def get_tensor_shape(self, name):
        return (self.batch, self.labels)

    def set_tensor_address(self, name, address):
        pass

    def execute_async_v3(self, stream_handle):
        self.trace.calls.append(("execute", stream_handle))
        return True


def test_tensorrt_runs_on_its_stream_only_after_the_input_copy_on_the_producers_stream():
    trace = _Trace()
    engine = object.__new__(TensorRTEngine)  # everything __init__ would take from TensorRT and the GPU, given here
    engine._torch, engine._context = trace, _Context(trace, labels=10)
    engine._input, engine._output = "pixel_values", "logits"
    engine._stream = _Stream("tensorrt", trace)

    out = engine.run(np.ones((3, 3, 224, 224), dtype=np.float32))

    assert out.shape == (3, 10)
    order = [c[0] for c in trace.calls]
    assert order.index("copy to device") < order.index("wait") < order.index("execute") < order.index("synchronize"), trace.calls
    wait = next(c for c in trace.calls if c[0] == "wait")
    copy = next(c for c in trace.calls if c[0] == "copy to device")
    assert wait[1] == "tensorrt" and wait[2] == copy[1] != "tensorrt", f"TensorRT's stream must wait on the copy's: {trace.calls}"
    assert ("execute", "handle-tensorrt") in trace.calls and ("synchronize", "tensorrt") in trace.calls


def test_the_tensorrt_engine_keeps_the_runtime_that_deserialised_its_plan():
    import inspect

    source = inspect.getsource(TensorRTEngine.__init__)
    assert "self._runtime = trt.Runtime(" in source and "self._runtime.deserialize_cuda_engine(" in source


def test_onnxruntime_tensorrt_gets_one_profile_from_batch_1_to_the_maximum(tmp_path):
    options = tensorrt_provider_options(_entry(max_batch=32, opt_batch=16), (224, 224), tmp_path / "trt_cache")
    assert options["trt_profile_min_shapes"] == "pixel_values:1x3x224x224"
    assert options["trt_profile_opt_shapes"] == "pixel_values:16x3x224x224"
    assert options["trt_profile_max_shapes"] == "pixel_values:32x3x224x224"
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == str(tmp_path / "trt_cache")
    small = tensorrt_provider_options(_entry(max_batch=8, opt_batch=16), (384, 320), None)
    assert small["trt_profile_opt_shapes"] == "pixel_values:8x3x384x320" and "trt_engine_cache_path" not in small
