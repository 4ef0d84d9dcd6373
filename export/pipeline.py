"""checkpoint → ONNX → engines → validated artifact. The CLI is a thin wrapper around :func:`export_artifact`.

Stages, in order (each a function below):

    load the checkpoint and the images → FP32 reference → to_onnx (FP32, FP16)
    → gate each engine (service.parity, through the service's own engine classes)
    → choose the CPU engine (FP32 and each INT8 scheme: gated, then timed by batch size; the fastest that passed)
    → PyTorch weights → TensorRT plan (optional) → golden set → manifest + parity report
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export import gate_inputs
from export.checkpoint import LoadedCheckpoint, load_checkpoint
from export.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    convert_fp16,
    export_fp32,
    quantize_int8_dynamic,
    quantize_int8_static,
)
from service import hardware
from service.artifact import (
    GOLDEN_NAME,
    EngineFile,
    Evaluation,
    GoldenSet,
    Manifest,
    ModelInfo,
    ParityReport,
    ParityThresholds,
    QuantizationInfo,
    SourceInfo,
    TensorSpec,
    sha256_file,
    write_manifest,
)
from service.engines import build_engine, speed_curve
from service.engines.base import Engine
from service.parity import DEFAULT_THRESHOLDS, check_engine
from service.preprocess import Preprocessor

log = logging.getLogger("vitserve.export")

CPU_CANDIDATES = ("fp32", "int8-dynamic", "int8-static")


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
    max_images: int = 1024
    calibration_images: int = 128
    int8_calibration: str = "percentile"
    golden_images: int = 32
    jpeg_draft_margin: float = 1.0  # into the manifest's preprocessing (service/artifact.py says why 1)
    cpu_candidates: tuple[str, ...] = CPU_CANDIDATES
    speed_seconds: float = 0.5
    thresholds: dict[str, ParityThresholds] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    force: bool = False


@dataclass
class ExportResult:
    manifest: Manifest
    reports: dict[str, ParityReport]
    passed: bool
    report_path: Path
    timings_s: dict[str, float]


def expand_cpu_candidates(names: tuple[str, ...]) -> tuple[str, ...]:
    """``int8`` means every INT8 scheme; unknown names are an error listing the known ones."""
    out: list[str] = []
    for n in names:
        for c in ("int8-dynamic", "int8-static") if n == "int8" else (n,):
            if c not in CPU_CANDIDATES:
                raise ValueError(f"unknown CPU candidate {n!r}; choose from {', '.join(CPU_CANDIDATES)} (or int8 for both INT8 schemes)")
            if c not in out:
                out.append(c)
    return tuple(out)


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


class _Export:
    """The state every stage shares: options, output folder, checkpoint, images, reference, timings, reports."""

    def __init__(self, opts: ExportOptions, out: Path):
        self.opts, self.out = opts, out
        self.timings: dict[str, float] = {}
        self.reports: dict[str, ParityReport] = {}
        self.t0 = time.perf_counter()

    def timed(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = time.perf_counter() - t
        return result

    # ---- inputs -------------------------------------------------------------------------------------------------
    def load(self) -> None:
        o = self.opts
        self.ckpt: LoadedCheckpoint = self.timed("load_checkpoint", load_checkpoint, o.checkpoint)
        self.ckpt.preprocessing = self.ckpt.preprocessing.model_copy(update={"jpeg_draft_margin": o.jpeg_draft_margin})
        self.pre = Preprocessor(self.ckpt.preprocessing)
        self.input_size = self.pre.input_size
        want = o.max_images + o.calibration_images
        images = (
            gate_inputs.directory_image_bytes(o.calibration_dir, want, log.info) if o.calibration_dir else gate_inputs.default_image_bytes(want)
        )
        self.images, calibration = gate_inputs.split_calibration(images, o.calibration_images)
        self.uint8 = self.timed("decode", gate_inputs.decode_images, self.images, self.pre)  # (N, H, W, 3)
        self.pixels = self.pre.normalize(self.uint8)  # (N, 3, H, W) float32, exactly as served
        self.calibration = self.pre.normalize(gate_inputs.decode_images(calibration, self.pre)) if calibration else self.pixels[:0]
        self.reference = self.timed("reference_fp32", gate_inputs.reference_logits, self.ckpt.model, self.pixels)
        log.info("reference: FP32 PyTorch on %d images (%d more for INT8 calibration)", len(self.pixels), len(self.calibration))
        h, w = self.input_size
        self.inputs = [TensorSpec(name=INPUT_NAME, dtype="float32", shape=["batch", 3, h, w])]  # FP32 I/O always
        self.outputs = [TensorSpec(name=OUTPUT_NAME, dtype="float32", shape=["batch", len(self.ckpt.labels)])]

    def entry(self, path: Path, fmt: str, precision: str, device: str, **kw) -> EngineFile:
        o = self.opts
        return EngineFile(
            file=str(path.relative_to(self.out)), format=fmt, precision=precision, device=device, inputs=self.inputs,
            outputs=self.outputs, min_batch=1, opt_batch=min(o.opt_batch, o.max_batch), max_batch=o.max_batch,
            sha256=sha256_file(path), **kw,
        )  # fmt: skip

    # ---- stages ---------------------------------------------------------------------------------------------------
    def to_onnx(self) -> tuple[Path, Path]:
        fp32 = self.timed("export_onnx_fp32", export_fp32, self.ckpt.model, self.out / "model.fp32.onnx", self.input_size, self.opts.max_batch)
        fp16 = self.timed("convert_fp16", convert_fp16, fp32, self.out / "model.fp16.onnx")
        return fp32, fp16

    def gate(self, kind: str, e: EngineFile) -> tuple[EngineFile, Engine]:
        """Load ``e`` through the service's engine class and judge it against the FP32 reference."""
        t = time.perf_counter()
        # As the service runs a CPU engine: ONNX Runtime's pool stops spinning as a call returns (service/cpu_budget.py),
        # so the speed measured here is the speed served.
        engine = build_engine(kind, self.out / e.file, e, self.input_size, idle_spinning=False, trt_cache_dir=self.out / "trt_cache")
        report = check_engine(
            engine, self.pixels, self.reference, temperature=self.ckpt.temperature,
            thresholds=self.opts.thresholds[e.precision], hardware=hardware.describe(engine.device),
        )  # fmt: skip
        self.timings[f"parity_{e.file}"] = time.perf_counter() - t
        self.reports[f"{e.file} ({kind})"] = report
        return e.model_copy(update={"parity": report}), engine

    def cpu_candidate(self, name: str, fp32: Path) -> EngineFile:
        quant: QuantizationInfo | None = None
        if name == "fp32":
            path = fp32
        elif name == "int8-dynamic":
            path = self.out / "model.int8-dynamic.onnx"
            quant = self.timed("quantize_int8_dynamic", quantize_int8_dynamic, fp32, path)
        else:
            if not len(self.calibration):
                raise ValueError("int8-static needs calibration images: raise --calibration-images or add images")
            path = self.out / "model.int8-static.onnx"
            quant = self.timed("quantize_int8_static", quantize_int8_static, fp32, path, self.calibration, self.opts.int8_calibration)
        e, engine = self.gate("onnxruntime-cpu", self.entry(path, "onnx", "fp32" if name == "fp32" else "int8", "cpu", quantization=quant))
        curve = self.timed(f"speed_{name}", speed_curve, engine, self.pixels, self.opts.max_batch, self.opts.speed_seconds)
        return e.model_copy(update={"speed": curve})

    def choose_cpu_engine(self, fp32: Path) -> tuple[EngineFile, dict]:
        """Measure each candidate; ship the one with the highest throughput at its best batch among those that passed
        the gate (the fastest of all if none did: the gate failure is then reported and the service refuses it)."""
        built = {name: self.cpu_candidate(name, fp32) for name in expand_cpu_candidates(self.opts.cpu_candidates)}
        best = lambda e: e.speed.images_per_s[e.speed.best_batch]  # noqa: E731
        passing = [n for n, e in built.items() if e.parity.passed]
        chosen = max(passing or list(built), key=lambda n: best(built[n]))
        for name, e in built.items():
            if name != chosen:
                (self.out / e.file).unlink()
        report = {
            "chosen": chosen,
            "rule": "highest img/s at its best batch among the candidates that passed the gate",
            "candidates": {
                n: {"file": e.file, "passed_gate": e.parity.passed, "images_per_s": e.speed.images_per_s,
                    "best_batch": e.speed.best_batch, "scheme": e.quantization.scheme if e.quantization else None}
                for n, e in built.items()
            },  # fmt: skip
            "measured_on": hardware.describe("cpu"),
        }
        return built[chosen], report

    def pytorch_weights(self) -> EngineFile:
        weights_dir = self.out / "pytorch"
        self.ckpt.model.model.save_pretrained(weights_dir, safe_serialization=True)
        (weights_dir / "model.safetensors").chmod(0o644)  # as for the golden set
        # With the image-processor config beside the weights, the folder is a complete HF checkpoint
        # (transformers' pipeline() loads it as-is; the naive-service benchmark peer does exactly that).
        if self.ckpt.preprocessing_source is not None:
            shutil.copy(self.ckpt.preprocessing_source, weights_dir / "preprocessor_config.json")
        if self.ckpt.calibration_source is not None:  # so pytorch/ re-exports with the same temperature
            shutil.copy(self.ckpt.calibration_source, weights_dir / self.ckpt.calibration_source.name)
        return self.gate("pytorch-cpu", self.entry(weights_dir / "model.safetensors", "safetensors", "fp32", "any"))[0]

    def tensorrt_plan(self, fp16: Path) -> EngineFile:
        from export.tensorrt_build import build_plan

        o, plan = self.opts, self.out / "model.fp16.plan"
        facts = self.timed(
            "build_tensorrt", build_plan, fp16, plan, input_name=INPUT_NAME, input_size=self.input_size, min_batch=1,
            opt_batch=min(o.opt_batch, o.max_batch), max_batch=o.max_batch, timing_cache=self.out / "tensorrt.timing.cache",
        )  # fmt: skip
        return self.gate("tensorrt", self.entry(plan, "tensorrt", "fp16", "cuda", build=facts))[0]

    def golden_set(self) -> GoldenSet:
        """Evenly spaced parity images (so every photo or class folder is represented) with their FP32 logits: what
        the service re-checks on the machine that serves."""
        from safetensors.numpy import save_file

        n = min(self.opts.golden_images, len(self.uint8))
        picks = np.linspace(0, len(self.uint8) - 1, n).round().astype(int)
        path = self.out / GOLDEN_NAME
        save_file({"pixels": np.ascontiguousarray(self.uint8[picks]), "reference_logits": np.ascontiguousarray(self.reference[picks])}, str(path))
        path.chmod(0o644)  # safetensors writes 0600; a service running as another user must read it
        return GoldenSet(sha256=sha256_file(path), images=n, source=f"{n} evenly spaced parity images ({self.image_source()})")

    def image_source(self) -> str:
        return str(self.opts.calibration_dir or "scikit-image photographs")

    def manifest(self, engines: list[EngineFile], golden: GoldenSet, report: dict) -> Manifest:
        o, c = self.opts, self.ckpt
        return Manifest(
            model=ModelInfo(name=o.name or c.name, version=o.version, architecture=c.architecture,
                            num_parameters=sum(p.numel() for p in c.model.parameters())),
            labels=c.labels, preprocessing=c.preprocessing, temperature=c.temperature, engines=engines, golden=golden,
            source=SourceInfo(checkpoint=o.checkpoint, sha256=c.source_sha256), versions=_versions(), export_report=report,
            evaluation=run_evaluation(Path(o.checkpoint)),
        )  # fmt: skip


