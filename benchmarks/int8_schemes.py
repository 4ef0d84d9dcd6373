"""INT8 schemes side by side: the old full-range dynamic INT8 against the two saturation-free ones export now offers.

    vitserve bench int8 --config vit-small                       # random weights (nothing downloaded), ~6 min on 2 cores
    vitserve bench int8 --checkpoint service/demo_artifact/pytorch --calibration-dir data/fashion-mnist/test \\
        --emulate-avx2 256                                       # the trained demo model, also on an emulated AVX2 CPU

Each scheme is built from the same FP32 ONNX with export's own functions, timed through the service's engine class
exactly as served (the two dynamic schemes one image per call, static in batches) at batch 1/4/8/32, and judged
against FP32 PyTorch with the gate's own function (service.parity.compare, INT8 thresholds) on the same images.

- ``old``: what vitserve shipped before, dynamic with full 8-bit weights. On x86 without VNNI, ONNX Runtime's
  VPMADDUBSW sums u8 x s8 pairs into a saturating int16 lane, so its answers depend on the CPU.
- ``dynamic``: the same with 7-bit weights (export.onnx_export.quantize_int8_dynamic): no pair sum can saturate.
- ``static``: calibrated QDQ with 7-bit weights (quantize_int8_static): constant scales, so it batches.

``--emulate-avx2 N`` also runs every scheme on the first N images under ``qemu-x86_64 -cpu Haswell-v4`` (AVX2, no
AVX-512, no VNNI; Debian's qemu-user) and reports the same figures there: speed under emulation means nothing, parity
does. Results: benchmarks/results/int8-schemes_<model>_<env>.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness.measure import load_average, time_call
from benchmarks.harness.results import checkpoint_for, command_line, environment, finish
from benchmarks.models import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("old", "dynamic", "static")
BATCHES = (1, 4, 8, 32)
EMULATED_CPU = "Haswell-v4"


def build(checkpoint: Path, work: Path, *, images: int, calibration_dir: Path | None, calibration_images: int) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from export import gate_inputs
    from export.checkpoint import load_checkpoint
    from export.onnx_export import export_fp32, quantize_int8_dynamic, quantize_int8_static
    from service.preprocess import Preprocessor

    ckpt = load_checkpoint(str(checkpoint))
    pre = Preprocessor(ckpt.preprocessing)
    want = images + calibration_images
    source = gate_inputs.directory_image_bytes(calibration_dir, want) if calibration_dir else gate_inputs.default_image_bytes(want)
    gate, calibration = gate_inputs.split_calibration(source, calibration_images)
    pixels = gate_inputs.preprocess_images(gate, pre)
    fp32 = export_fp32(ckpt.model, work / "fp32.onnx", pre.input_size, max(BATCHES))
    files, quant, build_s = {}, {}, {}
    t = time.perf_counter()
    files["old"] = work / "old.onnx"
    quantize_dynamic(str(fp32), str(files["old"]), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
    build_s["old"] = time.perf_counter() - t
    t = time.perf_counter()
    files["dynamic"] = work / "dynamic.onnx"
    quant["dynamic"] = quantize_int8_dynamic(fp32, files["dynamic"])
    build_s["dynamic"] = time.perf_counter() - t
    t = time.perf_counter()
    files["static"] = work / "static.onnx"
    quant["static"] = quantize_int8_static(fp32, files["static"], gate_inputs.preprocess_images(calibration, pre))
    build_s["static"] = time.perf_counter() - t
    return {
        "ckpt": ckpt, "pixels": pixels, "reference": gate_inputs.reference_logits(ckpt.model, pixels), "files": files,
        "fp32": fp32, "quant": quant, "build_s": build_s, "input_size": pre.input_size,
    }


def engine_for(scheme: str, b: dict, path: Path | None = None):
    """The service's ONNX Runtime engine on a scheme's file: its entry says whether it must run one image per call."""
    from benchmarks.harness.engine_builds import engine_entry
    from service.engines.onnxruntime_engine import OnnxRuntimeEngine

    path = path or b["files"][scheme]
    h, w = b["input_size"]
    entry = engine_entry(path, "fp32" if scheme == "fp32" else "int8", h, w, len(b["ckpt"].labels), max(BATCHES), "cpu")
    # The old file is dynamic too: one image per call, as the service ran it.
    quant = b["quant"].get(scheme) or (b["quant"]["dynamic"] if scheme == "old" else None)
    return OnnxRuntimeEngine(path, entry.model_copy(update={"quantization": quant}), (h, w))


def speed(engine, pixels: np.ndarray, min_seconds: float) -> dict[int, float]:
    out = {}
    for batch in BATCHES:
        x = pixels[np.arange(batch) % len(pixels)]
        out[batch] = round(batch / time_call(lambda: engine.run(x), warmup=1, min_repeats=3, min_seconds=min_seconds)["median_s"], 2)
    return out


def judge(b: dict, logits: np.ndarray, n: int | None = None) -> dict:
    from service.parity import DEFAULT_THRESHOLDS, compare

    ref = b["reference"][: len(logits)]
    r = compare(ref, logits, temperature=b["ckpt"].temperature, thresholds=DEFAULT_THRESHOLDS["int8"])
    return {"images": r.images, "top1_agreement": round(r.top1_agreement, 4), "top1_ci95": r.top1_agreement_ci95,
            "top5_overlap": round(r.top5_overlap, 4), "max_abs_logit_diff": round(r.max_abs_logit_diff, 4),
            "max_abs_prob_diff": round(r.max_abs_prob_diff, 4), "passed": r.passed, "failures": r.failures}


def emulated(b: dict, work: Path, n: int) -> dict:
    """Logits under QEMU's AVX2 CPU for each scheme (tests/onnx_logits.py, one image per call, one thread)."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        return {"skipped": "qemu-x86_64 not found (apt-get install qemu-user)"}
    np.save(work / "pixels.npy", b["pixels"][:n])
    out = {}
    for scheme in SCHEMES:
        dest = work / f"{scheme}-avx2.npy"
        cmd = [qemu, "-cpu", EMULATED_CPU, sys.executable, str(ROOT / "tests" / "onnx_logits.py"), str(b["files"][scheme]),
               str(work / "pixels.npy"), str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            out[scheme] = {"error": proc.stderr[-500:]}
            continue
        out[scheme] = judge(b, np.load(dest))
    return out


def run(args, log=print) -> dict:
    work = Path(tempfile.mkdtemp(prefix="vitserve-int8-"))
    try:
        ckpt_dir, _ = checkpoint_for(args, work)
        log(f"building FP32 ONNX and three INT8 files for {ckpt_dir} ({args.images} gate images)…")
        b = build(ckpt_dir, work, images=args.images, calibration_dir=args.calibration_dir, calibration_images=args.calibration_images)
        rows = {}
        for scheme in ("fp32", *SCHEMES):
            engine = engine_for(scheme, b, b["fp32"] if scheme == "fp32" else None)
            logits = np.concatenate([engine.run(b["pixels"][i : i + 16]) for i in range(0, len(b["pixels"]), 16)])
            rows[scheme] = {"engine": engine.name, "per_image": engine.per_image, "images_per_s": speed(engine, b["pixels"], args.min_seconds),
                            "parity": judge(b, logits), "quantization": b["quant"].get(scheme).model_dump() if b["quant"].get(scheme) else None,
                            "build_s": round(b["build_s"].get(scheme, 0.0), 1)}  # fmt: skip
            log(f"  {scheme:<8} {rows[scheme]['images_per_s']}  max|Δlogit| {rows[scheme]['parity']['max_abs_logit_diff']}")
        result = {"model": str(args.checkpoint or args.config), "random_weights": args.checkpoint is None, "schemes": rows}
        if args.emulate_avx2:
            log(f"the same files on an emulated AVX2 CPU ({EMULATED_CPU}), {args.emulate_avx2} images…")
            result["emulated_avx2"] = {"cpu": EMULATED_CPU, "images": args.emulate_avx2, "schemes": emulated(b, work, args.emulate_avx2)}
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(result: dict) -> str:
    head = "| scheme | engine | " + " | ".join(f"img/s b{b}" for b in BATCHES) + " | top-1 agree [95 % CI] | max \\|Δlogit\\| | max \\|Δprob\\| | INT8 gate |"
    lines = [head, "|" + "---|" * (len(BATCHES) + 6)]
    for scheme, r in result["schemes"].items():
        p = r["parity"]
        ci = p["top1_ci95"]
        lines.append(f"| {scheme} | {r['engine']}{' (per image)' if r['per_image'] else ''} | "
                     + " | ".join(f"{r['images_per_s'][b]:.1f}" for b in BATCHES)
                     + f" | {p['top1_agreement']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {p['max_abs_logit_diff']} | {p['max_abs_prob_diff']} | "
                     + ("PASS" if p["passed"] else "FAIL") + " |")
    if "emulated_avx2" in result:
        e = result["emulated_avx2"]
        lines += ["", f"Emulated AVX2 ({e['cpu']}, no AVX-512/VNNI), first {e['images']} images:", "",
                  "| scheme | top-1 agree | max \\|Δlogit\\| | max \\|Δprob\\| | INT8 gate |", "|---|---|---|---|---|"]
        for scheme, p in e["schemes"].items():
            if "error" in p or "skipped" in str(p):
                lines.append(f"| {scheme} | {p} |")
                continue
            lines.append(f"| {scheme} | {p['top1_agreement']:.4f} | {p['max_abs_logit_diff']} | {p['max_abs_prob_diff']} | {'PASS' if p['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve bench int8", description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", choices=sorted(CONFIGS), default="vit-small", help="random-weight model of this size")
    src.add_argument("--checkpoint", type=Path, help="HF ViT checkpoint directory")
    p.add_argument("--calibration-dir", type=Path, default=None, help="images (default: views of scikit-image's photographs)")
    p.add_argument("--images", type=int, default=512, help="images the parity figures are measured on")
    p.add_argument("--calibration-images", type=int, default=128, help="static INT8 calibration images (disjoint)")
    p.add_argument("--min-seconds", type=float, default=2.0, help="time each (scheme, batch) at least this long")
    p.add_argument("--emulate-avx2", type=int, default=0, metavar="N", help="also judge every scheme on N images under QEMU's AVX2 CPU")
    p.add_argument("--name", default=None, help="result file prefix (default: int8-schemes_<model>)")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks.cli import quiet_libraries

    quiet_libraries()
    load_before = load_average()
    result = run(args)
    payload = {"benchmark": "int8_schemes", "command": command_line("int8", argv),
               "environment": environment(), "load_average": {"before": load_before, "after": load_average()}, **result}
    md = table(result)
    print(md)
    rows = [(s, f"{r['images_per_s']} img/s by batch; max |Δlogit| {r['parity']['max_abs_logit_diff']}; gate {'PASS' if r['parity']['passed'] else 'FAIL'}")
            for s, r in result["schemes"].items()]
    name = args.name or f"int8-schemes_{Path(str(result['model'])).name if args.checkpoint else args.config}"
    return finish("int8 schemes", payload, rows, table=md, name=None if args.no_write else name)


if __name__ == "__main__":
    sys.exit(main())
