"""Engine selection: which runtime serves this artifact on this machine, and proof that it answers like the model here.

``auto`` prefers, on a CUDA GPU: a native TensorRT plan built for this GPU, then ONNX Runtime's TensorRT/CUDA EPs on
the FP16 ONNX, then PyTorch FP16; on CPU: the CPU ONNX file export chose (the fastest of FP32 and the INT8 schemes
that passed the gate), then PyTorch FP32.

Each candidate is checksum-verified, loaded, and then re-checked *here*: the artifact's golden set goes through it
and is compared with its FP32 reference logits by ``service.parity.check_engine``, the function export's gate uses,
with the thresholds the file passed at export. INT8 kernels differ by CPU and TensorRT plans by GPU, so a file that
passed where it was exported can still disagree where it is served. ``auto`` skips such an engine (and logs its
figures); an explicitly chosen one refuses to start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from service import hardware
from service.hardware import cuda_available
from service.artifact import Artifact, EngineFile, ParityReport, SpeedCurve
from service.engines.base import Engine

log = logging.getLogger("vitserve.engines")

EngineChoice = Literal[
    "auto", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "pytorch-cpu", "pytorch-cuda"
]
ENGINE_CHOICES: tuple[str, ...] = EngineChoice.__args__  # type: ignore[attr-defined]


class EngineRefused(RuntimeError):
    """No engine may serve: the chosen one (or, under auto, every one) is unusable or failed the startup check."""


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def ort_has(provider: str) -> bool:
    """Whether this ONNX Runtime build offers ``provider`` (e.g. "CUDAExecutionProvider")."""
    from service.engines.onnxruntime_engine import available_providers

    return provider in available_providers()


def candidates(artifact: Artifact, choice: str, cuda: bool | None = None) -> list[tuple[str, EngineFile]]:
    """Ordered (engine kind, file) pairs to try for ``choice``; ``auto`` lists every viable one."""
    m = artifact.manifest
    cuda = cuda_available() if cuda is None else cuda
    cpu_onnx = next((e for e in m.engines if e.format == "onnx" and e.device == "cpu"), None)
    gpu_onnx = m.engine(format="onnx", precision="fp16")
    plan = m.engine(format="tensorrt")
    weights = m.engine(format="safetensors")
    table: dict[str, EngineFile | None] = {
        "tensorrt": plan,
        "onnxruntime-tensorrt": gpu_onnx,
        "onnxruntime-cuda": gpu_onnx,
        "pytorch-cuda": weights,
        "onnxruntime-cpu": cpu_onnx or m.engine(format="onnx", precision="fp32"),
        "pytorch-cpu": weights,
    }
    if choice != "auto":
        entry = table.get(choice)
        if entry is None:
            raise EngineRefused(f"engine {choice!r} needs a file the artifact {artifact.root} does not have")
        if not _passed(entry):
            raise EngineRefused(
                f"{entry.file} failed its parity gate at export ({'; '.join(entry.parity.failures)}); refusing to serve it"
            )
        return [(choice, entry)]
    order = ["tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "pytorch-cuda"] if cuda else []
    order += ["onnxruntime-cpu", "pytorch-cpu"]
    usable = {
        "tensorrt": lambda: _importable("tensorrt"),
        "onnxruntime-tensorrt": lambda: ort_has("TensorrtExecutionProvider"),
        "onnxruntime-cuda": lambda: ort_has("CUDAExecutionProvider"),
        "pytorch-cuda": lambda: True,  # cuda_available() already imported torch
        "onnxruntime-cpu": lambda: True,
        "pytorch-cpu": lambda: _importable("torch") and _importable("transformers"),  # absent from the CPU image
    }
    # A file that failed its parity gate is never chosen automatically: it answers differently from the model.
    return [(k, table[k]) for k in order if table[k] is not None and _passed(table[k]) and usable[k]()]


def _passed(entry: EngineFile) -> bool:
    return entry.parity is None or entry.parity.passed


def build_engine(
    kind: str,
    path: Path,
    entry: EngineFile,
    input_size: tuple[int, int],
    *,
    intra_op_threads: int = 0,
    idle_spinning: bool = True,
    trt_cache_dir: Path | None = None,
) -> Engine:
    """Load one engine file as ``kind``. Plain arguments: export builds engines before any manifest exists.
    ``intra_op_threads`` and ``idle_spinning`` are the CPU budget's (service/cpu_budget.py); 0 = the runtime's default."""
    if kind.startswith("onnxruntime-"):
        from service.engines.onnxruntime_engine import OnnxRuntimeEngine

        provider = kind.removeprefix("onnxruntime-")
        return OnnxRuntimeEngine(
            path, entry, input_size, provider=provider, intra_op_threads=intra_op_threads, idle_spinning=idle_spinning,
            trt_cache_dir=trt_cache_dir,
        )  # fmt: skip
    if kind == "tensorrt":
        from service.engines.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(path, entry, input_size)
    if kind in ("pytorch-cuda", "pytorch-cpu"):
        from service.engines.torch_engine import TorchEngine

        device = kind.removeprefix("pytorch-")
        return TorchEngine(path, entry, input_size, device=device, precision="fp16" if device == "cuda" else "fp32",
                           threads=intra_op_threads)
    raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_CHOICES)}")


def open_engine(kind: str, artifact: Artifact, entry: EngineFile, *, intra_op_threads: int = 0, idle_spinning: bool = True) -> Engine:
    """:func:`build_engine` for a file of an artifact on disk."""
    return build_engine(
        kind, artifact.path(entry), entry, artifact.manifest.preprocessing.input_size,
        intra_op_threads=intra_op_threads, idle_spinning=idle_spinning, trt_cache_dir=artifact.root / "trt_cache",
    )  # fmt: skip


SPEED_BATCHES = (1, 4, 8, 16, 32)
# A batch size counts as fastest when within this fraction of the best rate measured; the largest such size wins.
FLAT_CURVE_TOLERANCE = 0.05


def speed_curve(engine: Engine, pixels: np.ndarray, max_batch: int, min_seconds: float = 0.5,
                max_call_s: float | None = None) -> SpeedCurve:
    """Images/s by batch size through the engine exactly as the service calls it (real preprocessed images, cycled),
    after one warm-up call per size: per size, the median of at least 3 calls, ``min_seconds`` per size in all. Export
    records it for every CPU candidate; the service measures it again at startup when this machine is not the one
    export timed on, leaving out batch sizes whose one call would take over ``max_call_s`` (ViT-L on a CPU: seconds).

    The sizes are timed in interleaved rounds (b1, b4, ..., b32, b1, ...), not one after another: on a shared machine
    a burst of other work then slows every size alike instead of one size's whole slot (one after another, bursts made
    startup pick batch 16 over 32 in 3 of 8 tries on the demo engine, and batch 1 over 4-32 once). The next size's call
    time is projected from the fastest per-image time seen so far, which a burst cannot inflate unless it hits every
    size measured."""
    batches = {b: pixels[np.arange(b) % len(pixels)] for b in sorted({min(b, max_batch) for b in SPEED_BATCHES})}
    times: dict[int, list[float]] = {}
    for b, x in batches.items():
        if max_call_s is not None and times and b * min(t[0] / n for n, t in times.items()) > max_call_s:
            break
        engine.run(x)  # warm-up: first calls allocate and pick kernels
        times[b] = [_timed(engine, x)]
    start = time.perf_counter()
    while min(map(len, times.values())) < 3 or time.perf_counter() - start < min_seconds * len(times):
        for b in times:
            times[b].append(_timed(engine, batches[b]))
    rates = {b: round(b / float(np.median(t)), 3) for b, t in times.items()}
    return SpeedCurve(images_per_s=rates, best_batch=fastest_batch(rates), measured_on=hardware.describe(engine.device))


def fastest_batch(rates: dict[int, float]) -> int:
    """The largest batch size whose rate is within ``FLAT_CURVE_TOLERANCE`` of the best. Where the curve is flat the
    larger size costs nothing measurable and doubles the door's floor (two full batches are always admitted,
    service/admission.py): the demo engine's b16 and b32 are within 0-3 % on the 2-core EPYC here and noise flipped
    their order between startups, and with max batch 16 a storm of 64 clients retrying at once got 0.53 of saturation
    (76,323 refusals in 20 s) against 1.04-1.06 with 32 (benchmarks/results/overload-epyc-*)."""
    best = max(rates.values())
    return max(b for b, r in rates.items() if r >= (1 - FLAT_CURVE_TOLERANCE) * best)


def _timed(engine: Engine, x: np.ndarray) -> float:
    t = time.perf_counter()
    engine.run(x)
    return time.perf_counter() - t


def startup_check(engine: Engine, artifact: Artifact) -> ParityReport | None:
    """The artifact's golden set through ``engine`` on this machine, judged like export's gate judged the file
    (agreement by its 95 % upper bound: a few dozen images can refute agreement, not prove it). None without one."""
    from service.parity import check_engine, thresholds_for
    from service.preprocess import Preprocessor

    golden = artifact.golden_set()
    if golden is None:
        return None
    pixels, reference = golden
    entry, precision = engine.entry, engine.describe()["precision"]
    thresholds = thresholds_for(precision, entry.precision, entry.parity)
    x = Preprocessor(artifact.manifest.preprocessing).normalize(pixels)
    return check_engine(
        engine, x, reference, temperature=artifact.manifest.temperature, thresholds=thresholds,
        decide_on="upper_bound", hardware=hardware.describe(engine.device),
    )  # fmt: skip


@dataclass
class Attempt:
    """One candidate engine and what became of it, for logs and /info."""

    engine: str
    file: str
    outcome: Literal["selected", "skipped", "unavailable"]
    reason: str = ""
    startup_check: ParityReport | None = field(default=None, repr=False)

    def summary(self) -> dict:
        out = {"engine": self.engine, "file": self.file, "outcome": self.outcome, "reason": self.reason}
        if self.startup_check is not None:
            r = self.startup_check
            out["startup_check"] = {
                "passed": r.passed, "images": r.images, "top1_agreement": r.top1_agreement,
                "max_abs_logit_diff": r.max_abs_logit_diff, "max_abs_prob_diff": r.max_abs_prob_diff,
                "batch_logit_diff": r.batch_logit_diff, "failures": r.failures, "hardware": r.hardware,
            }  # fmt: skip
        return out


@dataclass
class Selection:
    engine: Engine
    attempts: list[Attempt]

    @property
    def startup_check(self) -> ParityReport | None:
        return self.attempts[-1].startup_check


def _figures(r: ParityReport) -> str:
    return (
        f"{r.images} golden images: top-1 agreement {r.top1_agreement:.4f}, max |Δlogit| {r.max_abs_logit_diff:.4g}, "
        f"max |Δprob| {r.max_abs_prob_diff:.4g}, batch |Δlogit| {r.batch_logit_diff:.3g}; " + "; ".join(r.failures)
    )


def select_engine(
    artifact: Artifact, choice: str = "auto", *, intra_op_threads: int = 0, idle_spinning: bool = True, check: bool = True
) -> Selection:
    """Verify, load and (``check``) re-check on this machine; ``auto`` falls through to the next candidate."""
    if choice not in ENGINE_CHOICES:
        raise ValueError(f"unknown engine {choice!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    options = candidates(artifact, choice)
    if not options:
        raise EngineRefused(f"no engine in {artifact.root} can run on this machine")
    attempts: list[Attempt] = []
    for kind, entry in options:
        artifact.verify([entry])  # a checksum failure is fatal, never a reason to fall through
        try:
            engine = open_engine(kind, artifact, entry, intra_op_threads=intra_op_threads, idle_spinning=idle_spinning)
        except Exception as e:  # noqa: BLE001 - try the next candidate, report all at the end
            if choice != "auto":
                raise EngineRefused(f"engine {kind} ({entry.file}) could not be loaded: {e}") from e
            log.warning("engine %s unavailable: %s", kind, e)
            attempts.append(Attempt(kind, entry.file, "unavailable", str(e)))
            continue
        report = startup_check(engine, artifact) if check else None
        if report is not None and not report.passed:
            why = f"startup check failed on this machine ({report.hardware.get('isa') or report.hardware.get('gpu', '')}): {_figures(report)}"
            if choice != "auto":
                raise EngineRefused(f"engine {engine.name} ({entry.file}) refused: {why}")
            log.warning("engine %s skipped: %s", engine.name, why)
            attempts.append(Attempt(engine.name, entry.file, "skipped", why, report))
            continue
        reason = "passed the startup check" if report is not None else ("startup check off" if not check else "no golden set in the artifact")
        attempts.append(Attempt(engine.name, entry.file, "selected", reason, report))
        if report is not None:
            log.info("engine %s passed the startup check: %s", engine.name, _figures(report).rstrip("; "))
        log.info("engine selected: %s (%s)", engine.name, engine.describe())
        return Selection(engine, attempts)
    raise EngineRefused("no engine may serve: " + " | ".join(f"{a.engine}: {a.reason}" for a in attempts))


def load_engine(artifact: Artifact, choice: str = "auto", *, intra_op_threads: int = 0, check: bool = True) -> Engine:
    """The engine :func:`select_engine` picks."""
    return select_engine(artifact, choice, intra_op_threads=intra_op_threads, check=check).engine
