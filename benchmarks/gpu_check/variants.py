"""The engines a model is swept through: the service's own, and the check's CUDA-graph and torch.compile wrappers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from benchmarks.gpu_check.run import Run
from benchmarks.harness.results import NO_GPU
from benchmarks.harness.sweep import Variant

if TYPE_CHECKING:
    from benchmarks.gpu_check.engines import ModelContext

class CudaGraphBuckets:
    """The service's PyTorch engine replayed from one CUDA graph per batch bucket. TorchEngine offers no CUDA graphs,
    so this is the check's own: a batch is padded with zero rows up to the smallest bucket that holds it (as the
    batcher pads for VITSERVE_BATCH_BUCKETS), copied into the graph's static input, and the graph replayed."""

    def __init__(self, engine, buckets):
        self.engine, self.buckets = engine, tuple(sorted(buckets))
        self.name, self.device, self.input_size = f"{engine.name}-cudagraph", engine.device, engine.input_size
        self.max_batch_size = min(engine.max_batch_size, self.buckets[-1])
        self._graphs: dict[int, tuple] = {}

    def _capture(self, bucket: int) -> tuple:
        from service.engines.torch_engine import capture_cuda_graph

        static_x = self.engine._torch.zeros(bucket, 3, *self.input_size, device="cuda", dtype=self.engine._dtype)
        return (*capture_cuda_graph(self.engine._model, static_x), static_x)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        bucket = next(b for b in self.buckets if b >= n)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        graph, static_logits, static_x = self._graphs[bucket]
        static_x[:n].copy_(self.engine._torch.from_numpy(pixels))  # host → device and FP32 → FP16/BF16 in one copy
        static_x[n:].zero_()
        graph.replay()
        return static_logits[:n].float().cpu().numpy()

    def describe(self) -> dict:
        return {**self.engine.describe(), "engine": self.name, "cuda_graph_buckets": list(self.buckets)}


def compiled(engine, *, backend: str, mode: str):
    """The engine with its model under torch.compile. TorchEngine offers none, so this is the check's own; its run()
    is unchanged. dynamic=True: one graph serves every batch size above 1 (Dynamo specialises 1), where a compile
    per size would not fit the run's time."""
    import torch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # Above the sizes a sweep and the parity check take, so that Dynamo never falls back to eager silently.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    options = {"mode": mode} if backend == "inductor" else {}
    engine._model = torch.compile(engine._model, backend=backend, dynamic=True, **options)
    engine.name += "-compile"
    return engine


def compile_facts(backend: str, mode: str) -> dict:
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {"backend": backend, "mode": mode if backend == "inductor" else None, "dynamic": True,
            "graphs": int(counters["stats"].get("unique_graphs", 0)), "graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": [str(r)[:200] for r in list(breaks)[:5]]}


def engine_offers() -> dict:
    """TorchEngine's options for CUDA graphs or torch.compile, if it has grown any since this check was written."""
    import inspect

    from service.engines.torch_engine import TorchEngine

    params = list(inspect.signature(TorchEngine.__init__).parameters)
    return {"cuda_graphs": [p for p in params if "graph" in p], "torch_compile": [p for p in params if "compile" in p]}


def _whose(feature: str) -> str:
    offered = engine_offers()[feature]
    return f"this check's, though TorchEngine now takes {offered}: use those" if offered else "this check's (TorchEngine has none)"


def torch_engine(ctx: ModelContext, device: str, precision: str):
    from service.engines.torch_engine import TorchEngine

    return TorchEngine(ctx.checkpoint / "model.safetensors", ctx.entry, tuple(ctx.ckpt.preprocessing.input_size), device=device, precision=precision)


def onnx_engine(run: Run, ctx: ModelContext, kind: str):
    """ONNX Runtime's CUDA/TensorRT EP on the FP16 ONNX, or native TensorRT on a plan built from it: the files built
    as the engine sweep builds them, loaded by the service's build_engine."""
    from benchmarks.harness.engine_builds import Builds
    from service.engines import build_engine

    work = run.work / f"onnx-{ctx.key}"
    work.mkdir(parents=True, exist_ok=True)
    builds = run.cached(f"onnx-builds/{ctx.key}", lambda: Builds(ctx.checkpoint, work, max(run.plan.batches)))
    built = "plan" if kind == "tensorrt" else "fp16"
    return build_engine(kind, builds.file(built), builds.entry(built, "cuda"), (builds.h, builds.w), trt_cache_dir=builds.work / "trt_cache")


