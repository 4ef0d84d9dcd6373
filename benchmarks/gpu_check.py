"""The GPU path, proven in one run: vitserve's GPU engines, its GPU tests, training memory, decode and the service on
one lent GPU machine in under 9 minutes, everything into one folder; rehearsed on CPU so that it never rots.

    bash benchmarks/gpu_wheels.sh                      # here: .whl/ = what a bare GPU machine lacks (carry it along)
    python -m benchmarks.gpu_check --out OUT           # there, from the source tree: ≤ 9 min on one H100 / H200
    python -m benchmarks.gpu_check --dry-run           # here: the same steps on CPU with a tiny ViT, < 2 min on 2 cores
    python -m benchmarks.gpu_check --replot OUT/gpu-check_<gpu>.json    # the figures again, from a run's JSON

Nothing is installed over the machine's own torch stack: wheels carried in .whl/ go into .whl/site, and only for
packages that are missing or older there (see gpu_wheels.sh). Steps, in this order, each with a time budget; a step
that fails is recorded with its traceback's tail and the run goes on, and the results are rewritten after every step,
so a run cut short keeps everything done so far:

  environment      GPU, driver, CUDA, versions; the measured ceiling: large BF16 and FP16 matmuls, TFLOP/s (median)
  pytest           `pytest -m "gpu or tensorrt"` in a subprocess: passed / failed / skipped, with reasons
  engines/<model>  ViT-L/16@224 (random weights, the real shape) and the demo model through every GPU engine vitserve
                   has: PyTorch FP16 and BF16 eager with SDPA (the service's TorchEngine), the same replayed from one
                   CUDA graph per batch bucket (this file's: the engine has none), ONNX Runtime CUDA / TensorRT EPs and
                   native TensorRT where they import. Batch sweep 1..256: img/s, ms per batch, fraction of the matmul
                   rate; parity of each against FP32 with export's gate (service.parity.check_engine)
  training_memory  peak CUDA memory of a ViT-L training step (BF16 autocast, FP32 weights, AdamW) at batch 4 and 16
  decode           GPU JPEG decode (torchvision, batched) against the service's CPU decode, 640×480 and 1920×1080
  service          the service on the best engine (`vitserve serve`; our ASGI app under plain uvicorn where BentoML
                   does not import), loaded by benchmarks/service_load.py: closed loop, then open loop at half the
                   peak; img/s, p50/p99, per-stage means from its histograms, and service ÷ raw engine
  compile/<model>  torch.compile of the PyTorch engine (this file's: the engine has none); last, as the slowest

The dry run swaps ViT-L for the `tiny` config, runs what a CPU can (the CPU PyTorch engine's sweep and parity, the CPU
matmul, CPU decode, the service on its CPU engine, torch.compile with Dynamo's eager backend) and says, per GPU-only
part, that it was skipped and why. Results: OUT/gpu-check_<machine>.{json,md,png} (+ _service.png), gpu-check.log,
pytest.log / pytest.xml and the server's log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import NO_GPU, env_tag, environment, load_average, print_summary, result_stem

STARTED = time.monotonic()  # the time limit counts from here: imports and package setup are part of the run
ROOT = Path(__file__).resolve().parents[1]
NAME = "gpu-check"
PROG = "vitserve bench gpu-check"
WHEELS = ROOT / ".whl"  # filled by benchmarks/gpu_wheels.sh, carried to the GPU machine
SITE = WHEELS / "site"  # where carried wheels are installed: first on sys.path and on every child's PYTHONPATH
PHOTOS_FILE = "skimage_photos.npz"
DEMO_CHECKPOINT = ROOT / "service" / "demo_artifact" / "pytorch"
DEMO_ARTIFACT = ROOT / "service" / "demo_artifact"
RESERVE_S = 8.0  # kept back from the time limit for writing the results
TRACEBACK_CHARS = 3000


# ---- plans ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Sizes and time budgets of one run. A step gets its budget, or less when the run's time limit is near."""

    model: str  # benchmarks.models config of the large model
    batches: tuple[int, ...]
    min_seconds: float  # each (engine, batch) is timed for at least this long, and at least 3 calls
    matmul_n: int
    parity_images: int  # 400: the fewest whose 95 % lower bound can reach FP16's 0.99 top-1 gate (parity.images_needed)
    train_batches: tuple[int, ...]
    decode_batch: int  # JPEGs per GPU decode call
    load_concurrency: tuple[int, ...]
    load_warmup_s: float
    load_duration_s: float
    time_limit_s: float
    budgets: dict[str, float]  # seconds, by step kind


# On an H100 ViT-L FP16 eager at batch 256 is ~0.25 s a call, so a sweep is ~10 s a variant; torch.compile of ViT-L
# takes about a minute. The budgets add up to 525 s; the time limit keeps the whole run under 9 minutes.
GPU_PLAN = Plan(
    model="vit-large", batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), min_seconds=0.5, matmul_n=8192,
    parity_images=400, train_batches=(4, 16), decode_batch=64, load_concurrency=(8, 32, 128), load_warmup_s=2.0,
    load_duration_s=6.0, time_limit_s=540.0,
    budgets={"environment": 25, "pytest": 100, "engines": 150, "engines/demo": 25, "training_memory": 30, "decode": 25,
             "service": 80, "compile": 90},
)  # fmt: skip
# The same steps at tiny sizes: under 2 minutes on 2 CPU cores shared with other work.
DRY_PLAN = Plan(
    model="tiny", batches=(1, 2, 4, 8, 16), min_seconds=0.05, matmul_n=512, parity_images=400, train_batches=(4, 16),
    decode_batch=8, load_concurrency=(1, 4), load_warmup_s=0.5, load_duration_s=1.5, time_limit_s=150.0,
    budgets={"environment": 10, "pytest": 40, "engines": 25, "engines/demo": 15, "training_memory": 10, "decode": 10,
             "service": 45, "compile": 20},
)  # fmt: skip


