"""Engine sweep: every engine this machine can run × a batch-size grid → images/s and seconds per batch.

    vitserve bench engines --config vit-small                # random weights from a named config (nothing downloaded)
    vitserve bench engines --checkpoint path/to/hf-vit-dir   # a real checkpoint
    vitserve bench engines --config tiny --batches 1,4 --min-seconds 0.2 --no-write   # seconds, for a smoke test

Variants are built in a temporary directory with the export code (``export.onnx_export``) and run through the
service's own engine classes where one exists (so INT8's one-image-per-call rule and host↔device copies are
measured as served):

- CPU: ONNX Runtime FP32, ONNX Runtime INT8 (dynamic, one image per call; static QDQ, batched), PyTorch FP32 (SDPA).
- CUDA GPU: PyTorch FP16 and BF16 eager (SDPA); FP16 captured in a CUDA graph per batch size (``torch.cuda.graph``);
  BF16 under ``torch.compile``; ONNX Runtime CUDA and TensorRT EPs on the FP16 graph where onnxruntime-gpu provides
  them; a native TensorRT FP16 plan where the tensorrt package is installed. On a GPU the sweep also measures the
  device's own dense rate with a large BF16 matmul, and reports each row's model FLOP rate as a fraction of it.

Each (engine, batch): one warm-up call (compilation/graph capture before it), then calls until both 3 repeats and
``--min-seconds`` are reached, synchronising the device around each; the median is reported. The PyTorch CUDA rows
time device-resident inputs (model compute only); ONNX Runtime and TensorRT rows go through ``engine.run`` with host
arrays (copies included), as the service calls them.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import NO_GPU, checkpoint_for, command_line, cpu_snapshot, environment, finish, load_average, other_cpu_load, wait_until_quiet
from benchmarks.models import CONFIGS, checkpoint_shape, vit_flops
from benchmarks.peers.raw_engine import time_call
from service.engines import ort_has  # the service's own checks: the sweep sees what `auto` sees
from service.hardware import cuda_available

MATMUL_N = 8192  # BF16 (8192×8192)·(8192×8192): large enough to reach a GPU's dense tensor-core rate


@dataclass
class Variant:
    name: str
    device: str  # "cpu" | "cuda"
    build: Callable[[], Callable[[int], Callable[[], object]]]  # → (batch → a no-arg call running one batch)
    note: str = ""


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---- the device's own rate -------------------------------------------------------------------------------------
def matmul_rate(n: int = MATMUL_N, iters: int = 50) -> dict:
    """Dense BF16 matmul FLOP/s measured now, on this GPU (the denominator for 'fraction of the device')."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    return {"n": n, "dtype": "bfloat16", "iters": iters, "tflops": round(2 * n**3 * iters / seconds / 1e12, 2)}


# ---- variants ---------------------------------------------------------------------------------------------------
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
                from export.tensorrt_build import build_plan

                from export.pipeline import ExportOptions

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


def variants(builds: Builds, devices: set[str], compile_mode: str) -> tuple[list[Variant], dict[str, str]]:
    """The variants to run here, and the ones skipped with the reason."""
    out: list[Variant] = []
    skipped: dict[str, str] = {}
    if "cpu" in devices:
        out += [
            Variant("onnxruntime-cpu-fp32", "cpu", lambda: builds.ort("cpu", "fp32")),
            Variant("onnxruntime-cpu-int8-dynamic", "cpu", lambda: builds.ort("cpu", "int8-dynamic"), "one image per call (dynamic INT8 is batch-dependent)"),
            Variant("onnxruntime-cpu-int8-static", "cpu", lambda: builds.ort("cpu", "int8-static"), "calibrated QDQ, batches"),
            Variant("pytorch-cpu-fp32", "cpu", builds.torch_cpu),
        ]
    gpu_names = ["pytorch-cuda-fp16", "pytorch-cuda-bf16", "pytorch-cuda-fp16-cudagraph", "pytorch-cuda-bf16-compile",
                 "onnxruntime-cuda-fp16", "onnxruntime-tensorrt-fp16", "tensorrt-cuda-fp16"]
    if not cuda_available():
        return out, {n: NO_GPU for n in gpu_names}
    if "cuda" not in devices:
        return out, {n: "not requested (--devices)" for n in gpu_names}
    out += [
        Variant("pytorch-cuda-fp16", "cuda", lambda: builds.torch_cuda_eager("fp16"), "device-resident input"),
        Variant("pytorch-cuda-bf16", "cuda", lambda: builds.torch_cuda_eager("bf16"), "device-resident input"),
        Variant("pytorch-cuda-fp16-cudagraph", "cuda", lambda: builds.torch_cuda_graph("fp16"), "torch.cuda.graph replay"),
        Variant("pytorch-cuda-bf16-compile", "cuda", lambda: builds.torch_cuda_compiled("bf16", compile_mode), f"torch.compile mode={compile_mode}"),
    ]
    if ort_has("CUDAExecutionProvider"):
        out.append(Variant("onnxruntime-cuda-fp16", "cuda", lambda: builds.ort("cuda", "fp16"), "host arrays in/out"))
    else:
        skipped["onnxruntime-cuda-fp16"] = "ONNX Runtime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if ort_has("TensorrtExecutionProvider"):
        out.append(Variant("onnxruntime-tensorrt-fp16", "cuda", lambda: builds.ort("tensorrt", "fp16"), "host arrays in/out"))
    else:
        skipped["onnxruntime-tensorrt-fp16"] = "ONNX Runtime has no TensorrtExecutionProvider"
    if importlib.util.find_spec("tensorrt") is not None:
        out.append(Variant("tensorrt-cuda-fp16", "cuda", builds.trt_native, "native plan, host arrays in/out"))
    else:
        skipped["tensorrt-cuda-fp16"] = "the tensorrt package is not installed"
    return out, skipped


