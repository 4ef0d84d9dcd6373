"""One check: its clock, its steps each within a budget, and the results rewritten after every step."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.gpu_check import STARTED
from benchmarks.gpu_check.plan import DEMO_CHECKPOINT, NAME, PROG, RESERVE_S, ROOT, Plan, tail_of
from benchmarks.gpu_check.report import write_results
from benchmarks.harness.measure import load_average
from benchmarks.harness.results import env_tag, environment, result_stem


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


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
            result = {"error": f"{type(e).__name__}: {e}"[:500], "traceback_tail": tail_of(traceback.format_exc())}
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