# ---- carried packages ----------------------------------------------------------------------------------------------
def wheel_fits(wheel: Path) -> bool:
    """Whether this Python and platform can install the wheel (gpu_wheels.sh fetches CPython 3.12 manylinux ones)."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    return bool(parse_wheel_filename(wheel.name)[3] & set(sys_tags()))


def wheel_wanted(wheel: Path) -> str | None:
    """Why a carried wheel must be installed here ("missing", "older x"), or None when this Python already has it."""
    from importlib import metadata

    from packaging.utils import parse_wheel_filename
    from packaging.version import Version

    dist, version, _, _ = parse_wheel_filename(wheel.name)
    try:
        have = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"
    return f"older {have}" if Version(have) < version else None


STAND_IN_INIT = '''"""Stand-in for scikit-image, written by benchmarks/gpu_check.py on a machine that cannot install it (it needs
scipy): only `skimage.data`, serving the photographs benchmarks/gpu_wheels.sh saved from the real package."""
'''
STAND_IN_DATA = '''"""The arrays the real `skimage.data` functions return, one function per photograph."""
from pathlib import Path as _Path

import numpy as _np

_ARRAYS = _np.load(_Path(__file__).with_name("photos.npz"))


def __getattr__(name):
    if name.startswith("_") or name not in _ARRAYS.files:
        raise AttributeError(f"the scikit-image stand-in has no photograph {name!r}")
    return lambda: _ARRAYS[name]
'''


def save_skimage_photos(path) -> Path:
    """The photographs export's parity images (export/gate_inputs.py) and the load test (benchmarks/photos.py) take from
    scikit-image, as the arrays ``skimage.data`` returns: for a machine that cannot install scikit-image."""
    from skimage import data

    from benchmarks.photos import COLOR_PHOTOS
    from export.gate_inputs import _SKIMAGE_PHOTOS

    arrays = {}
    for name in sorted(set(_SKIMAGE_PHOTOS) | set(COLOR_PHOTOS)):
        try:
            arrays[name] = getattr(data, name)()
        except Exception:  # noqa: BLE001 - export's parity images skip a photograph its version lacks, so may we
            continue
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def write_skimage_stand_in(photos: Path, site: Path) -> Path:
    package = site / "skimage"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(STAND_IN_INIT)
    (package / "data.py").write_text(STAND_IN_DATA)
    shutil.copy(photos, package / "photos.npz")
    return package


def prepare_packages(log=print) -> dict:
    """Make the carried wheels importable where this Python lacks them (pip --no-index --no-deps into .whl/site, first
    on sys.path and on every child's PYTHONPATH), and scikit-image's photographs where it lacks scikit-image. Runs
    before anything imports pydantic, FastAPI or scikit-image; never touches what is installed."""
    import importlib

    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path[:0] = [str(SITE), str(ROOT)]
    wheels = sorted(WHEELS.glob("*.whl"))
    fitting = [w for w in wheels if wheel_fits(w)]
    wanted = {w: why for w in fitting if (why := wheel_wanted(w)) is not None}
    record: dict = {"wheels_dir": str(WHEELS), "site": str(SITE), "installed": {},
                    "already_here": [w.name for w in fitting if w not in wanted],
                    "not_for_this_python": [w.name for w in wheels if w not in fitting]}
    if wanted:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade", "--target", str(SITE), *map(str, wanted)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            record["installed"] = {w.name: why for w, why in wanted.items()}
            log(f"installed {len(wanted)} carried wheels into {SITE}: {', '.join(w.name.split('-')[0] for w in wanted)}")
        else:  # the steps that need them fail with their import error, recorded; the others still run
            record["error"] = f"pip could not install the carried wheels: {_tail(proc.stderr, 2000)}"
            log(record["error"])
    importlib.invalidate_caches()
    photos = WHEELS / PHOTOS_FILE
    if importlib.util.find_spec("skimage") is None and photos.is_file():
        write_skimage_stand_in(photos, SITE)
        importlib.invalidate_caches()
        record["skimage"] = f"stand-in: scikit-image is not installed; its photographs come from {photos}"
        log(record["skimage"])
    return record


# ---- the run: steps, budgets, results ----------------------------------------------------------------------------------
@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def _sig(x: float, digits: int = 4) -> float:
    """Rounded to significant digits: a CPU's 0.0004 TFLOP/s must not print as 0."""
    return float(f"{x:.{digits}g}")


def _tail(text: str, chars: int = TRACEBACK_CHARS) -> str:
    return text if len(text) <= chars else "…" + text[-chars:]


class Run:
    """One check: its plan, output folder, scratch folder, what the steps share, and the payload written after each."""

    def __init__(self, plan: Plan, args, argv: list[str], packages: dict):
        self.plan, self.args, self.dry_run = plan, args, args.dry_run
        self.t0 = STARTED
        self.deadline = self.t0 + (args.time_limit or plan.time_limit_s)
        env = environment()
        self.out = Path(args.out) if args.out else (ROOT / "build" / f"{NAME}-dry-run" if args.dry_run else result_stem(NAME, env))
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="vitserve-gpu-check-"))  # checkpoints, servers: never into OUT
        self.stem = f"{NAME}_{env_tag(env)}"
        self._log = open(self.out / f"{NAME}.log", "w")
        self.ceilings: dict[tuple[str, str], float] = {}  # (device, precision) → measured matmul TFLOP/s
        self.cache: dict[str, object] = {}  # what later steps reuse: checkpoints, parity images, model contexts
        self.payload = {
            "benchmark": "gpu_check", "dry_run": self.dry_run,
            "command": f"{PROG if Path(sys.argv[0]).stem == 'vitserve' else 'python -m benchmarks.gpu_check'} {' '.join(argv)}",
            "environment": env, "load_average": {"before": load_average()}, "packages": packages,
            "plan": {k: v for k, v in plan.__dict__.items()}, "sections": {},
        }  # fmt: skip

    @property
    def cuda(self) -> bool:
        from service.hardware import cuda_available

        return cuda_available()

    def cached(self, key: str, make: Callable[[], object]):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def checkpoint(self, model: str) -> Path:
        """The demo model's checkpoint, or a random-weight one of a benchmarks.models config (made once per run)."""
        from benchmarks.models import make_checkpoint

        if model == "demo":
            return DEMO_CHECKPOINT
        return self.cached(f"checkpoint/{model}", lambda: make_checkpoint(model, self.work / model))

    def preprocessor(self, model: str):
        """The service's preprocessing for a checkpoint, as export reads it (without loading the weights)."""
        from benchmarks.models import checkpoint_shape
        from service.artifact import Preprocessing
        from service.preprocess import Preprocessor

        config = self.checkpoint(model) / "preprocessor_config.json"
        return Preprocessor(Preprocessing.from_hf(json.loads(config.read_text()), checkpoint_shape(self.checkpoint(model)).image_size))

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {message}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def step(self, name: str, kind: str, fn: Callable[[Run, Budget], dict]) -> None:
        """Run one step within its budget; whatever happens, record it and write the results so far."""
        seconds = min(self.plan.budgets[kind], self.deadline - time.monotonic() - RESERVE_S)
        sections = self.payload["sections"]
        if seconds < min(10.0, self.plan.budgets[kind]):
            sections[name] = {"status": "skipped", "why": f"no time left in the run's limit ({seconds:.0f} s would remain)"}
            self.log(f"{name}: skipped, no time left")
            self.save()
            return
        self.log(f"{name}: start (budget {seconds:.0f} s)")
        budget = Budget(seconds)
        try:
            result = fn(self, budget)
            status = result.pop("status", None) or ("partial" if result.get("skipped") else "ok")
        except Exception as e:  # noqa: BLE001 - one step failing must not lose the others' figures
            result = {"error": f"{type(e).__name__}: {e}"[:500], "traceback_tail": _tail(traceback.format_exc())}
            status = "failed"
        spent = time.monotonic() - budget.start
        sections[name] = {"status": status, "seconds": round(spent, 1), "budget_s": round(seconds, 1), **result}
        self.log(f"{name}: {status} in {spent:.1f} s" + (f" ({result['error']})" if status == "failed" else ""))
        self.save()

    def save(self, figures: bool = False) -> dict[str, Path]:
        self.payload["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.payload["load_average"]["after"] = load_average()
        return write_results(self.payload, self.out, self.stem, figures=figures, log=self.log)

    def close(self) -> None:
        self._log.close()
        shutil.rmtree(self.work, ignore_errors=True)


# ---- step: environment and the matmul ceiling ---------------------------------------------------------------------------
EXTRA_VERSIONS = ("torchvision", "timm", "numpy", "pillow", "pydantic", "fastapi", "starlette", "uvicorn", "prometheus-client",
                  "safetensors", "httpx", "pytest", "grpcio", "onnxscript", "matplotlib", "scikit-image", "psutil")  # fmt: skip


def nvidia_smi() -> dict:
    fields = "name,driver_version,memory.total,power.limit,clocks.max.sm,pcie.link.gen.max"
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "why": f"{type(e).__name__}: {e}"}
    if proc.returncode != 0:
        return {"available": False, "why": _tail(proc.stderr or proc.stdout, 300)}
    return {"available": True, "gpus": [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in proc.stdout.strip().splitlines()]}