def engine_variants(run: Run, ctx: ModelContext) -> tuple[list[Variant], dict[str, str]]:
    """Every engine this machine can run the model on (compile aside: its own step), and the others with the reason."""
    import importlib.util

    from service.engines import ort_has

    buckets = run.plan.batches
    eager = "the service's TorchEngine (SDPA), host arrays in and out as the batcher calls it"
    graphs = f"CUDA graph per batch bucket {list(buckets)}, {_whose('cuda_graphs')}"
    gpu = [
        Variant("pytorch-cuda-fp16", "cuda", lambda: torch_engine(ctx, "cuda", "fp16"), eager + "; what `auto` serves on a GPU", precision="fp16"),
        Variant("pytorch-cuda-bf16", "cuda", lambda: torch_engine(ctx, "cuda", "bf16"), eager, precision="bf16"),
        Variant("pytorch-cuda-fp16-cudagraph", "cuda", lambda: CudaGraphBuckets(torch_engine(ctx, "cuda", "fp16"), buckets), graphs, precision="fp16", weight=1.3),
        Variant("pytorch-cuda-bf16-cudagraph", "cuda", lambda: CudaGraphBuckets(torch_engine(ctx, "cuda", "bf16"), buckets), graphs, precision="bf16", weight=1.3),
    ]
    onnx = {
        "onnxruntime-cuda-fp16": ("onnxruntime-cuda", lambda: ort_has("CUDAExecutionProvider"), "ONNX Runtime has no CUDAExecutionProvider here (the CPU build `onnxruntime`; onnxruntime-gpu is not installed)"),
        "onnxruntime-tensorrt-fp16": ("onnxruntime-tensorrt", lambda: ort_has("TensorrtExecutionProvider"), "ONNX Runtime has no TensorrtExecutionProvider here"),
        "tensorrt-cuda-fp16": ("tensorrt", lambda: importlib.util.find_spec("tensorrt") is not None, "the tensorrt package is not installed"),
    }  # fmt: skip
    if not run.cuda:
        skipped = {v.name: NO_GPU for v in gpu}
        skipped |= {name: NO_GPU + ("" if usable() else f"; also: {why}") for name, (_, usable, why) in onnx.items()}
        cpu = Variant("pytorch-cpu-fp32", "cpu", lambda: torch_engine(ctx, "cpu", "fp32"), eager + "; the CPU stand-in for the GPU rows", precision="fp32")
        return [cpu], skipped
    out, skipped = list(gpu), {"pytorch-cpu-fp32": "GPU machine: the budget goes to the GPU engines"}
    for name, (kind, usable, why) in onnx.items():
        if usable():
            out.append(Variant(name, "cuda", lambda kind=kind: onnx_engine(run, ctx, kind), f"{kind} on the FP16 ONNX, host arrays in and out", precision="fp16", weight=2.0))
        else:
            skipped[name] = why
    return out, skipped


# torch.compile's budget, a judgement: Dynamo specialises batch 1, so a batch-1 call compiles ViT-L a second time (about
# a minute each on an H100). The sweep skips batch 1 (eager's row has it) and runs before the gate, whose one-image
# calls trigger that second compile; the step runs in a child process killed at its budget, keeping what it saved.
def compile_variants(run: Run, ctx: ModelContext) -> tuple[list[Variant], dict[str, str]]:
    mode = run.args.compile_mode
    batches = tuple(b for b in run.plan.batches if b > 1)
    why = "; batch 1 is not swept (a second compile; eager's row has it) and the gate runs after the sweep"
    if not run.cuda:
        return [Variant(
            "pytorch-cpu-fp32-compile", "cpu", lambda: compiled(torch_engine(ctx, "cpu", "fp32"), backend="eager", mode=mode),
            "torch.compile(backend=eager, dynamic=True): a rehearsal of the wrapper and of Dynamo's capture, not an Inductor speed" + why,
            precision="fp32", after=lambda: compile_facts("eager", mode), batches=batches, gate_last=True,
        )], {"pytorch-cuda-fp16-compile": NO_GPU}
    eager = Variant(
        "pytorch-cuda-fp16-compile-eager-backend", "cuda", lambda: compiled(torch_engine(ctx, "cuda", "fp16"), backend="eager", mode=mode),
        "fallback after Inductor failed: Dynamo's capture with the eager backend, no Inductor kernels (eager's speed)" + why,
        precision="fp16", after=lambda: compile_facts("eager", mode), batches=batches, gate_last=True,
    )
    return [Variant(
        "pytorch-cuda-fp16-compile", "cuda", lambda: compiled(torch_engine(ctx, "cuda", "fp16"), backend="inductor", mode=mode),
        f"torch.compile(backend=inductor, mode={mode}, dynamic=True), {_whose('torch_compile')}" + why,
        precision="fp16", after=lambda: compile_facts("inductor", mode), fallback=eager, batches=batches, gate_last=True,
    )], {}
