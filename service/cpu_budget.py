"""One CPU budget for the whole worker: how many cores it may use, and who gets them.

The cores are what the kernel will actually give this process: its CPU affinity mask, capped by a cgroup CPU quota
(Kubernetes' `resources.limits.cpu`, `docker run --cpus`), never ``os.cpu_count()``, which counts the host's.

The rule (each part can be overridden by a setting):

- **CPU engine**: the engine's intra-op threads get every core, and so do the decode threads, but the two *take
  turns* (:class:`CpuGate`): a batch runs when no decode is running, decodes run when no batch is. On a machine the
  engine saturates, running both at once only makes each slower (measured on 2 cores, ViT-S: inference 40 ms/image
  and decode 19 ms/image in the service against 27.5 and 6.1 alone); taking turns costs the engine at most one
  decode's wait, and decodes then use all cores instead of one. ONNX Runtime's threads spin inside a call but stop
  as it returns (a pool spinning on burns the cores the decode turn needs; one that sleeps inside a call is slower).
- **GPU engine**: the GPU computes; every core decodes, without a gate.
- The event loop (HTTP and gRPC parsing) is the worker's main thread and is not counted: it only waits, parses and
  renders between the two.

With several BentoML workers each worker should get ``cores / workers`` (``VITSERVE_CPU_CORES``).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``; None = no limit."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Whole cores this process may keep busy: affinity ∩ cgroup quota (a quota of 1.5 gives 1), at least 1."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(affinity, math.floor(quota)) if quota else affinity)


@dataclass(frozen=True)
class ThreadPlan:
    cores: int
    engine_threads: int  # ONNX Runtime intra-op threads (0 = not a CPU engine)
    decode_threads: int
    gate: bool  # decode and the engine take turns
    idle_spinning: bool  # ONNX Runtime's pool may go on spinning after a run returns (inside a run it always spins)
    source: str  # where the core count came from

    def describe(self) -> dict:
        return {**self.__dict__, "rule": "CPU engine: engine and decode each get every core and take turns; GPU engine: every core decodes"}


def plan(*, cpu_engine: bool, cores: int = 0, decode_threads: int = 0, engine_threads: int = 0, gate: bool | None = None) -> ThreadPlan:
    """The rule above; any argument other than 0/None overrides its part."""
    source = "VITSERVE_CPU_CORES" if cores else "affinity and cgroup quota"
    cores = cores or available_cores()
    gate = cpu_engine if gate is None else gate
    return ThreadPlan(
        cores=cores,
        engine_threads=(engine_threads or cores) if cpu_engine else 0,
        decode_threads=decode_threads or cores,
        gate=gate,
        idle_spinning=not gate,
        source=source,
    )


# How long a batch lets decodes that arrive after it go first: a request arriving while the engine works is decoded
# as soon as the batch is done and joins the next one, instead of waiting behind it (that wait set the p99 at half
# load); after this the batch has the cores and newcomers wait, so a stream of decodes cannot starve the engine.
ENGINE_PATIENCE_S = 0.02


class CpuGate:
    """Decodes share the CPU with each other; an engine batch has it alone. Decodes go first for up to
    ``ENGINE_PATIENCE_S`` of a batch's wait, then the batch goes first."""

    def __init__(self, enabled: bool = True, patience_s: float = ENGINE_PATIENCE_S):
        self.enabled, self.patience_s = enabled, patience_s
        self._cv = threading.Condition()
        self._decoding = 0
        self._engine_running = False
        self._engine_waiting_since: float | None = None

    @contextlib.contextmanager
    def engine(self):
        if not self.enabled:
            yield
            return
        with self._cv:
            self._engine_waiting_since = time.monotonic()
            self._cv.notify_all()  # decodes waiting on the patience deadline re-check it
            self._cv.wait_for(lambda: self._decoding == 0 and not self._engine_running)
            self._engine_waiting_since = None
            self._engine_running = True
        try:
            yield
        finally:
            with self._cv:
                self._engine_running = False
                self._cv.notify_all()

    def abandon_engine(self) -> None:
        """The engine watchdog gave up on the running batch (service/batcher.py): decodes stop waiting for it, or a
        hung engine call would hold every decode too. The batcher starts no other batch until that call returns."""
        with self._cv:
            self._engine_running = False
            self._engine_waiting_since = None
            self._cv.notify_all()

    def _decode_may_start(self) -> bool:
        if self._engine_running:
            return False
        since = self._engine_waiting_since
        return since is None or time.monotonic() - since < self.patience_s

    @contextlib.contextmanager
    def decode(self):
        if not self.enabled:
            yield
            return
        with self._cv:
            while not self._decode_may_start():
                self._cv.wait(self.patience_s)  # wake to re-check: the patience deadline passes without a notify
            self._decoding += 1
        try:
            yield
        finally:
            with self._cv:
                self._decoding -= 1
                self._cv.notify_all()