def matmul_tflops(device: str, precision: str, n: int, runs: int = 20) -> dict:
    """Dense (n×n)·(n×n) matmul on random data: the median of ``runs`` timed calls after warm-up, in TFLOP/s."""
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3 if device == "cuda" else 1):
        a @ b
    times = []
    for _ in range(runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    flop = 2 * n**3
    median = float(np.median(times))
    return {"device": device, "precision": precision, "n": n, "runs": runs, "median_ms": _sig(median * 1000),
            "tflops": _sig(flop / median / 1e12), "spread_tflops": [_sig(flop / max(times) / 1e12), _sig(flop / min(times) / 1e12)]}


def step_environment(run: Run, budget: Budget) -> dict:
    import torch
    from importlib import metadata

    from service.engines.onnxruntime_engine import available_providers

    versions = {}
    for dist in EXTRA_VERSIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    out: dict = {
        "python": sys.executable, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": run.cuda, "onnxruntime_providers": available_providers(), "versions": versions,
        "nvidia_smi": nvidia_smi(), "skipped": {},
    }  # fmt: skip
    if run.cuda:
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                      "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count()}
        pairs = [("cuda", "bf16"), ("cuda", "fp16")]
    else:
        out["skipped"]["gpu"] = NO_GPU
        out["skipped"]["cuda matmul"] = "no CUDA GPU: the CPU's matmul is measured instead"
        pairs = [("cpu", "fp32"), ("cpu", "bf16")]
    out["matmul"] = []
    for device, precision in pairs:
        m = matmul_tflops(device, precision, run.plan.matmul_n, runs=20 if device == "cuda" else 3)
        out["matmul"].append(m)
        run.ceilings[(device, precision)] = m["tflops"]
        run.log(f"  matmul {device} {precision} {m['n']}³: {m['tflops']} TFLOP/s (median of {m['runs']})")
    return out


# ---- step: the GPU tests ----------------------------------------------------------------------------------------------
def marked_test_files() -> list[str]:
    """Test files with a gpu or tensorrt marker: only they are collected, so a test file whose imports this machine
    lacks (bentoml, kubernetes tooling, ...) cannot stop the GPU tests from running."""
    files = sorted((ROOT / "tests").glob("test_*.py"))
    return [str(f.relative_to(ROOT)) for f in files if any(m in f.read_text() for m in ("mark.gpu", "mark.tensorrt"))]


def junit_counts(xml_path: Path) -> dict:
    import xml.etree.ElementTree as ET

    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    outcomes = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        child = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(child.tag if child is not None else "", "passed")
        counts["tests"] += 1
        counts[outcome] += 1
        outcomes.append({"test": name, "outcome": outcome, "seconds": float(case.get("time") or 0),
                         **({"message": _tail(child.get("message") or "", 500)} if child is not None else {})})
    return {"counts": counts, "tests": outcomes}


def step_pytest(run: Run, budget: Budget) -> dict:
    files = marked_test_files()
    xml = run.out / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or tensorrt", "-p", "no:cacheprovider", "-rs", f"--junitxml={xml}", *files]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, budget.left()))
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        (run.out / "pytest.log").write_text(output)
        return {"status": "failed", "command": " ".join(cmd), "error": f"timed out after {budget.seconds:.0f} s", "output_tail": _tail(output)}
    (run.out / "pytest.log").write_text(proc.stdout + proc.stderr)
    result = {"command": " ".join(cmd[1:]), "files": files, "returncode": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:]}
    if xml.is_file():
        result.update(junit_counts(xml))
    failed = proc.returncode not in (0, 5) or result.get("counts", {}).get("failed") or result.get("counts", {}).get("errors")
    if failed:
        result["status"] = "failed"
        result["output_tail"] = _tail(proc.stdout + proc.stderr)
    return result


# ---- steps: engines ------------------------------------------------------------------------------------------------------
@dataclass
class ModelContext:
    """One model's checkpoint, parity images and FP32 reference logits, shared by every variant and step."""

    key: str
    checkpoint: Path
    ckpt: object  # export.checkpoint.LoadedCheckpoint
    shape: object  # benchmarks.models.VitShape
    flops: float  # per image
    pixels: np.ndarray  # (N, 3, H, W) float32, through the service's decode and preprocessing
    reference: np.ndarray  # (N, labels) FP32 logits
    reference_info: dict
    entry: object  # service.artifact.EngineFile for the safetensors weights (as the artifact lists them)
    setup_s: dict


def model_context(run: Run, key: str) -> ModelContext:
    return run.cached(f"context/{key}", lambda: _model_context(run, key))


def _model_context(run: Run, key: str) -> ModelContext:
    from benchmarks.engine_sweep import engine_entry
    from benchmarks.models import checkpoint_shape, vit_flops
    from export.checkpoint import load_checkpoint
    from export.gate_inputs import default_image_bytes, preprocess_images
    from service.preprocess import Preprocessor

    timings = {}
    t = time.perf_counter()
    checkpoint = run.checkpoint(key)
    timings["checkpoint"] = time.perf_counter() - t
    t = time.perf_counter()
    ckpt = load_checkpoint(str(checkpoint))  # FP32, eager attention: export's reference model
    shape = checkpoint_shape(checkpoint)
    pre = Preprocessor(ckpt.preprocessing)
    images = run.cached("parity_images", lambda: default_image_bytes(run.plan.parity_images))  # export's own views
    pixels = preprocess_images(images, pre)
    timings["load_and_parity_images"] = time.perf_counter() - t
    t = time.perf_counter()
    reference, info = fp32_reference(ckpt.model, pixels, "cuda" if run.cuda else "cpu")
    timings["reference"] = time.perf_counter() - t
    h, w = pre.input_size
    # The weights as an artifact lists them (FP32 safetensors); the PyTorch engine computes in its own precision.
    entry = engine_entry(checkpoint / "model.safetensors", "fp32", h, w, len(ckpt.labels), max(run.plan.batches), "any", fmt="safetensors")
    return ModelContext(key, checkpoint, ckpt, shape, vit_flops(shape)["total"], pixels, reference, info, entry,
                        {k: round(v, 2) for k, v in timings.items()})


def fp32_reference(model, pixels: np.ndarray, device: str) -> tuple[np.ndarray, dict]:
    """Export's reference: the FP32 model (eager attention, export.checkpoint) over the parity images. On CUDA with TF32
    off, so that it is FP32 arithmetic; its first images are also run on the CPU, where export computes them."""
    import torch

    from export.gate_inputs import reference_logits
    from service.parity import run_batched

    if device == "cpu":
        return reference_logits(model, pixels), {"device": "cpu", "images": len(pixels)}
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model.to("cuda")
        with torch.inference_mode():
            reference = run_batched(lambda x: model(torch.from_numpy(x).to("cuda")).float().cpu().numpy(), pixels, 16)
    finally:
        model.to("cpu")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    on_cpu = reference_logits(model, pixels[:8])
    return reference, {"device": "cuda", "tf32": False, "images": len(pixels),
                       "max_abs_logit_diff_vs_cpu_first_8": float(np.abs(reference[:8] - on_cpu).max())}


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


@dataclass
class Variant:
    name: str
    precision: str  # the gate's thresholds, and which matmul rate is the ceiling
    device: str
    build: Callable[[], object]  # → an engine: run(float32 NCHW) → float32 logits, max_batch_size, describe()
    note: str
    weight: float = 1.0  # share of the step's budget
    after: Callable[[], dict] | None = None  # facts to record once it has run (torch.compile's graphs and breaks)
    fallback: Variant | None = None  # run instead when this one fails


def torch_engine(ctx: ModelContext, device: str, precision: str):
    from service.engines.torch_engine import TorchEngine

    return TorchEngine(ctx.checkpoint / "model.safetensors", ctx.entry, tuple(ctx.ckpt.preprocessing.input_size), device=device, precision=precision)