def run_evaluation(checkpoint: Path) -> Evaluation | None:
    """The held-out figures of the fine-tune run that wrote ``checkpoint`` (RUN/checkpoint → RUN/metrics.json): the
    test set's when it had one, else validation's at the best epoch. None for checkpoints from elsewhere."""
    metrics_file = checkpoint.parent / "metrics.json"
    if not checkpoint.is_dir() or not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    split, figures = ("test", metrics.get("test")) if metrics.get("test") else ("validation", (metrics.get("final") or {}).get("val"))
    if not figures:
        return None  # a run that has not finished
    return Evaluation(split=split, images=figures["num_samples"], top1=figures["top1"], top5=figures["top5"],
                      macro_f1=figures["macro_f1"], ece=figures["ece"], confusion=figures.get("confusion"),
                      source=str(metrics_file))


def export_artifact(opts: ExportOptions) -> ExportResult:
    if opts.tensorrt:
        from export.tensorrt_build import ensure_available

        ensure_available()
    out = Path(opts.output)
    created = _prepare_output(out, opts.force)
    try:
        return _export(opts, out)
    except BaseException:
        if created:  # an export that failed (not one whose gate failed) leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare_output(out: Path, force: bool) -> bool:
    """Empty ``out`` (refusing a non-empty one without ``force``); True if this export created it."""
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force to overwrite it")
        shutil.rmtree(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return created


def _export(opts: ExportOptions, out: Path) -> ExportResult:
    """checkpoint → ONNX → gate each engine → choose the CPU engine → (TensorRT) → write the artifact."""
    x = _Export(opts, out)
    x.load()
    fp32, fp16 = x.to_onnx()
    # The FP16 graph is meant for CUDA, but ORT's CPU EP runs it too: its gate runs here, on any machine.
    engines = [x.gate("onnxruntime-cpu", x.entry(fp16, "onnx", "fp16", "cuda"))[0]]
    cpu_entry, cpu_report = x.choose_cpu_engine(fp32)
    engines.append(cpu_entry)
    if opts.include_pytorch:
        engines.append(x.pytorch_weights())
    if opts.tensorrt:
        engines.append(x.tensorrt_plan(fp16))
    return _write_artifact(x, engines, cpu_report)


def _write_artifact(x: _Export, engines: list[EngineFile], cpu_report: dict) -> ExportResult:
    """The golden set, the manifest and the parity report: written even when a gate failed, so the failure can be
    read (the service refuses any engine whose gate failed)."""
    golden = x.golden_set()
    x.timings["total"] = time.perf_counter() - x.t0
    report = {
        "cpu_engine": cpu_report,
        "timings_s": {k: round(v, 3) for k, v in x.timings.items()},
        "parity_images": {"count": len(x.images), "source": x.image_source(), "calibration": len(x.calibration)},
    }
    manifest = x.manifest(engines, golden, report)
    write_manifest(x.out, manifest)
    passed = all(e.parity is None or e.parity.passed for e in engines)
    report_path = x.out / "parity_report.json"
    report_path.write_text(
        json.dumps({"passed": passed, "engines": {k: r.model_dump() for k, r in x.reports.items()}, **report}, indent=2) + "\n"
    )
    return ExportResult(manifest=manifest, reports=x.reports, passed=passed, report_path=report_path, timings_s=x.timings)


def parse_threshold_overrides(items: list[str]) -> dict[str, ParityThresholds]:
    """``fp16.max_abs_logit_diff=0.1`` style overrides on top of the defaults."""
    merged = {k: v.model_dump() for k, v in DEFAULT_THRESHOLDS.items()}
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
    parts = []
    for name, v in c["candidates"].items():
        curve = ", ".join(f"b{b} {r:.1f}" for b, r in v["images_per_s"].items())
        parts.append(f"  {name:<13} {'PASS' if v['passed_gate'] else 'FAIL'}  img/s: {curve} (best batch {v['best_batch']})")
    return f"CPU engine: {c['chosen']} ({c['rule']}; on {c['measured_on'].get('cpu', '?')})\n" + "\n".join(parts)
