"""Engine files built outside an artifact, with the export code, and the manifest entries that let the service's
own engine classes load them: what `vitserve bench engines` and the GPU check sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.models import checkpoint_shape


def engine_entry(path: Path, precision: str, h: int, w: int, labels: int, max_batch: int, device: str, fmt: str = "onnx"):
    """A manifest entry for an engine file built outside an artifact, so the service's engine classes can load it."""
    from export.onnx_export import INPUT_NAME, OUTPUT_NAME
    from service.artifact import EngineFile, TensorSpec, sha256_file

    return EngineFile(
        file=path.name, format=fmt, precision=precision, device=device, max_batch=max_batch, sha256=sha256_file(path),
        inputs=[TensorSpec(name=INPUT_NAME, dtype="float32", shape=["batch", 3, h, w])],
        outputs=[TensorSpec(name=OUTPUT_NAME, dtype="float32", shape=["batch", labels])],
    )


class Builds:
    """Lazily exported files shared by the variants (each exported once, only if a variant needs it)."""

    def __init__(self, checkpoint: Path, work: Path, max_batch: int):
        from export.checkpoint import load_checkpoint

        self.checkpoint, self.work, self.max_batch = checkpoint, work, max_batch
        self.ckpt = load_checkpoint(str(checkpoint))
        self.shape = checkpoint_shape(checkpoint)
        self.h = self.w = self.shape.image_size
        self.labels = len(self.ckpt.labels)
        self._files: dict[str, Path] = {}
        self._quant: dict = {}

    def file(self, kind: str) -> Path:
        if kind not in self._files:
            from export.onnx_export import convert_fp16, export_fp32, quantize_int8_dynamic, quantize_int8_static

            if kind == "fp32":
                self._files[kind] = export_fp32(self.ckpt.model, self.work / "model.fp32.onnx", (self.h, self.w), self.max_batch)
            elif kind in ("int8-dynamic", "int8-static"):
                path = self.work / f"model.{kind}.onnx"
                if kind == "int8-dynamic":
                    self._quant[kind] = quantize_int8_dynamic(self.file("fp32"), path)
                else:
                    self._quant[kind] = quantize_int8_static(self.file("fp32"), path, self.calibration_pixels())
                self._files[kind] = path
            elif kind == "fp16":
                self._files[kind] = convert_fp16(self.file("fp32"), self.work / "model.fp16.onnx")
            elif kind == "plan":
                from export.onnx_export import INPUT_NAME
                from export.pipeline import ExportOptions
                from export.tensorrt_build import build_plan

                plan = self.work / "model.fp16.plan"
                self._plan_facts = build_plan(
                    self.file("fp16"), plan, input_name=INPUT_NAME, input_size=(self.h, self.w), min_batch=1,
                    opt_batch=min(ExportOptions.opt_batch, self.max_batch), max_batch=self.max_batch, timing_cache=self.work / "trt.cache",
                )
                self._files[kind] = plan
        return self._files[kind]

    def calibration_pixels(self):
        """Static INT8's calibration set, as export builds it (views of scikit-image's photographs)."""
        from export.gate_inputs import default_image_bytes, preprocess_images
        from service.preprocess import Preprocessor

        return preprocess_images(default_image_bytes(64), Preprocessor(self.ckpt.preprocessing))

    def entry(self, kind: str, device: str):
        """The manifest entry of a built file, with what the service reads from it: an INT8 file's quantisation
        (dynamic INT8 runs one image per call), a plan's build facts."""
        f = self.file(kind)
        if kind == "plan":
            entry = engine_entry(f, "fp16", self.h, self.w, self.labels, self.max_batch, device, fmt="tensorrt")
            return entry.model_copy(update={"build": self._plan_facts})
        entry = engine_entry(f, kind.split("-")[0], self.h, self.w, self.labels, self.max_batch, device)
        return entry.model_copy(update={"quantization": self._quant.get(kind)})

    # service engines, fed host arrays exactly as the batcher feeds them
    def ort(self, provider: str, kind: str):
        from service.engines.onnxruntime_engine import OnnxRuntimeEngine

        entry = self.entry(kind, "cpu" if provider == "cpu" else "cuda")
        eng = OnnxRuntimeEngine(self.file(kind), entry, (self.h, self.w), provider=provider, trt_cache_dir=self.work / "trt_cache")
        return self._host_runner(eng.run)

    def trt_native(self):
        from service.engines.tensorrt_engine import TensorRTEngine

        return self._host_runner(TensorRTEngine(self.file("plan"), self.entry("plan", "cuda"), (self.h, self.w)).run)

    def torch_cpu(self):
        from service.engines.torch_engine import TorchEngine

        f = self.checkpoint / "model.safetensors"
        eng = TorchEngine(f, engine_entry(f, "fp32", self.h, self.w, self.labels, self.max_batch, "any", fmt="safetensors"),
                          (self.h, self.w), device="cpu", precision="fp32")
        return self._host_runner(eng.run)

    def _host_runner(self, run):
        def for_batch(b: int):
            x = np.random.default_rng(0).standard_normal((b, 3, self.h, self.w)).astype(np.float32)
            return lambda: run(x)

        return for_batch

    # PyTorch on CUDA: device-resident inputs, logits only (no host copies) — model compute as the GPU sees it
    def _torch_cuda_model(self, precision: str):
        import torch
        from transformers import ViTForImageClassification

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        model = ViTForImageClassification.from_pretrained(self.checkpoint, dtype=dtype, attn_implementation="sdpa")
        return model.to("cuda").eval(), dtype

    def _device_runner(self, model, dtype, compile_calls: int = 0):
        import torch

        def for_batch(b: int):
            x = torch.randn(b, 3, self.h, self.w, device="cuda", dtype=dtype)

            def call():
                with torch.inference_mode():
                    return model(pixel_values=x).logits

            for _ in range(compile_calls):  # compile (and autotune) for this shape before the timed warm-up
                call()
            return call

        return for_batch

    def torch_cuda_eager(self, precision: str):
        return self._device_runner(*self._torch_cuda_model(precision))

    def torch_cuda_graph(self, precision: str):
        """One CUDA graph per batch size, captured per the torch.cuda.graph docs: warm up on a side stream,
        capture with static input/output tensors, then replay."""
        import torch

        model, dtype = self._torch_cuda_model(precision)

        from service.engines.torch_engine import capture_cuda_graph

        def for_batch(b: int):
            static_x = torch.randn(b, 3, self.h, self.w, device="cuda", dtype=dtype)
            graph, static_logits = capture_cuda_graph(model, static_x)
            return lambda: (graph.replay(), static_logits)[1]  # the output tensor stays referenced

        return for_batch

    def torch_cuda_compiled(self, precision: str, mode: str):
        import torch

        model, dtype = self._torch_cuda_model(precision)
        return self._device_runner(torch.compile(model, mode=mode, dynamic=False), dtype, compile_calls=2)