def onnx_engine(run: Run, ctx: ModelContext, kind: str):
    """ONNX Runtime's CUDA/TensorRT EP on the FP16 ONNX, or native TensorRT on a plan built from it: the files built
    as the engine sweep builds them, loaded by the service's build_engine."""
    from benchmarks.engine_sweep import Builds
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
        Variant("pytorch-cuda-fp16", "fp16", "cuda", lambda: torch_engine(ctx, "cuda", "fp16"), eager + "; what `auto` serves on a GPU"),
        Variant("pytorch-cuda-bf16", "bf16", "cuda", lambda: torch_engine(ctx, "cuda", "bf16"), eager),
        Variant("pytorch-cuda-fp16-cudagraph", "fp16", "cuda", lambda: CudaGraphBuckets(torch_engine(ctx, "cuda", "fp16"), buckets), graphs, 1.3),
        Variant("pytorch-cuda-bf16-cudagraph", "bf16", "cuda", lambda: CudaGraphBuckets(torch_engine(ctx, "cuda", "bf16"), buckets), graphs, 1.3),
    ]
    onnx = {
        "onnxruntime-cuda-fp16": ("onnxruntime-cuda", lambda: ort_has("CUDAExecutionProvider"), "ONNX Runtime has no CUDAExecutionProvider here (the CPU build `onnxruntime`; onnxruntime-gpu is not installed)"),
        "onnxruntime-tensorrt-fp16": ("onnxruntime-tensorrt", lambda: ort_has("TensorrtExecutionProvider"), "ONNX Runtime has no TensorrtExecutionProvider here"),
        "tensorrt-cuda-fp16": ("tensorrt", lambda: importlib.util.find_spec("tensorrt") is not None, "the tensorrt package is not installed"),
    }  # fmt: skip
    if not run.cuda:
        skipped = {v.name: NO_GPU for v in gpu}
        skipped |= {name: NO_GPU + ("" if usable() else f"; also: {why}") for name, (_, usable, why) in onnx.items()}
        cpu = Variant("pytorch-cpu-fp32", "fp32", "cpu", lambda: torch_engine(ctx, "cpu", "fp32"), eager + "; the CPU stand-in for the GPU rows")
        return [cpu], skipped
    out, skipped = list(gpu), {"pytorch-cpu-fp32": "GPU machine: the budget goes to the GPU engines"}
    for name, (kind, usable, why) in onnx.items():
        if usable():
            out.append(Variant(name, "fp16", "cuda", lambda kind=kind: onnx_engine(run, ctx, kind), f"{kind} on the FP16 ONNX, host arrays in and out", 2.0))
        else:
            skipped[name] = why
    return out, skipped


def compile_variants(run: Run, ctx: ModelContext) -> tuple[list[Variant], dict[str, str]]:
    mode = run.args.compile_mode
    if run.cuda:
        eager = Variant("pytorch-cuda-fp16-compile-eager-backend", "fp16", "cuda", lambda: compiled(torch_engine(ctx, "cuda", "fp16"), backend="eager", mode=mode),
                        "fallback after Inductor failed: Dynamo's capture with the eager backend, no Inductor kernels (eager's speed)",
                        after=lambda: compile_facts("eager", mode))  # fmt: skip
        return [Variant("pytorch-cuda-fp16-compile", "fp16", "cuda", lambda: compiled(torch_engine(ctx, "cuda", "fp16"), backend="inductor", mode=mode),
                        f"torch.compile(backend=inductor, mode={mode}, dynamic=True), {_whose('torch_compile')}",
                        after=lambda: compile_facts("inductor", mode), fallback=eager)], {}  # fmt: skip
    return [Variant("pytorch-cpu-fp32-compile", "fp32", "cpu", lambda: compiled(torch_engine(ctx, "cpu", "fp32"), backend="eager", mode=mode),
                    "torch.compile(backend=eager, dynamic=True): a rehearsal of the wrapper and of Dynamo's capture, not an Inductor speed",
                    after=lambda: compile_facts("eager", mode))], {"pytorch-cuda-fp16-compile": NO_GPU}  # fmt: skip


def sweep(engine, batches, budget: Budget, *, flops: float, ceiling: float | None, min_seconds: float) -> dict:
    """img/s by batch size through engine.run on random (never zero) inputs; stops before a size whose expected
    time no longer fits the budget. A size's first call (graph capture, compilation) is timed apart."""
    from benchmarks.peers.raw_engine import time_call

    h, w = engine.input_size
    x_all = np.random.default_rng(0).standard_normal((max(batches), 3, h, w), dtype=np.float32)
    rows, stopped, per_image_s = [], None, None
    for b in batches:
        if b > engine.max_batch_size:
            stopped = f"batch {b} is above the engine's maximum {engine.max_batch_size}"
            break
        if per_image_s is not None:
            need = per_image_s * b * 8 + min_seconds  # first call (a graph capture is 4 calls), warm-up, 3 timed
            if need > budget.left():
                stopped = f"stopped before batch {b}: about {need:.1f} s needed, {max(0.0, budget.left()):.1f} s left of its budget"
                break
        x = x_all[:b]
        t = time.perf_counter()
        engine.run(x)
        first_call_s = time.perf_counter() - t
        r = time_call(lambda x=x: engine.run(x), warmup=1, min_repeats=3, min_seconds=min_seconds)
        ips = b / r["median_s"]
        per_image_s = r["median_s"] / b
        tflops = ips * flops / 1e12
        rows.append({
            "batch": b, "images_per_s": round(ips, 3), "ms_per_batch": round(r["median_s"] * 1000, 3), "repeats": r["repeats"],
            "spread_ms": [round(r["min_s"] * 1000, 3), round(r["max_s"] * 1000, 3)], "first_call_s": round(first_call_s, 3),
            "model_tflops": _sig(tflops), "fraction_of_matmul": _sig(tflops / ceiling) if ceiling else None,
        })  # fmt: skip
    return {"rows": rows, "stopped": stopped}


def run_variants(run: Run, budget: Budget, ctx: ModelContext, variants: list[Variant], skipped: dict[str, str]) -> dict:
    """Each variant: build, parity against FP32 (export's gate function and thresholds), then the batch sweep."""
    import gc

    import torch

    from service import hardware
    from service.parity import DEFAULT_THRESHOLDS, check_engine

    results: dict = {}
    queue = list(variants)
    while queue:
        v = queue.pop(0)
        share = Budget(max(0.0, budget.left()) * v.weight / (v.weight + sum(u.weight for u in queue)))
        out: dict = {"device": v.device, "precision": v.precision, "note": v.note}
        engine = None
        try:
            t = time.perf_counter()
            engine = v.build()
            out["build_s"] = round(time.perf_counter() - t, 2)
            out["engine"] = engine.describe()
            t = time.perf_counter()
            report = check_engine(engine, ctx.pixels, ctx.reference, temperature=ctx.ckpt.temperature,
                                  thresholds=DEFAULT_THRESHOLDS[v.precision], hardware=hardware.describe(v.device))
            out["parity_s"] = round(time.perf_counter() - t, 2)
            out["parity"] = report.model_dump(mode="json")
            out.update(sweep(engine, run.plan.batches, share, flops=ctx.flops, ceiling=run.ceilings.get((v.device, v.precision)),
                             min_seconds=run.plan.min_seconds))
            if v.after is not None:
                out["compile"] = v.after()
            best = max(out["rows"], key=lambda r: r["images_per_s"]) if out["rows"] else None
            run.log(f"  {v.name:<30} parity {'PASS' if report.passed else 'FAIL'} (max |Δlogit| {report.max_abs_logit_diff:.3g}); "
                    + (f"best {best['images_per_s']:.1f} img/s at batch {best['batch']}" if best else "no batch timed")
                    + (f", {best['fraction_of_matmul']:.2f} of matmul" if best and best["fraction_of_matmul"] else "")
                    + (f"; {out['stopped']}" if out["stopped"] else ""))
        except Exception as e:  # noqa: BLE001 - one engine failing must not lose the others' figures
            out["error"] = f"{type(e).__name__}: {e}"[:500]
            out["traceback_tail"] = _tail(traceback.format_exc())
            run.log(f"  {v.name}: failed ({out['error']})")
            if v.fallback is not None:
                out["fallback"] = v.fallback.name
                queue.insert(0, v.fallback)
        finally:
            del engine
            gc.collect()
            if run.cuda:
                torch.cuda.empty_cache()
        results[v.name] = out
    failed = [n for n, r in results.items() if "error" in r]
    return {"model": model_facts(ctx), "variants": results, "skipped": skipped, "torch_engine_offers": engine_offers(),
            **({"status": "failed", "error": f"variant(s) failed: {', '.join(failed)}"} if failed else {})}


