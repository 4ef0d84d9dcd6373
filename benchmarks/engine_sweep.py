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
from pathlib import Path

from benchmarks.harness.engine_builds import Builds
from benchmarks.harness.measure import load_average, wait_until_quiet
from benchmarks.harness.results import NO_GPU, checkpoint_for, command_line, environment, finish
from benchmarks.harness.sweep import Variant, matmul_tflops
from benchmarks.harness.sweep import sweep as harness_sweep
from benchmarks.models import CONFIGS, checkpoint_shape, vit_flops
from service.engines import ort_has  # the service's own checks: the sweep sees what `auto` sees
from service.hardware import cuda_available

MATMUL_N = 8192  # BF16 (8192×8192)·(8192×8192): large enough to reach a GPU's dense tensor-core rate


# ---- variants ---------------------------------------------------------------------------------------------------
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
    peak = matmul_tflops("cuda", "bf16", MATMUL_N) if any(v.device == "cuda" for v in vs) else None
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
        swept = harness_sweep(for_batch, batches, device=v.device, flops_per_image=flops["total"],
                              ceiling_tflops=peak["tflops"] if peak and v.device == "cuda" else None,
                              min_seconds=min_seconds, record_errors=True)
        for r in swept["rows"]:
            rows.append({"engine": v.name, "device": v.device, **r, "note": v.note, "build_s": round(build_s, 2)})
            if "error" in r:
                log(f"  {v.name} batch {r['batch']}: failed ({r['error']})")
                continue
            log(f"  {v.name:<30} batch {r['batch']:>4}: {r['images_per_s']:9.2f} img/s  {r['ms_per_batch']:9.2f} ms/batch  other CPU {r['other_processes_cores']:.2f}"
                + (f"  {r['fraction_of_matmul']:.2f} of matmul" if r["fraction_of_matmul"] is not None else ""))
    ok = [r for r in rows if "images_per_s" in r]
    best = {}
    for r in ok:
        if r["engine"] not in best or r["images_per_s"] > best[r["engine"]]["images_per_s"]:
            best[r["engine"]] = {"batch": r["batch"], "images_per_s": r["images_per_s"], **({"fraction_of_matmul": r["fraction_of_matmul"]} if r["fraction_of_matmul"] is not None else {})}
    targets = {}
    gpu_best = [r for r in ok if r["fraction_of_matmul"] is not None]
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
        frac = f" {r['fraction_of_matmul'] if r['fraction_of_matmul'] is not None else '-'} |" if has_frac else ""
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
