"""checkpoint → ONNX → engines → validated artifact. The CLI is a thin wrapper around :func:`export_artifact`."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export import parity
from export.checkpoint import load_checkpoint
from export.onnx_export import INPUT_NAME, OUTPUT_NAME, convert_fp16, export_fp32, quantize_int8
from service.artifact import (
    Artifact,
    EngineFile,
    Manifest,
    ModelInfo,
    ParityReport,
    ParityThresholds,
    SourceInfo,
    TensorSpec,
    sha256_file,
    write_manifest,
)
from service.engines import build_engine
from service.engines.base import Engine
from service.preprocess import Preprocessor

log = logging.getLogger("vitserve.export")


@dataclass
class ExportOptions:
    checkpoint: str
    output: Path
    name: str | None = None
    version: str = "1"
    max_batch: int = 64
    opt_batch: int = 16
    tensorrt: bool = False
    include_pytorch: bool = True
    calibration_dir: Path | None = None
    max_images: int = 96
    cpu_candidates: tuple[str, ...] = ("fp32", "int8")
    cpu_bench_batch: int = 8
    thresholds: dict[str, ParityThresholds] = field(default_factory=lambda: dict(parity.DEFAULT_THRESHOLDS))
    force: bool = False


@dataclass
class ExportResult:
    manifest: Manifest
    reports: dict[str, ParityReport]
    passed: bool
    report_path: Path
    timings_s: dict[str, float]


def _versions() -> dict[str, str | None]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    try:
        import tensorrt

        trt_version = tensorrt.__version__
    except ImportError:
        trt_version = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tensorrt": trt_version,
    }


def _io_specs(h: int, w: int, num_labels: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    # Graph I/O stays FP32 for every precision (see export/onnx_export.py).
    return (
        [TensorSpec(name=INPUT_NAME, dtype="float32", shape=["batch", 3, h, w])],
        [TensorSpec(name=OUTPUT_NAME, dtype="float32", shape=["batch", num_labels])],
    )


def export_artifact(opts: ExportOptions) -> ExportResult:
    if opts.tensorrt:
        from export.tensorrt_build import ensure_available

        ensure_available()
    out = Path(opts.output)
    if out.exists() and any(out.iterdir()):
        if not opts.force:
            raise FileExistsError(f"{out} is not empty; pass --force to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    ckpt = load_checkpoint(opts.checkpoint)
    pre = Preprocessor(ckpt.preprocessing)
    h, w = pre.input_size
    timings["load_checkpoint"] = time.perf_counter() - t0

    images = (
        parity.directory_image_bytes(opts.calibration_dir, opts.max_images)
        if opts.calibration_dir
        else parity.default_image_bytes(opts.max_images)
    )
    pixels = parity.preprocess_images(images, pre)  # (N, 3, H, W) through the serving path
    t = time.perf_counter()
    reference = parity.reference_logits(ckpt.model, pixels)
    timings["reference_fp32"] = time.perf_counter() - t
    log.info("reference: FP32 PyTorch on %d images", len(pixels))

    t = time.perf_counter()
    fp32_path = export_fp32(ckpt.model, out / "model.fp32.onnx", (h, w), opts.max_batch)
    timings["export_onnx_fp32"] = time.perf_counter() - t
    t = time.perf_counter()
    fp16_path = convert_fp16(fp32_path, out / "model.fp16.onnx")
    timings["convert_fp16"] = time.perf_counter() - t
    inputs, outputs = _io_specs(h, w, len(ckpt.labels))

    def entry(path: Path, fmt: str, precision: str, device: str, **kw) -> EngineFile:
        return EngineFile(
            file=str(path.relative_to(out)),
            format=fmt,
            precision=precision,
            device=device,
            inputs=inputs,
            outputs=outputs,
            min_batch=1,
            opt_batch=min(opts.opt_batch, opts.max_batch),
            max_batch=opts.max_batch,
            sha256=sha256_file(path),
            **kw,
        )

    # A manifest of everything built so far; engines are loaded through the service's own loader.
    draft = Manifest(
        model=ModelInfo(
            name=opts.name or ckpt.name,
            version=opts.version,
            architecture=ckpt.architecture,
            num_parameters=sum(p.numel() for p in ckpt.model.parameters()),
        ),
        labels=ckpt.labels,
        preprocessing=ckpt.preprocessing,
        temperature=ckpt.temperature,
        engines=[entry(fp16_path, "onnx", "fp16", "cuda")],
        source=SourceInfo(checkpoint=opts.checkpoint, sha256=ckpt.source_sha256),
        versions=_versions(),
    )
    reports: dict[str, ParityReport] = {}
    built: dict[str, Engine] = {}

    def gate(kind: str, e: EngineFile) -> EngineFile:
        t = time.perf_counter()
        engine = built[e.file] = build_engine(kind, Artifact(out, draft), e)
        report = parity.check_engine(
            engine, pixels, reference, temperature=ckpt.temperature, thresholds=opts.thresholds[e.precision]
        )
        timings[f"parity_{e.file}"] = time.perf_counter() - t
        reports[f"{e.file} ({kind})"] = report
        return e.model_copy(update={"parity": report})

    # The FP16 graph is meant for CUDA, but ORT's CPU EP runs it too: its gate runs here, on any machine.
    fp16_entry = gate("onnxruntime-cpu", draft.engines[0])

    # CPU engine: measure each candidate, ship the fastest one that passes the gate, delete the others.
    cpu_entries: dict[str, EngineFile] = {}
    cpu_timing: dict[str, dict] = {}
    for precision in opts.cpu_candidates:
        if precision == "fp32":
            path = fp32_path
        elif precision == "int8":
            t = time.perf_counter()
            path = quantize_int8(fp32_path, out / "model.int8.onnx")
            timings["quantize_int8"] = time.perf_counter() - t
        else:
            raise ValueError(f"unknown CPU candidate precision {precision!r} (fp32, int8)")
        e = gate("onnxruntime-cpu", entry(path, "onnx", precision, "cpu"))
        secs = time_engine(built[e.file], (h, w), opts.cpu_bench_batch)
        cpu_timing[precision] = {
            "seconds_per_batch": secs,
            "images_per_s": opts.cpu_bench_batch / secs,
            "batch": opts.cpu_bench_batch,
            "passed_gate": e.parity.passed,
        }
        cpu_entries[precision] = e
    passing = [p for p in cpu_entries if cpu_entries[p].parity.passed]
    chosen = min(passing or list(cpu_entries), key=lambda p: cpu_timing[p]["seconds_per_batch"])
    for p, e in cpu_entries.items():
        if p != chosen:
            (out / e.file).unlink()
    engines = [fp16_entry, cpu_entries[chosen]]
    export_report: dict = {
        "cpu_engine": {"chosen": chosen, "candidates": cpu_timing, "rule": "fastest candidate that passes the gate"}
    }

    if opts.include_pytorch:
        weights_dir = out / "pytorch"
        ckpt.model.model.save_pretrained(weights_dir, safe_serialization=True)
        # With the image-processor config beside the weights, the folder is a complete HF checkpoint
        # (transformers' pipeline() loads it as-is; the naive-service benchmark peer does exactly that).
        if ckpt.preprocessing_source is not None:
            shutil.copy(ckpt.preprocessing_source, weights_dir / "preprocessor_config.json")
        engines.append(gate("pytorch-cpu", entry(weights_dir / "model.safetensors", "safetensors", "fp32", "any")))

    if opts.tensorrt:
        from export.tensorrt_build import build_plan

        t = time.perf_counter()
        plan = out / "model.fp16.plan"
        facts = build_plan(
            fp16_path,
            plan,
            input_name=INPUT_NAME,
            input_size=(h, w),
            min_batch=1,
            opt_batch=min(opts.opt_batch, opts.max_batch),
            max_batch=opts.max_batch,
            timing_cache=out / "tensorrt.timing.cache",
        )
        timings["build_tensorrt"] = time.perf_counter() - t
        draft = draft.model_copy(update={"engines": draft.engines + [entry(plan, "tensorrt", "fp16", "cuda", build=facts)]})
        engines.append(gate("tensorrt", draft.engines[-1]))

    timings["total"] = time.perf_counter() - t0
    export_report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    export_report["parity_images"] = {"count": len(images), "source": str(opts.calibration_dir or "scikit-image photographs")}
    manifest = draft.model_copy(update={"engines": engines, "export_report": export_report})
    write_manifest(out, manifest)
    passed = all(e.parity is None or e.parity.passed for e in engines)
    report_path = out / "parity_report.json"
    report_path.write_text(
        json.dumps(
            {"passed": passed, "engines": {k: r.model_dump() for k, r in reports.items()}, **export_report}, indent=2
        )
        + "\n"
    )
    return ExportResult(manifest=manifest, reports=reports, passed=passed, report_path=report_path, timings_s=timings)


def time_engine(engine: Engine, input_size: tuple[int, int], batch: int, repeats: int = 5) -> float:
    """Median seconds per batch through the engine exactly as the service calls it, after one warmup."""
    x = np.random.default_rng(0).standard_normal((batch, 3, *input_size)).astype(np.float32)
    engine.run(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.run(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def parse_threshold_overrides(items: list[str]) -> dict[str, ParityThresholds]:
    """``fp16.max_abs_logit_diff=0.1`` style overrides on top of the defaults."""
    merged = {k: v.model_dump() for k, v in parity.DEFAULT_THRESHOLDS.items()}
    for item in items:
        try:
            key, value = item.split("=", 1)
            precision, metric = key.split(".", 1)
            if precision not in merged or metric not in merged[precision]:
                raise KeyError
            merged[precision][metric] = float(value)
        except (ValueError, KeyError):
            fields = ", ".join(ParityThresholds.model_fields)
            raise ValueError(
                f"bad --gate {item!r}: expected PRECISION.METRIC=VALUE with PRECISION in "
                f"{', '.join(merged)} and METRIC in {fields}"
            ) from None
    return {k: ParityThresholds(**v) for k, v in merged.items()}


def summarize_cpu_choice(report: dict) -> str:
    c = report["cpu_engine"]
    parts = [
        f"{p}: {v['images_per_s']:.1f} img/s at batch {v['batch']}{'' if v['passed_gate'] else ' (failed gate)'}"
        for p, v in c["candidates"].items()
    ]
    ratio = ""
    cands = c["candidates"]
    if "fp32" in cands and "int8" in cands:
        ratio = f"; int8/fp32 speed = {cands['int8']['images_per_s'] / cands['fp32']['images_per_s']:.2f}x"
    return f"CPU engine: {c['chosen']} ({', '.join(parts)}{ratio})"