# ---- the sweep -------------------------------------------------------------------------------------------------
def sweep(checkpoint: Path, work: Path, *, batches: list[int], devices: set[str], only: list[str] | None,
          min_seconds: float, compile_mode: str, log=print) -> dict:
    builds = Builds(checkpoint, work, max_batch=max(batches))
    flops = vit_flops(builds.shape)
    vs, skipped = variants(builds, devices, compile_mode)
    if only:
        unknown = set(only) - {v.name for v in vs} - set(skipped)
        if unknown:
            raise ValueError(f"unknown engine variant(s) {sorted(unknown)}; known here: {[v.name for v in vs]}")
        skipped.update({v.name: "not selected (--engines)" for v in vs if v.name not in only})
        vs = [v for v in vs if v.name in only]
    peak = matmul_rate() if any(v.device == "cuda" for v in vs) else None
    if peak:
        log(f"  device dense BF16 matmul: {peak['tflops']} TFLOP/s")
    rows = []
    for v in vs:
        try:
            t = time.perf_counter()
            for_batch = v.build()
            build_s = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - one engine failing to build must not lose the others' figures
            skipped[v.name] = f"failed to build: {type(e).__name__}: {e}"
            log(f"  {v.name}: skipped ({skipped[v.name]})")
            continue
        for b in batches:
            try:
                call = for_batch(b)

                def timed(call=call, dev=v.device):
                    call()
                    _sync(dev)

                cpu0 = cpu_snapshot()
                r = time_call(timed, warmup=1, min_repeats=3, min_seconds=min_seconds)
                cpu = other_cpu_load(cpu0, cpu_snapshot())
            except Exception as e:  # noqa: BLE001
                rows.append({"engine": v.name, "device": v.device, "batch": b, "error": f"{type(e).__name__}: {e}"})
                log(f"  {v.name} batch {b}: failed ({type(e).__name__}: {e})")
                continue
            ips = b / r["median_s"]
            row = {
                "engine": v.name, "device": v.device, "batch": b, "seconds_per_batch": round(r["median_s"], 9),
                "ms_per_batch": round(r["median_s"] * 1000, 3), "images_per_s": round(ips, 3), "repeats": r["repeats"],
                "spread_ms": [round(r["min_s"] * 1000, 3), round(r["max_s"] * 1000, 3)],
                "model_tflops": round(ips * flops["total"] / 1e12, 4), "note": v.note, "build_s": round(build_s, 2),
                "other_processes_cores": cpu["other_processes_cores"],  # CPU other jobs took meanwhile (should be ~0)
            }
            if peak and v.device == "cuda":
                row["fraction_of_matmul"] = round(ips * flops["total"] / 1e12 / peak["tflops"], 4)
            rows.append(row)
            log(f"  {v.name:<30} batch {b:>4}: {ips:9.2f} img/s  {r['median_s'] * 1000:9.2f} ms/batch  other CPU {cpu['other_processes_cores']:.2f}"
                + (f"  {row['fraction_of_matmul']:.2f} of matmul" if "fraction_of_matmul" in row else ""))
    ok = [r for r in rows if "images_per_s" in r]
    best = {}
    for r in ok:
        if r["engine"] not in best or r["images_per_s"] > best[r["engine"]]["images_per_s"]:
            best[r["engine"]] = {"batch": r["batch"], "images_per_s": r["images_per_s"], **({"fraction_of_matmul": r["fraction_of_matmul"]} if "fraction_of_matmul" in r else {})}
    targets = {}
    gpu_best = [r for r in ok if "fraction_of_matmul" in r]
    if gpu_best:
        top = max(gpu_best, key=lambda r: r["fraction_of_matmul"])
        targets["gpu_engine_fraction_of_matmul"] = {
            "target": 0.75, "measured": top["fraction_of_matmul"], "engine": top["engine"], "batch": top["batch"],
            "met": top["fraction_of_matmul"] >= 0.75,
            "shortfall": None if top["fraction_of_matmul"] >= 0.75 else round(0.75 - top["fraction_of_matmul"], 4),
        }
    else:
        targets["gpu_engine_fraction_of_matmul"] = {"target": 0.75, "met": None, "why": "no GPU variant ran on this machine"}
    return {"flops_per_image": flops, "matmul": peak, "rows": rows, "best": best, "skipped": skipped, "targets": targets}


