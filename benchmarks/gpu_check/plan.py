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
# What comes back from the GPU machine: at most 8 files of its output folder, at most 2 folders deep (the device
# tool's limits). The run writes 6: the JSON, the markdown, two figures, its log, and every other log in one archive.
MAX_OUTPUT_FILES, MAX_OUTPUT_DEPTH = 8, 2
LOGS_ARCHIVE = "logs.tar.gz"
# Steps run in a child process that is killed at the step's budget: a torch.compile of ViT-L cannot be interrupted
# from inside, and one that overran would take the rest of the run with it.
ISOLATED_STEPS = ("compile",)


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
# takes about a minute. The budgets add up to 430 s and the limit is 450 s: within one 600 s device call the run
# leaves time for `--steps failed` on the still-warm machine (the session has 15 device-minutes in all).
GPU_PLAN = Plan(
    model="vit-large", batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), min_seconds=0.5, matmul_n=8192,
    parity_images=400, train_batches=(4, 16), decode_batch=64, load_concurrency=(8, 32, 128), load_warmup_s=2.0,
    load_duration_s=6.0, time_limit_s=450.0,
    budgets={"environment": 20, "pytest": 75, "engines": 130, "engines/demo": 20, "training_memory": 25, "decode": 20,
             "service": 65, "compile": 75},
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


