"""Timing and CPU accounting shared by every benchmark: repeated calls to a median, latency percentiles, and how
much CPU this process tree and everything else on the machine took over a window."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def percentile(values, q: float) -> float | None:
    """The q-th percentile (0–100) with linear interpolation between closest ranks (numpy's default method).

    None for no values. Written out rather than calling numpy so the tests can check it against hand-worked cases.
    """
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary_ms(seconds) -> dict:
    """count, mean, p50/p90/p99 and max of latencies given in seconds, reported in milliseconds."""
    xs = [float(s) for s in seconds]
    out: dict = {"count": len(xs)}
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        v = percentile(xs, q)
        out[f"{key}_ms"] = None if v is None else round(v * 1000, 3)
    out["mean_ms"] = round(sum(xs) / len(xs) * 1000, 3) if xs else None
    out["max_ms"] = round(max(xs) * 1000, 3) if xs else None
    return out


def load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages: other work on a shared box skews every figure, so record it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_snapshot() -> dict:
    """Machine-wide busy CPU seconds and this process tree's CPU seconds (itself, reaped children, and every live
    descendant such as a server it started), now. Two snapshots give how much CPU *other* processes took meanwhile."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
    me = psutil.Process()
    own = sum(me.cpu_times()[:4])  # user, system, children_user, children_system
    for child in me.children(recursive=True):
        try:
            own += sum(child.cpu_times()[:4])
        except psutil.Error:
            pass
    return {"wall": time.monotonic(), "busy": busy, "own": own}


def other_cpu_load(before: dict, after: dict) -> dict:
    """Mean cores busy between two snapshots: on the machine, in our process tree, and in everything else."""
    wall = max(after["wall"] - before["wall"], 1e-9)
    busy = (after["busy"] - before["busy"]) / wall
    own = (after["own"] - before["own"]) / wall
    return {"seconds": round(wall, 1), "machine_busy_cores": round(busy, 2), "ours_cores": round(own, 2),
            "other_processes_cores": round(max(0.0, busy - own), 2)}


def wait_until_quiet(max_wait_s: float, *, threshold_cores: float = 0.3, sample_s: float = 5.0, log=print) -> dict:
    """Before measuring on a shared machine: wait (at most ``max_wait_s``) until processes outside this one use less
    than ``threshold_cores`` over a ``sample_s`` sample. Returns what was seen; never raises."""
    waited, seen = 0.0, None
    while True:
        before = cpu_snapshot()
        time.sleep(sample_s)
        seen = other_cpu_load(before, cpu_snapshot())["other_processes_cores"]
        waited += sample_s
        if seen < threshold_cores or waited >= max_wait_s:
            break
        log(f"  machine busy: other processes use {seen:.2f} cores; waiting ({waited:.0f}/{max_wait_s:.0f} s)")
    return {"waited_s": round(waited, 1), "other_processes_cores": seen, "quiet": seen < threshold_cores}


def time_call(fn, *, warmup: int = 1, min_repeats: int = 3, min_seconds: float = 2.0, max_repeats: int = 1000) -> dict:
    """Warm up, then call ``fn`` until both ``min_repeats`` and ``min_seconds`` are reached; median and spread."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the server's whole process tree (BentoML's arbiter and workers)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def server_cpu_by_thread_s(pid: int) -> dict[str, float]:
    """The same CPU seconds as :func:`server_cpu_s`, by what each thread does, from /proc (Linux): ``event loop`` (the
    workers' main threads: HTTP, gRPC in Python, the batcher, rendering), ``decode`` and ``engine`` (the service names
    those OS threads, service/thread_pool.py; a batch assembled ahead is copied on the engine's behalf), ``other
    threads`` (ONNX Runtime's intra-op pool, which inherits its creator's name, and anything else in a worker), ``grpc front`` (the C++ gRPC front process) and
    ``arbiter`` (BentoML's process manager, the root). Empty where /proc has no task list."""
    import psutil

    tick = os.sysconf("SC_CLK_TCK")  # /proc's unit
    out: dict[str, float] = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            tasks, process = list(Path(f"/proc/{p.pid}/task").iterdir()), p.name()
        except (OSError, psutil.Error):
            continue
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            role = _thread_role(p.pid == pid, process, int(task.name) == p.pid, comm)
            out[role] = out.get(role, 0.0) + seconds
    return out


def _thread_role(is_root: bool, process: str, is_main: bool, comm: str) -> str:
    if is_root:
        return "arbiter"
    if process.startswith("vitserve-grpc"):
        return "grpc front"
    if comm.startswith("vitserve-decode"):
        return "decode"
    if comm.startswith(("vitserve-engine", "vitserve-assemble")):  # a batch's copy into one array is the engine's input
        return "engine"
    return "event loop" if is_main else "other threads"


def per_image_ms(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, float]:
    """CPU ms per image by role between two :func:`server_cpu_by_thread_s` readings, largest first."""
    rows = {k: (after[k] - before.get(k, 0.0)) * 1000 / max(images, 1) for k in after}
    return {k: round(v, 3) for k, v in sorted(rows.items(), key=lambda kv: -kv[1]) if v >= 0.0005}


THREAD_ROLES = ("event loop", "decode", "engine", "other threads", "grpc front", "arbiter")


def thread_budget_table(header: str, rows: list[tuple[str, dict[str, float]]]) -> list[str]:
    """Markdown: ``header`` (its cells, " | " apart), then ms per image for each role and their total, one row each."""
    cells = header.count("|") + 1
    lines = [f"| {header} | " + " | ".join(THREAD_ROLES) + " | total |", "|" + "---|" * (cells + len(THREAD_ROLES) + 1)]
    for label, by in rows:
        lines.append(f"| {label} | " + " | ".join(str(by.get(k, 0.0)) for k in THREAD_ROLES) + f" | {round(sum(by.values()), 3)} |")
    return lines