def model_facts(ctx: ModelContext) -> dict:
    return {"name": ctx.key, "checkpoint": str(ctx.checkpoint if ctx.key == "demo" else f"benchmarks.models.make_checkpoint({ctx.key!r})"),
            "random_weights": ctx.key != "demo", "shape": ctx.shape.__dict__, "gflop_per_image": round(ctx.flops / 1e9, 3),
            "parity_images": {"count": len(ctx.pixels), "source": "export's default views of scikit-image's photographs (export.gate_inputs.default_image_bytes)"},
            "reference": ctx.reference_info, "setup_s": ctx.setup_s}  # fmt: skip


def engines_step(key: str, variants_of: Callable) -> Callable[[Run, Budget], dict]:
    def step(run: Run, budget: Budget) -> dict:
        ctx = model_context(run, key)
        variants, skipped = variants_of(run, ctx)
        return run_variants(run, budget, ctx, variants, skipped)

    return step


# ---- step: training memory ---------------------------------------------------------------------------------------------
def training_step_memory(checkpoint: Path, batch: int, device: str) -> dict:
    """One fine-tuning step as `vitserve finetune --precision bf16` takes it: FP32 weights, BF16 autocast forward,
    FP32 loss, backward, AdamW (finetune.optim, weight decay on matrices). Two steps (the first allocates AdamW's
    state); the peak of both is what a planner must predict."""
    import torch
    import torch.nn.functional as F
    from transformers import ViTForImageClassification

    from finetune import optim

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    model = ViTForImageClassification.from_pretrained(checkpoint, use_safetensors=True).to(device).train()
    opt = optim.build("adamw", optim.param_groups(model, 0.05), lr=5e-5)
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, model.config.num_labels, (batch,), device=device)
    step_s = []
    for _ in range(2):
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(pixel_values=x).logits
        F.cross_entropy(logits.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t)
    params = sum(p.numel() for p in model.parameters())
    out = {"batch": batch, "device": device, "parameters": params, "weights_bytes": 4 * params, "grads_bytes": 4 * params,
           "adamw_state_bytes": 8 * params, "step_s": round(step_s[1], 4), "first_step_s": round(step_s[0], 4)}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        out |= {"peak_allocated_bytes": int(peak), "peak_allocated_gib": round(peak / 2**30, 3),
                "activations_and_workspace_bytes": int(peak - 16 * params)}  # peak minus weights, grads and AdamW state
    del model, opt, x, logits
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def planner_estimate(checkpoint: Path, batch: int, device: str) -> dict:
    """`vitserve plan`'s estimate (finetune.plan.training_memory) for the same model, batch and setup. Its
    allocated_peak is what torch.cuda.max_memory_allocated measures; its total adds the CUDA context and the
    allocator's fragmentation."""
    try:
        from finetune import plan as planner

        shape, _ = planner.resolve_shape(str(checkpoint))
        m = planner.training_memory(shape, planner.Setup(batch=batch, precision="bf16", optimizer="adamw", device=device))
    except Exception as e:  # noqa: BLE001 - the planner is another module's work: its absence or failure is recorded
        return {"allocated_peak_bytes": None, "note": f"finetune.plan.training_memory unavailable: {type(e).__name__}: {e}"[:300]}
    return {"allocated_peak_bytes": m.allocated_peak, "total_bytes": m.total, "activations_bytes": m.activations_total,
            "note": "finetune.plan.training_memory(resolve_shape(checkpoint), Setup(batch, precision='bf16', optimizer='adamw'))"}


def step_training_memory(run: Run, budget: Budget) -> dict:
    checkpoint = run.checkpoint(run.plan.model)
    device = "cuda" if run.cuda else "cpu"
    rows, skipped = [], {}
    for b in run.plan.train_batches:
        if rows and budget.left() < rows[-1]["first_step_s"] * 3 * b / rows[-1]["batch"]:
            skipped[f"batch {b}"] = f"budget: {budget.left():.0f} s left"
            break
        row = training_step_memory(checkpoint, b, device)
        row["planner"] = planner_estimate(checkpoint, b, device)
        estimate, measured = row["planner"]["allocated_peak_bytes"], row.get("peak_allocated_bytes")
        row["planner_over_measured"] = round(estimate / measured, 3) if estimate and measured else None
        rows.append(row)
        run.log(f"  training step batch {b} ({device}): {row.get('peak_allocated_gib', '-')} GiB peak measured, "
                f"{estimate / 2**30 if estimate else float('nan'):.3f} GiB planned, {row['step_s']:.3f} s/step")
    if device == "cpu":
        skipped["peak memory"] = "torch.cuda.max_memory_allocated is CUDA-only; on CPU only the step time and the byte counts of weights, grads and AdamW state"
    return {"model": run.plan.model, "precision": "bf16 autocast, FP32 weights (as `vitserve finetune --precision bf16`)",
            "optimizer": "AdamW (finetune.optim)", "rows": rows, "skipped": skipped}


# ---- step: decode ----------------------------------------------------------------------------------------------------------
DECODE_SIZES = ((640, 480), (1920, 1080))