def table(result: dict) -> str:
    has_frac = result["matmul"] is not None
    head = "| engine | batch | img/s | ms/batch | model TFLOP/s |" + (" fraction of matmul |" if has_frac else "") + " other procs' CPU | note |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['batch']} | failed: {r['error'][:80]} |")
            continue
        frac = f" {r.get('fraction_of_matmul', '-')} |" if has_frac else ""
        lines.append(f"| {r['engine']} | {r['batch']} | {r['images_per_s']:.2f} | {r['ms_per_batch']:.2f} | {r['model_tflops']:.3f} |{frac} "
                     f"{r['other_processes_cores']:.2f} | {r['note']} |")
    if result["matmul"]:
        lines.append(f"\nDevice dense BF16 matmul ({result['matmul']['n']}³): **{result['matmul']['tflops']} TFLOP/s**.")
    if result["skipped"]:
        lines.append("\nNot run here: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()) + ".")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve bench engines", description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="HF ViTForImageClassification directory")
    src.add_argument("--config", choices=sorted(CONFIGS), default="vit-small", help="random-weight model of this size (when no --checkpoint)")
    p.add_argument("--batches", default=None, help="batch sizes (default: 1,4,16,32 on CPU; 1,8,32,64,128 on a GPU)")
    p.add_argument("--devices", default=None, help="cpu, cuda or cpu,cuda (default: cuda where a GPU is visible, else cpu)")
    p.add_argument("--engines", default="", help="only these variants, comma-separated (default: every one available)")
    p.add_argument("--min-seconds", type=float, default=2.0, help="measure each (engine, batch) for at least this long")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for the compiled variant")
    p.add_argument("--workdir", type=Path, default=None, help="keep the exported variants here (default: a temp dir, removed)")
    p.add_argument("--name", default=None, help="result file prefix (default: engine-sweep_<config>)")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    p.add_argument("--wait-quiet", type=float, default=300.0,
                   help="first wait up to this long for other processes to use < 0.3 cores (0: start at once)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks.cli import quiet_libraries

    quiet_libraries()
    gpu = cuda_available()
    devices = set((args.devices or ("cuda" if gpu else "cpu")).split(","))
    batches = [int(b) for b in (args.batches or ("1,8,32,64,128" if "cuda" in devices and gpu else "1,4,16,32")).split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vitserve-engine-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    quiet = wait_until_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    load_before = load_average()
    try:
        ckpt, model_name = checkpoint_for(args, work)
        shape = checkpoint_shape(ckpt)
        print(f"engine sweep: {model_name} ({shape}), batches {batches}, devices {sorted(devices)}")
        result = sweep(ckpt, work, batches=batches, devices=devices, only=[e for e in args.engines.split(",") if e] or None,
                       min_seconds=args.min_seconds, compile_mode=args.compile_mode)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    payload = {
        "benchmark": "engine_sweep", "command": command_line("engines", argv),
        "environment": environment(), "load_average": {"before": load_before, "after": load_average()}, "quiet_before_start": quiet,
        "model": {"name": model_name, "shape": shape.__dict__, "random_weights": not args.checkpoint},
        "settings": {"batches": batches, "devices": sorted(devices), "min_seconds": args.min_seconds, "compile_mode": args.compile_mode},
        **result,
    }
    md = table(result)
    rows = [(k, f"best {v['images_per_s']:.2f} img/s at batch {v['batch']}" + (f", {v['fraction_of_matmul']:.2f} of matmul" if "fraction_of_matmul" in v else ""))
            for k, v in result["best"].items()]
    rows.append(("flops/image", f"{result['flops_per_image']['total'] / 1e9:.2f} GFLOP"))
    busiest = max((r.get("other_processes_cores", 0) for r in result["rows"]), default=0)
    payload["valid"] = busiest <= 0.25
    rows.append(("other procs' CPU", f"up to {busiest:.2f} cores in a row's window ({'ok' if busiest <= 0.25 else 'CONTENDED: figures skewed'})"))
    rows.append(("matmul", f"{result['matmul']['tflops']} TFLOP/s" if result["matmul"] else "n/a (no GPU)"))
    t = result["targets"]["gpu_engine_fraction_of_matmul"]
    rows.append(("target ≥0.75 matmul", "n/a (no GPU)" if t["met"] is None else f"{'MET' if t['met'] else 'MISSED'} ({t['measured']:.2f})"))
    return finish("engine sweep", payload, rows, table=md, name=None if args.no_write else args.name or f"engine-sweep_{model_name}")


if __name__ == "__main__":
    sys.exit(main())
