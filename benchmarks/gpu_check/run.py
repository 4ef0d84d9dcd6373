"""One check: its clock, its steps each within a budget, and the results rewritten after every step."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.gpu_check import STARTED
from benchmarks.gpu_check.plan import (
    DEMO_CHECKPOINT, ISOLATED_STEPS, LOGS_ARCHIVE, MAX_OUTPUT_DEPTH, MAX_OUTPUT_FILES, NAME, PROG, RESERVE_S, ROOT, Plan, tail_of,
)
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
    """One check: its plan, output folder, scratch folder, what the steps share, and the payload written after each.

    The output folder holds only what comes back from a GPU machine (plan.MAX_OUTPUT_FILES): the JSON, the markdown,
    the figures, this run's log, and every other log (pytest's, the servers', an isolated step's) packed into one
    archive from ``self.logs`` after every step."""

    def __init__(self, plan: Plan, args, argv: list[str], packages: dict):
        self.plan, self.args, self.dry_run = plan, args, args.dry_run
        self.t0 = STARTED
        self.deadline = self.t0 + (args.time_limit or plan.time_limit_s)
        env = environment()
        self.out = Path(args.out) if args.out else (ROOT / "build" / f"{NAME}-dry-run" if args.dry_run else result_stem(NAME, env))
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="vitserve-gpu-check-"))  # checkpoints, servers: never into OUT
        self.logs = self.work / "logs"  # packed into OUT/logs.tar.gz
        self.logs.mkdir()
        self.stem = f"{NAME}_{env_tag(env)}"
        self._log = open(self.out / f"{NAME}.log", "a" if args.steps == "failed" else "w")
        self.ceilings: dict[tuple[str, str], float] = {}  # (device, precision) → measured matmul TFLOP/s
        self.cache: dict[str, object] = {}  # what later steps reuse: checkpoints, parity images, model contexts
        self.current: str | None = None  # the step running now (its progress is saved under this name)
        self.isolate = not getattr(args, "child", None)  # a child process runs its one step directly
        self.payload = {
            "benchmark": "gpu_check", "dry_run": self.dry_run,
            "command": f"{PROG if Path(sys.argv[0]).stem == 'vitserve' else 'python -m benchmarks.gpu_check'} {' '.join(argv)}",
            "environment": env, "load_average": {"before": load_average()}, "packages": packages,
            "plan": {k: v for k, v in plan.__dict__.items()}, "time_limit_s": self.deadline - self.t0, "sections": {},
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

    # ---- steps ----------------------------------------------------------------------------------------------------
    def budget_for(self, kind: str) -> float:
        if not self.isolate:  # a child: the parent gave it its step's budget as the time limit, and checked it
            return self.deadline - time.monotonic() - 1.0
        return min(self.plan.budgets[kind], self.deadline - time.monotonic() - RESERVE_S)

    def step(self, name: str, kind: str, fn: Callable[[Run, Budget], dict]) -> None:
        """Run one step within its budget; whatever happens, record it and write the results so far. A step in
        plan.ISOLATED_STEPS runs in a child process that is killed at its budget."""
        seconds = self.budget_for(kind)
        sections = self.payload["sections"]
        if self.isolate and seconds < min(10.0, self.plan.budgets[kind]):
            sections[name] = {"status": "skipped", "why": f"no time left in the run's limit ({seconds:.0f} s would remain)"}
            self.log(f"{name}: skipped, no time left")
            self.save()
            return
        isolated = self.isolate and kind in ISOLATED_STEPS
        self.log(f"{name}: start (budget {seconds:.0f} s{', in a child process' if isolated else ''})")
        budget = Budget(seconds)
        self.current = name
        try:
            result = self._in_child(name, kind, budget) if isolated else fn(self, budget)
            status = result.pop("status", None) or ("partial" if result.get("skipped") else "ok")
        except Exception as e:  # noqa: BLE001 - one step failing must not lose the others' figures
            result = {"error": f"{type(e).__name__}: {e}"[:500], "traceback_tail": tail_of(traceback.format_exc())}
            status = "failed"
        self.current = None
        spent = time.monotonic() - budget.start
        sections[name] = {"status": status, "seconds": round(spent, 1), "budget_s": round(seconds, 1), **result}
        self.log(f"{name}: {status} in {spent:.1f} s" + (f" ({result['error']})" if status == "failed" else ""))
        self.save()

    def progress(self, result: dict) -> None:
        """What the running step has so far, saved: a step stopped at its budget (or a run cut short) keeps it."""
        if self.current is not None:
            self.payload["sections"][self.current] = {"status": "running", **result}
            self.save()

    def _in_child(self, name: str, kind: str, budget: Budget) -> dict:
        """The step in `python -m benchmarks.gpu_check --child KIND`, given what this run already has (checkpoints,
        matmul ceilings); its output streams into this log; killed with its process group at the budget."""
        handoff = self.work / f"handoff-{kind}.json"
        handoff.write_text(json.dumps({
            "ceilings": [[d, p, t] for (d, p), t in self.ceilings.items()],
            "cache": {k: str(v) for k, v in self.cache.items() if k.startswith("checkpoint/")},
        }))  # fmt: skip
        out = self.work / f"child-{kind.replace('/', '-')}"
        a = self.args
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", kind, "--handoff", str(handoff), "--out", str(out),
               "--time-limit", str(round(budget.left(), 1)), "--server", a.server, "--serve-artifact",
               str(a.serve_artifact), "--compile-mode", a.compile_mode, *(["--dry-run"] if self.dry_run else [])]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        with open(self.logs / f"{kind.replace('/', '-')}.log", "w") as log:
            relay = threading.Thread(target=_relay, args=(proc.stdout, log, self.log), daemon=True)
            relay.start()
            stopped = wait_or_kill_group(proc, budget.left() + 3.0)  # 3 s for the child to save what it has
            relay.join(timeout=5)
        try:  # what the child saved last; a kill in the middle of a write leaves no readable JSON
            section = json.loads((out / f"{self.stem}.json").read_text())["sections"].get(name, {})
        except (OSError, ValueError, KeyError):
            section = {}
        for key in ("seconds", "budget_s"):
            section.pop(key, None)
        if stopped:
            return {**section, "status": "failed", "error": f"stopped at its budget ({budget.seconds:.0f} s): the child "
                    f"process was killed; what it had saved is kept", "stopped_at_budget": True}  # fmt: skip
        if proc.returncode != 0 and not section:
            return {"status": "failed", "error": f"the child process exited with {proc.returncode} and saved nothing"}
        return section

    def resume(self) -> list[str]:
        """`--steps failed`: this output folder's earlier results, and the steps that did not end ok or partial."""
        earlier = self.out / f"{self.stem}.json"
        if not earlier.is_file():
            raise FileNotFoundError(f"--steps failed: no earlier results in {earlier}; run the whole check first")
        previous = json.loads(earlier.read_text())
        self.payload["sections"] = previous["sections"]
        if (self.out / LOGS_ARCHIVE).is_file():  # the earlier logs stay in the archive beside the rerun's
            with tarfile.open(self.out / LOGS_ARCHIVE) as tar:
                tar.extractall(self.logs, filter="data")
        self.payload["earlier_command"] = previous.get("command")
        for m in (previous["sections"].get("environment") or {}).get("matmul") or []:
            self.ceilings[(m["device"], m["precision"])] = m["tflops"]
        names = {f"engines/{self.plan.model}": "engines", f"compile/{self.plan.model}": "compile"}
        return [names.get(n, n) for n, sec in previous["sections"].items() if sec.get("status") not in ("ok", "partial")]

    def hand_over(self, handoff: Path) -> None:
        """In a child: what the parent run had made, so the step does not make it again."""
        given = json.loads(handoff.read_text())
        self.ceilings = {(d, p): t for d, p, t in given["ceilings"]}
        self.cache.update({k: Path(v) for k, v in given["cache"].items()})

    # ---- results --------------------------------------------------------------------------------------------------
    def save(self, figures: bool = False) -> dict[str, Path]:
        self.payload["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.payload["load_average"]["after"] = load_average()
        archive = pack_logs(self.logs, self.out / LOGS_ARCHIVE)
        paths = write_results(self.payload, self.out, self.stem, figures=figures, log=self.log)
        self.payload["output_files"] = output_files(self.out)  # now that every file is there: recorded in the JSON too
        paths = {**write_results(self.payload, self.out, self.stem, figures=False, log=self.log), **paths}
        return paths if archive is None else {**paths, "logs": archive}

    def close(self) -> None:
        self._log.close()
        shutil.rmtree(self.work, ignore_errors=True)


def _relay(stream, log, say: Callable[[str], None]) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        say("  | " + line.rstrip())


def wait_or_kill_group(proc: subprocess.Popen, seconds: float) -> bool:
    """Wait for a process started with start_new_session=True; past ``seconds`` kill its whole group (a pytest and
    the exporter it started, a child check and its compile workers). True when it had to be killed."""
    try:
        proc.wait(timeout=max(1.0, seconds))
        return False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def pack_logs(folder: Path, archive: Path) -> Path | None:
    """Every log in ``folder`` as one gzipped tar (written beside, then renamed: a reader never sees half of one)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        return None
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.relative_to(folder).as_posix())
    tmp.replace(archive)
    return archive


def output_files(out: Path) -> dict:
    """What the folder holds, against what comes back from a GPU machine (plan.MAX_OUTPUT_FILES / MAX_OUTPUT_DEPTH)."""
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    depth = max((f.count("/") for f in files), default=0)
    return {"files": files, "count": len(files), "depth": depth,
            "within_limits": len(files) <= MAX_OUTPUT_FILES and depth <= MAX_OUTPUT_DEPTH,
            "limits": {"files": MAX_OUTPUT_FILES, "depth": MAX_OUTPUT_DEPTH}}
