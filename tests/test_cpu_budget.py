"""One CPU budget: the cores a process may really use, the rule that shares them, and decode and engine taking turns."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from service import cpu_budget
from service.batcher import Batcher
from service.cpu_budget import CpuGate, available_cores, plan


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_budget._cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_budget._cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cpu_budget._cgroup_quota(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cpu_budget._cgroup_quota(tmp_path) is None


def test_cores_are_affinity_capped_by_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(cpu_budget, "_cgroup_quota", lambda: 2.5)
    assert available_cores() == 2  # a 2.5-CPU quota keeps 2 threads busy, not 6 (and not os.cpu_count())
    monkeypatch.setattr(cpu_budget, "_cgroup_quota", lambda: None)
    assert available_cores() == 6
    monkeypatch.setattr(cpu_budget, "_cgroup_quota", lambda: 0.5)
    assert available_cores() == 1  # never 0


def test_the_rule_and_its_overrides(monkeypatch):
    monkeypatch.setattr(cpu_budget, "available_cores", lambda: 4)
    cpu = plan(cpu_engine=True)
    assert (cpu.cores, cpu.engine_threads, cpu.decode_threads, cpu.gate, cpu.idle_spinning) == (4, 4, 4, True, False)
    gpu = plan(cpu_engine=False)
    assert (gpu.engine_threads, gpu.decode_threads, gpu.gate) == (0, 4, False)
    mine = plan(cpu_engine=True, cores=16, decode_threads=2, engine_threads=12, gate=False)
    assert (mine.cores, mine.engine_threads, mine.decode_threads, mine.gate, mine.idle_spinning) == (16, 12, 2, False, True)
    assert mine.source == "VITSERVE_CPU_CORES"


def test_a_cpu_engine_taking_turns_spins_inside_a_run_and_stops_as_it_returns():
    """The gated plan's ONNX Runtime session: its pool stops spinning when a run returns (the decode turn gets the
    cores) and keeps ORT's default inside a run (spinning: sleeping between a ViT's parallel regions made batches
    9-24 % slower, `vitserve bench engine-turns`). The plan without a gate leaves ORT's defaults alone."""
    from pathlib import Path

    from service.artifact import load_artifact
    from service.engines import select_engine

    artifact = load_artifact(Path(__file__).resolve().parents[1] / "service" / "demo_artifact")

    def options(idle_spinning: bool):
        engine = select_engine(artifact, "onnxruntime-cpu", intra_op_threads=2, idle_spinning=idle_spinning, check=False).engine
        return engine._session.get_session_options()

    gated = options(idle_spinning=False)
    assert gated.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # not set: ORT spins inside a run
        gated.get_session_config_entry("session.intra_op.allow_spinning")
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options(idle_spinning=True).get_session_config_entry("session.force_spinning_stop")
    out = select_engine(artifact, "onnxruntime-cpu", intra_op_threads=2, idle_spinning=False, check=False).engine.run(
        np.zeros((2, 3, *artifact.manifest.preprocessing.resize_size), np.float32))
    assert out.shape == (2, len(artifact.manifest.labels)) and np.isfinite(out).all()


def test_decodes_and_a_cpu_batch_never_overlap_and_newcomers_go_first_only_briefly():
    # Times in tenths of a second, so a busy CI machine's scheduling delays (milliseconds) cannot reorder them.
    gate = CpuGate(patience_s=0.3)
    events: list[tuple[str, str, float]] = []
    lock = threading.Lock()

    def log(who: str, what: str):
        with lock:
            events.append((who, what, time.perf_counter()))

    def decode(name: str, seconds: float = 0.2):
        with gate.decode():
            log(name, "start")
            time.sleep(seconds)
            log(name, "end")

    def engine():
        with gate.engine():
            log("engine", "start")
            time.sleep(0.3)
            log("engine", "end")

    def start(fn, *args, after: float = 0.0) -> threading.Thread:
        time.sleep(after)
        t = threading.Thread(target=fn, args=args)
        t.start()
        return t

    threads = [start(decode, "d0"), start(decode, "d1")]
    threads.append(start(engine, after=0.05))
    threads.append(start(decode, "early", after=0.05))  # within the batch's patience: goes before it
    threads.append(start(decode, "late", after=0.35))  # past it (and while the batch runs): waits for the batch
    for t in threads:
        t.join()
    t = {(who, what): at for who, what, at in events}
    decodes = [w for w, what, _ in events if what == "start" and w != "engine"]
    for name in decodes:  # no decode ever overlaps the batch
        assert t[name, "end"] <= t["engine", "start"] or t[name, "start"] >= t["engine", "end"], name
    assert t["early", "start"] < t["engine", "start"]
    assert t["late", "start"] >= t["engine", "end"]
    assert t["d1", "start"] < t["d0", "end"]  # decodes run side by side


def test_disabled_gate_lets_everything_run_together():
    gate = CpuGate(enabled=False)
    inside = threading.Event()

    def hold_all() -> None:
        with gate.engine(), gate.decode(), gate.decode():  # an enabled gate never lets these overlap
            inside.set()

    threading.Thread(target=hold_all, daemon=True).start()
    assert inside.wait(10), "a disabled gate made the engine and two decodes wait for each other"


def test_a_batch_waits_briefly_for_images_still_being_decoded():
    """Two requests: one image queued, three more announced as decoding. The batch holds for them (up to the bound)
    instead of closing with one image after max_wait."""
    seen: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return np.zeros((len(x), 2), np.float32)

    async def scenario():
        b = Batcher(run, max_batch_size=8, max_wait_s=0.002, queue_capacity=16)
        b.start()
        b.expect(3)
        first = asyncio.create_task(b.submit(np.zeros((1, 3, 2, 2), np.float32), time.monotonic() + 5))
        await asyncio.sleep(0.02)  # 10 × max_wait: without the hold the first image would have gone alone

        async def arrive():  # as the classifier does: the images land in the same step as the count drops
            b.expect(-3)
            return await b.submit(np.zeros((3, 3, 2, 2), np.float32), time.monotonic() + 5)

        await asyncio.gather(first, arrive())
        b.expect(5)  # announced but never arriving (e.g. failed to decode without telling): the hold is bounded
        t0 = time.monotonic()
        await b.submit(np.zeros((1, 3, 2, 2), np.float32), time.monotonic() + 5)
        waited = time.monotonic() - t0
        await b.close(1)
        return waited

    waited = asyncio.run(scenario())
    assert seen[0] == 4, seen
    assert waited < 0.5, waited


def test_pool_threads_carry_their_role_as_os_thread_names_and_answer_on_the_loop():
    """What `top -H`, perf and the benchmarks' CPU budget by thread read (/proc/<pid>/task/<tid>/comm); results and
    exceptions come back to the awaiting coroutine, and a job cancelled before it starts never runs."""
    from service.thread_pool import LoopThreads

    pool = LoopThreads("vitserve-decode", 2)
    ran = []

    def comm() -> str:
        ran.append(1)
        return open(f"/proc/self/task/{threading.get_native_id()}/comm").read().strip()

    async def main():
        assert await pool.run(comm) == "vitserve-decode"
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
        gate = threading.Event()
        blockers = [pool.run(gate.wait) for _ in range(2)]  # both threads busy
        cancelled = pool.run(comm)
        cancelled.cancel()
        gate.set()
        await asyncio.gather(*blockers)
        assert await pool.run(len, "abc") == 3  # behind the cancelled job: it was skipped by now

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()
    assert len(ran) == 1
