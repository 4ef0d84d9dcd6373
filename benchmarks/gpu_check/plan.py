"""Where the check runs from and what it writes, and the sizes and time budgets of one run (GPU or dry run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


NAME = "gpu-check"


PROG = "vitserve bench gpu-check"


WHEELS = ROOT / ".whl"  # filled by benchmarks/gpu_wheels.sh, carried to the GPU machine


SITE = WHEELS / "site"  # where carried wheels are installed: first on sys.path and on every child's PYTHONPATH


PHOTOS_FILE = "skimage_photos.npz"


DEMO_CHECKPOINT = ROOT / "service" / "demo_artifact" / "pytorch"


DEMO_ARTIFACT = ROOT / "service" / "demo_artifact"


RESERVE_S = 8.0  # kept back from the time limit for writing the results


TRACEBACK_CHARS = 3000


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


STEP_ORDER = ("environment", "pytest", "engines", "engines/demo", "training_memory", "decode", "service", "compile")


def tail_of(text: str, chars: int = TRACEBACK_CHARS) -> str:
    return text if len(text) <= chars else "…" + text[-chars:]


SERVERS = {"bentoml": "`vitserve serve` (BentoML)", "uvicorn": "our ASGI app under plain uvicorn (benchmarks.gpu_check.service.plain_asgi_app)"}