def cpu_decode(photos, pre, min_seconds: float) -> dict:
    """The service's decode + preprocess (Preprocessor.from_bytes): one thread, and every core the service would use."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.peers.raw_engine import decode_cost, time_call
    from service.cpu_budget import available_cores

    one = decode_cost(photos, pre, min_seconds=min_seconds)
    cores = available_cores()
    batch = [photos[i % len(photos)].data for i in range(cores * 8)]
    with ThreadPoolExecutor(cores) as pool:
        r = time_call(lambda: list(pool.map(lambda d: pre.from_bytes(d, max_pixels=50_000_000), batch)), min_seconds=min_seconds)
    return {"one_thread_ms_per_image": one["mean_ms_per_image"], "one_thread_images_per_s": round(1000 / one["mean_ms_per_image"], 1),
            "threads": cores, "all_cores_images_per_s": round(len(batch) / r["median_s"], 1)}


def gpu_decode(photos, pre, batch: int, min_seconds: float) -> dict:
    """torchvision.io.decode_jpeg on a list of JPEGs, device="cuda" (nvJPEG, batched); then the service's GPU path
    (service.gpu_decode.GpuDecoder, what VITSERVE_GPU_DECODE serves with): one image at a time, nvJPEG, resize, crop
    and normalisation on the GPU. Its pixels are not the CPU path's (which decodes JPEGs at reduced size first):
    their difference is measured, not assumed (tests/test_gpu_decode.py checks the engine's top-1 agrees)."""
    import torch
    from torchvision.io import decode_jpeg

    from benchmarks.peers.raw_engine import time_call
    from service.gpu_decode import GpuDecoder

    data = [torch.frombuffer(bytearray(p.data), dtype=torch.uint8) for p in photos]
    inputs = [data[i % len(data)] for i in range(batch)]
    decoder = GpuDecoder(pre, device="cuda")

    def decode():
        out = decode_jpeg(inputs, device="cuda")
        torch.cuda.synchronize()
        return out

    def service_path():
        return [decoder(photos[i % len(photos)].data, max_pixels=50_000_000) for i in range(batch)]

    only = time_call(decode, warmup=2, min_repeats=3, min_seconds=min_seconds)
    full = time_call(service_path, warmup=2, min_repeats=3, min_seconds=min_seconds)
    ours = np.stack([decoder(p.data, max_pixels=50_000_000) for p in photos])
    served = np.stack([pre.from_bytes(p.data, max_pixels=50_000_000) for p in photos])
    diff = np.abs(ours - served) / np.abs(pre.scale.reshape(1, 3, 1, 1))  # in uint8 steps
    return {"batch": batch, "decode_images_per_s": round(batch / only["median_s"], 1),
            "decode_and_preprocess_images_per_s": round(batch / full["median_s"], 1), "resample": decoder.mode,
            "pixels_vs_service": {"mean_abs_diff_uint8": round(float(diff.mean()), 3), "max_abs_diff_uint8": round(float(diff.max()), 1)}}


def step_decode(run: Run, budget: Budget) -> dict:
    import importlib.util

    from benchmarks.photos import realistic_photos

    pre = run.preprocessor(run.plan.model)
    why_no_gpu = NO_GPU if not run.cuda else ("torchvision is not installed" if importlib.util.find_spec("torchvision") is None else None)
    sizes, skipped = {}, {}
    for w, h in DECODE_SIZES:
        photos = realistic_photos((w, h), formats=("JPEG",))
        key = f"{w}x{h}"
        sizes[key] = {"photos": len(photos), "mean_jpeg_bytes": round(sum(len(p.data) for p in photos) / len(photos)),
                      "cpu_service_decode": cpu_decode(photos, pre, min_seconds=min(1.0, run.plan.min_seconds * 4))}
        if why_no_gpu:
            skipped[f"gpu decode {key}"] = why_no_gpu
        else:
            sizes[key]["gpu_decode"] = gpu_decode(photos, pre, run.plan.decode_batch, min_seconds=run.plan.min_seconds)
            g = sizes[key]["gpu_decode"]
            sizes[key]["gpu_over_cpu_all_cores"] = round(g["decode_and_preprocess_images_per_s"] / sizes[key]["cpu_service_decode"]["all_cores_images_per_s"], 2)
        c = sizes[key]["cpu_service_decode"]
        run.log(f"  decode {key}: CPU {c['one_thread_images_per_s']} img/s/thread, {c['all_cores_images_per_s']} img/s on {c['threads']} threads"
                + (f"; GPU {sizes[key]['gpu_decode']['decode_and_preprocess_images_per_s']} img/s" if "gpu_decode" in sizes[key] else ""))
    return {"model_input": list(pre.input_size), "jpeg_draft_margin": pre.spec.jpeg_draft_margin, "sizes": sizes, "skipped": skipped}


# ---- step: the service end to end ----------------------------------------------------------------------------------------
def plain_asgi_app():
    """uvicorn factory (``uvicorn benchmarks.gpu_check:plain_asgi_app --factory``): service.standalone's app, our
    HTTP service exactly as BentoML mounts it, without BentoML."""
    import logging

    from service.standalone import app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return app()


SERVERS = {"bentoml": "`vitserve serve` (BentoML)", "uvicorn": "our ASGI app under plain uvicorn (benchmarks.gpu_check.plain_asgi_app)"}


def server_kind(choice: str) -> tuple[str, str]:
    """'bentoml' (`vitserve serve`) or 'uvicorn' (plain_asgi_app), and why."""
    if choice == "uvicorn":
        return "uvicorn", "asked for (--server uvicorn)"
    try:
        import bentoml  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the same: BentoML cannot serve here
        if choice == "bentoml":
            raise
        return "uvicorn", f"bentoml cannot be imported here ({type(e).__name__}: {e}); our ASGI app ran under plain uvicorn instead"
    return "bentoml", "bentoml imports here"


def running_service(kind: str, artifact: Path, workdir: Path, **settings: str):
    from benchmarks.servers import _base_env, free_port, running, running_vitserve

    if kind == "bentoml":
        return running_vitserve(artifact, workdir, **settings)
    port = free_port()
    env = {**_base_env(workdir), "VITSERVE_ARTIFACT": str(artifact), "VITSERVE_GRPC_PORT": "0",
           **{f"VITSERVE_{k.upper()}": v for k, v in settings.items()}}
    cmd = [sys.executable, "-m", "uvicorn", "benchmarks.gpu_check:plain_asgi_app", "--factory", "--host", "127.0.0.1",
           "--port", str(port), "--no-access-log", "--timeout-graceful-shutdown", "5"]
    return running("vitserve-uvicorn", cmd, env, workdir, port)


def step_service(run: Run, budget: Budget) -> dict:
    import asyncio

    import httpx

    from benchmarks.peers.raw_engine import measure
    from benchmarks.photos import describe, realistic_photos
    from benchmarks.service_load import multipart_bodies, run_load

    p = run.plan
    artifact = Path(run.args.serve_artifact).resolve()
    kind, why = server_kind(run.args.server)
    photos = realistic_photos(formats=("JPEG",))
    bodies = multipart_bodies(photos)
    load = dict(warmup_s=p.load_warmup_s, duration_s=p.load_duration_s, max_outstanding=256, timeout_s=30, log=run.log)
    workdir = run.work / "server"
    # nvJPEG decode in the service (service/gpu_decode.py) wherever it can run: the GPU service as it is meant to run.
    from service.gpu_decode import available

    no_gpu_decode = available("cuda" if run.cuda else "cpu")
    settings = {} if no_gpu_decode else {"gpu_decode": "true"}
    out: dict = {"server": kind, "server_why": why, "artifact": str(artifact), "images": describe(photos),
                 "settings": settings, "gpu_decode": no_gpu_decode or "on (VITSERVE_GPU_DECODE=true)"}
    try:
        with running_service(kind, artifact, workdir, **settings) as server:
            info = httpx.get(f"{server.url}/info", timeout=30).json()
            out["info"] = {k: info.get(k) for k in ("model", "engine", "engine_selection", "limits", "cpu_budget", "admission")}
            closed = asyncio.run(run_load(server.url, bodies, concurrency=list(p.load_concurrency), rates=[], **load))
            peak = closed["saturation"]["images_per_s"]
            opened = asyncio.run(run_load(server.url, bodies, concurrency=[], rates=[round(peak / 2, 2)], **load))
            out["load"] = {**closed, "open_loop": opened["open_loop"]}
    finally:
        for log in workdir.glob("*.log"):
            shutil.copy(log, run.out / f"service-{log.name}")
    max_batch = out["info"]["limits"]["max_batch_size"]
    # The engine the service chose, alone: the same file, kind and batch size, on the same photographs.
    choice = _engine_choice(out["info"]["engine"]["engine"])
    raw = measure(artifact, photos, [max_batch], engine=choice, min_seconds=max(0.5, p.min_seconds * 4), log=run.log)
    out["raw_engine"] = raw
    served = out["load"]["saturation"]["images_per_s"]
    best = raw["best"]
    out["ratio"] = {"service_over_engine": round(served / best["engine_images_per_s"], 4),
                    "service_over_engine_plus_one_thread_decode": round(served / best["end_to_end_images_per_s"], 4),
                    "engine_batch": best["batch"], "service_images_per_s": served}  # fmt: skip
    o = out["load"]["open_loop"][0]
    run.log(f"  service {served:.1f} img/s at saturation; open loop {o['target_rate_rps']}/s: p50 {o['latency']['p50_ms']} ms, "
            f"p99 {o['latency']['p99_ms']} ms; service ÷ engine {out['ratio']['service_over_engine']:.3f}")
    if kind == "uvicorn" and run.args.server != "uvicorn":
        out["skipped"] = {"bentoml": why}
    return out


def _engine_choice(engine_name: str) -> str:
    """/info's engine name (e.g. pytorch-cuda-fp16, onnxruntime-cpu-fp32) → the VITSERVE_ENGINE choice that loads it."""
    from service.engines import ENGINE_CHOICES

    return max((c for c in ENGINE_CHOICES if engine_name.startswith(c)), key=len, default="auto")


# ---- results: JSON, markdown, figures, summary ----------------------------------------------------------------------------
def write_results(payload: dict, out: Path, stem: str, *, figures: bool, log=print) -> dict[str, Path]:
    """The JSON first (it holds every figure); then the markdown and the figures, whose failure loses nothing."""
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    if figures:
        try:
            paths |= plot(payload, out, stem)
        except Exception as e:  # noqa: BLE001
            payload["figures"] = {"written": False, "why": f"{type(e).__name__}: {e}", "traceback_tail": _tail(traceback.format_exc())}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    try:
        paths["md"].write_text(markdown(payload))
    except Exception as e:  # noqa: BLE001
        log(f"markdown not written: {type(e).__name__}: {e}\n{_tail(traceback.format_exc())}")
    return paths


def _engine_sections(payload: dict) -> dict[str, dict]:
    return {k: v for k, v in payload["sections"].items() if k.startswith(("engines/", "compile/")) and "variants" in v}


def markdown(payload: dict) -> str:
    env, sections = payload["environment"], payload["sections"]
    envs = sections.get("environment", {})
    gpu = envs.get("gpu") or {}
    smi = (envs.get("nvidia_smi") or {}).get("gpus") or [{}]
    title = gpu.get("name") or ("CPU dry run" if payload["dry_run"] else "no GPU")
    lines = [f"# vitserve GPU check: {title}", ""]
    lines += [f"- machine: {env['cpu']} ×{env['cpu_count']}; GPU: {gpu.get('name') or 'none'}"
              + (f" ({gpu['memory_gib']} GiB, capability {gpu['capability']}), driver {smi[0].get('driver_version')}" if gpu else ""),
              f"- torch {env['versions'].get('torch')} (CUDA {envs.get('torch_cuda')}, cuDNN {envs.get('cudnn')}), "
              + ", ".join(f"{k} {v}" for k, v in (envs.get("versions") or {}).items() if v),
              f"- command: `{payload['command']}`; git {env['git_sha']}; {env['date']}; {payload.get('elapsed_s')} s",
              "- steps: " + ", ".join(f"{k} **{v['status']}** ({v.get('seconds', 0)} s)" for k, v in sections.items()), ""]  # fmt: skip
    if envs.get("matmul"):
        lines += ["## Ceiling: dense matmul (random data, median of timed runs)", "", "| device | dtype | n | TFLOP/s | spread |", "|---|---|---|---|---|"]
        lines += [f"| {m['device']} | {m['precision']} | {m['n']} | **{m['tflops']}** | {m['spread_tflops'][0]}–{m['spread_tflops'][1]} |" for m in envs["matmul"]]
        lines.append("")
    py = sections.get("pytest")
    if py and "counts" in py:
        c = py["counts"]
        lines += ["## `pytest -m \"gpu or tensorrt\"`", "", f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                  f"{c['skipped']} skipped ({', '.join(py['files'])})", ""]
        lines += [f"- {t['test']}: {t['outcome']}" + (f" — {t['message']}" if t.get("message") else "") for t in py["tests"]]
        lines.append("")
    for name, sec in _engine_sections(payload).items():
        lines += _engine_markdown(name, sec)
    tm = sections.get("training_memory")
    if tm and tm.get("rows"):
        lines += [f"## Training step memory: {tm['model']}, {tm['precision']}, {tm['optimizer']}", "",
                  "| batch | device | peak allocated GiB, measured | planner's allocated peak GiB | planner ÷ measured | step s | weights + grads + AdamW GiB |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in tm["rows"]:
            static = (r["weights_bytes"] + r["grads_bytes"] + r["adamw_state_bytes"]) / 2**30
            planned = r["planner"]["allocated_peak_bytes"]
            lines.append(f"| {r['batch']} | {r['device']} | {r.get('peak_allocated_gib', '–')} | {round(planned / 2**30, 3) if planned else '–'} | "
                         f"{r['planner_over_measured'] or '–'} | {r['step_s']} | {static:.3f} |")
        lines += ["", f"Planner: {tm['rows'][0]['planner']['note']}", ""]
    dec = sections.get("decode")
    if dec and dec.get("sizes"):
        lines += [f"## Decode → model input {dec['model_input']}", "",
                  "| JPEG | CPU service decode, 1 thread img/s | CPU, all threads img/s | GPU decode img/s | GPU decode + resize + normalise img/s | GPU pixels vs service mean / max \\|Δ\\| |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for size, s in dec["sizes"].items():
            c, g = s["cpu_service_decode"], s.get("gpu_decode")
            gcols = (f"{g['decode_images_per_s']} | {g['decode_and_preprocess_images_per_s']} | {g['pixels_vs_service']['mean_abs_diff_uint8']} / "
                     f"{g['pixels_vs_service']['max_abs_diff_uint8']}") if g else "– | – | –"
            lines.append(f"| {size} | {c['one_thread_images_per_s']} | {c['all_cores_images_per_s']} ({c['threads']} threads) | {gcols} |")
        lines.append("")
    svc = sections.get("service")
    if svc and svc.get("load"):
        from benchmarks.service_load import load_table

        r = svc["ratio"]
        lines += [f"## Service end to end: {SERVERS[svc['server']]}", "", f"Server chosen: {svc['server_why']}. Artifact {svc['artifact']}, engine "
                  f"{svc['info']['engine']['engine']}; GPU decode: {svc.get('gpu_decode', 'not recorded')}; "
                  f"one JPEG per request (target: service ÷ engine ≥ 0.95 on ViT-L FP16). Service {r['service_images_per_s']} img/s ÷ raw engine at batch {r['engine_batch']} = "
                  f"**{r['service_over_engine']}** (÷ engine + one-thread decode: {r['service_over_engine_plus_one_thread_decode']}).", "",
                  load_table(svc["load"]), ""]  # fmt: skip
    lines += ["## Not run, and why", ""]
    for name, sec in sections.items():
        by_reason: dict[str, list[str]] = {}
        for part, why in ({name: sec.get("why", "")} if sec["status"] == "skipped" else sec.get("skipped") or {}).items():
            by_reason.setdefault(why, []).append(part)
        lines += [f"- {name}: {', '.join(parts)}: {why}" for why, parts in by_reason.items()]
    failures = {k: v for k, v in sections.items() if v["status"] == "failed"}
    if failures:
        lines += ["", "## Failures", ""]
        for name, sec in failures.items():
            lines += [f"### {name}: {sec.get('error')}", "", "```", sec.get("traceback_tail") or sec.get("output_tail") or "", "```", ""]
    return "\n".join(lines) + "\n"


def _engine_markdown(name: str, sec: dict) -> list[str]:
    from service.artifact import ParityReport
    from service.parity import format_table

    m = sec["model"]
    lines = [f"## {name}: {m['gflop_per_image']} GFLOP/image, {m['parity_images']['count']} parity images, FP32 reference on {m['reference']['device']}", "",
             "| engine | batch | img/s | ms/batch | model TFLOP/s | fraction of matmul | first call s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    reports = {}
    for engine, v in sec["variants"].items():
        for r in v.get("rows", []):
            lines.append(f"| {engine} | {r['batch']} | {r['images_per_s']} | {r['ms_per_batch']} | {r['model_tflops']} | "
                         f"{r['fraction_of_matmul'] if r['fraction_of_matmul'] is not None else '–'} | {r['first_call_s']} |")
        if v.get("error"):
            lines.append(f"| {engine} | – | failed: {v['error'][:120]} | | | | |")
        if "parity" in v:
            reports[engine] = ParityReport.model_validate(v["parity"])
    lines.append("")
    notes = [f"- {engine}: {v['note']}" + (f"; {v['stopped']}" if v.get("stopped") else "") + (f"; compile: {v['compile']}" if v.get("compile") else "")
             for engine, v in sec["variants"].items()]  # fmt: skip
    if reports:
        lines += ["Parity against FP32, export's gate (service.parity.check_engine, DEFAULT_THRESHOLDS):", "", "```", format_table(reports), "```"]
    return lines + notes + [""]


def plot(payload: dict, out: Path, stem: str) -> dict[str, Path]:
    """img/s and fraction of the matmul rate by batch for each model's engines; the service's latency–throughput."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        payload["figures"] = {"written": False, "why": f"matplotlib is not installed; draw them anywhere: python -m benchmarks.gpu_check --replot {out / stem}.json"}
        return {}
    paths: dict[str, Path] = {}
    models: dict[str, dict] = {}  # engines/<model> and compile/<model> share the model's axes
    for name, sec in _engine_sections(payload).items():
        model = models.setdefault(name.split("/", 1)[1], {"gflop": sec["model"]["gflop_per_image"], "variants": {}})
        model["variants"].update(sec["variants"])
    if models:
        fig, axes = plt.subplots(len(models), 2, figsize=(12, 3.8 * len(models)), dpi=110, squeeze=False)
        for (name, model), (ax_rate, ax_frac) in zip(models.items(), axes):
            for engine, v in model["variants"].items():
                rows = v.get("rows") or []
                if rows:
                    ax_rate.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], "-o", ms=3, label=engine)
                    ax_frac.plot([r["batch"] for r in rows], [r["fraction_of_matmul"] or np.nan for r in rows], "-o", ms=3, label=engine)
            for ax, ylabel in ((ax_rate, "images/s"), (ax_frac, "model FLOP rate ÷ measured matmul rate")):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("batch")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{name} ({model['gflop']} GFLOP/image)", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
            ax_rate.set_yscale("log")
            ax_rate.legend(fontsize=7)
        fig.suptitle(f"vitserve GPU check: {payload['environment'].get('gpu') or 'CPU dry run'} (git {payload['environment']['git_sha']})", fontsize=10)
        fig.tight_layout()
        paths["png"] = out / f"{stem}.png"
        fig.savefig(paths["png"])
        plt.close(fig)
    svc = payload["sections"].get("service") or {}
    if svc.get("load"):
        from benchmarks.plot import latency_throughput

        result = {"services": {"vitserve": svc["load"]}, "raw_engine": svc.get("raw_engine")}
        paths["service_png"] = latency_throughput(result, out / f"{stem}_service.png", f"vitserve on {svc['server']}: latency against throughput")
    payload["figures"] = {"written": True, "files": [p.name for p in paths.values()]}
    return paths


def summary_rows(payload: dict) -> list[tuple[str, str]]:
    s = payload["sections"]
    rows = [("steps", ", ".join(f"{k} {v['status']}" for k, v in s.items()))]
    envs = s.get("environment", {})
    if envs.get("gpu"):
        smi = ((envs.get("nvidia_smi") or {}).get("gpus") or [{}])[0]
        rows.append(("gpu", f"{envs['gpu']['name']} {envs['gpu']['memory_gib']} GiB, driver {smi.get('driver_version')}, CUDA {envs.get('torch_cuda')}"))
    for m in envs.get("matmul", []):
        rows.append((f"matmul {m['device']} {m['precision']}", f"{m['tflops']} TFLOP/s (n={m['n']})"))
    if "counts" in s.get("pytest", {}):
        c = s["pytest"]["counts"]
        rows.append(("pytest gpu|tensorrt", f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"))
    for name, sec in _engine_sections(payload).items():
        for engine, v in sec["variants"].items():
            if v.get("rows"):
                best = max(v["rows"], key=lambda r: r["images_per_s"])
                frac = f", {best['fraction_of_matmul']:.2f} of matmul" if best["fraction_of_matmul"] else ""
                verdict = "PASS" if v["parity"]["passed"] else "FAIL"
                rows.append((f"{name.split('/', 1)[1]} {engine}", f"{best['images_per_s']:.1f} img/s at b{best['batch']}{frac}; parity {verdict}"))
            elif v.get("error"):
                rows.append((f"{name.split('/', 1)[1]} {engine}", f"failed: {v['error'][:60]}"))
    for r in s.get("training_memory", {}).get("rows", []):
        rows.append((f"train step b{r['batch']}", f"{r.get('peak_allocated_gib', '–')} GiB peak, {r['step_s']} s/step"))
    for size, d in s.get("decode", {}).get("sizes", {}).items():
        g = d.get("gpu_decode")
        rows.append((f"decode {size}", f"CPU {d['cpu_service_decode']['all_cores_images_per_s']} img/s ({d['cpu_service_decode']['threads']} thr)"
                     + (f", GPU {g['decode_and_preprocess_images_per_s']} img/s" if g else ", GPU –")))
    svc = s.get("service", {})
    if svc.get("load"):
        o = svc["load"]["open_loop"][0]
        rows.append(("service", f"{svc['ratio']['service_images_per_s']:.1f} img/s peak ({svc['server']}); open {o['target_rate_rps']}/s "
                                f"p50 {o['latency']['p50_ms']} / p99 {o['latency']['p99_ms']} ms; ÷ engine {svc['ratio']['service_over_engine']:.3f}"))
    return rows


# ---- main ------------------------------------------------------------------------------------------------------------------
STEP_ORDER = ("environment", "pytest", "engines", "engines/demo", "training_memory", "decode", "service", "compile")


def build_parser() -> argparse.ArgumentParser:
    try:
        from benchmarks.cli import HelpFormatter
    except ImportError:  # pragma: no cover - the cli imports nothing heavy, but this check must start anywhere
        HelpFormatter = argparse.RawDescriptionHelpFormatter  # noqa: N806
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="rehearse on CPU: tiny model and sizes, GPU-only parts skipped with their reason")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: benchmarks/results/gpu-check_<machine>/; dry run: build/gpu-check-dry-run/)")
    p.add_argument("--steps", default=",".join(STEP_ORDER), help="the steps to run, comma-separated (e.g. to re-run the ones that failed)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (default: 540, dry run 150)")
    p.add_argument("--server", choices=("auto", "bentoml", "uvicorn"), default="auto",
                   help="service step: `vitserve serve` (BentoML), our ASGI app under plain uvicorn, or BentoML where it imports")
    p.add_argument("--serve-artifact", type=Path, default=DEMO_ARTIFACT, help="the artifact the service step serves")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode of the compile step (Inductor)")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON", help="only draw the figures of an earlier run's JSON, beside it")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.replot:
        payload = json.loads(args.replot.read_text())
        for path in plot(payload, args.replot.parent, args.replot.stem).values():
            print(f"wrote {path}")
        return 0
    packages = prepare_packages()
    from benchmarks.cli import quiet_libraries

    quiet_libraries()
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.dry_run:
        import torch

        # Tiny models gain nothing from threads, and on a shared 2-core machine two spinning OpenMP threads made the
        # demo model 50x slower (224 instead of 14 ms a call): the rehearsal checks that things run, not their speed.
        torch.set_num_threads(1)
    run = Run(plan, args, argv, packages)
    if not args.dry_run and not run.cuda:
        run.log("warning: no CUDA GPU visible; every GPU part is skipped with its reason (use --dry-run for the quick rehearsal)")
    steps = {
        "environment": ("environment", step_environment),
        "pytest": ("pytest", step_pytest),
        "engines": (f"engines/{plan.model}", engines_step(plan.model, engine_variants)),
        "engines/demo": ("engines/demo", engines_step("demo", engine_variants)),
        "training_memory": ("training_memory", step_training_memory),
        "decode": ("decode", step_decode),
        "service": ("service", step_service),
        "compile": (f"compile/{plan.model}", engines_step(plan.model, compile_variants)),
    }
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(wanted) - set(steps)
    if unknown:
        print(f"unknown step(s) {sorted(unknown)}; choose from {', '.join(STEP_ORDER)}", file=sys.stderr)
        return 2
    run.log(f"GPU check{' (dry run)' if args.dry_run else ''} → {run.out}; time limit {run.deadline - run.t0:.0f} s")
    try:
        for kind in STEP_ORDER:
            if kind in wanted:
                name, fn = steps[kind]
                run.step(name, kind, fn)
        paths = run.save(figures=True)
    finally:
        run.close()
    rows = summary_rows(run.payload)
    rows.append(("written", ", ".join(str(p) for p in paths.values())))
    print_summary("GPU check" + (" (dry run)" if args.dry_run else ""), run.payload, rows)
    return 1 if any(s["status"] == "failed" for s in run.payload["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
