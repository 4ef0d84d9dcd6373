"""Time an engine across batch sizes against the device's own matmul rate: the one sweep that `vitserve bench engines`
and the GPU check both run, so their rows mean the same thing."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.harness.measure import cpu_snapshot, other_cpu_load, time_call


@dataclass
class Variant:
    """One way to run the model, built only when its turn comes (a failed build must not lose the others)."""

    name: str
    device: str  # "cpu" | "cuda"
    build: Callable[[], object]  # → what the caller sweeps: an engine, or batch → a no-arg call running one batch
    note: str = ""
    precision: str = "fp32"  # the parity gate's thresholds, and which matmul rate is the ceiling
    weight: float = 1.0  # share of a time budget split between variants
    after: Callable[[], dict] | None = None  # facts to record once it has run (torch.compile's graphs and breaks)
    fallback: Variant | None = None  # run instead when this one fails
    batches: tuple[int, ...] | None = None  # its own batch sizes, where the caller's would not suit it
    gate_last: bool = False  # sweep before the parity gate: the gate's calls would cost more than the sweep's


def significant(x: float, digits: int = 4) -> float:
    """Rounded to significant digits: a CPU's 0.0004 TFLOP/s must not print as 0."""
    return float(f"{x:.{digits}g}")


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def matmul_tflops(device: str, precision: str, n: int, runs: int = 20) -> dict:
    """Dense (n×n)·(n×n) matmul on random data: the median of ``runs`` timed calls after warm-up, in TFLOP/s; the
    denominator of "fraction of the device" (measured now, on this device, not read off a datasheet)."""
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
    return {"device": device, "precision": precision, "n": n, "runs": runs, "median_ms": significant(median * 1000),
            "tflops": significant(flop / median / 1e12),
            "spread_tflops": [significant(flop / max(times) / 1e12), significant(flop / min(times) / 1e12)]}


def engine_calls(engine, largest: int) -> Callable[[int], Callable[[], object]]:
    """batch (≤ ``largest``) → a call of ``engine.run`` on random (never zero) host inputs, as the batcher calls it."""
    h, w = engine.input_size
    x_all = np.random.default_rng(0).standard_normal((largest, 3, h, w), dtype=np.float32)
    return lambda b: (lambda x=x_all[:b]: engine.run(x))


def sweep(call_for: Callable[[int], Callable[[], object]], batches, *, device: str, flops_per_image: float,
          ceiling_tflops: float | None, min_seconds: float, seconds: float | None = None, max_batch: int | None = None,
          record_errors: bool = False) -> dict:
    """img/s by batch size. ``call_for(b)`` gives a no-arg call running one batch of ``b``; CUDA work is synchronised
    inside the timing. A size's first call (graph capture, compilation) is timed apart. The sweep stops before a size
    above ``max_batch`` or whose expected time no longer fits ``seconds``; a failing size stops it too, recorded
    when ``record_errors`` (a larger batch would fail the same way), raised otherwise."""
    start = time.monotonic()
    rows, stopped, per_image_s = [], None, None
    for b in batches:
        if max_batch is not None and b > max_batch:
            stopped = f"batch {b} is above the engine's maximum {max_batch}"
            break
        left = None if seconds is None else seconds - (time.monotonic() - start)
        if per_image_s is not None and left is not None:
            need = per_image_s * b * 8 + min_seconds  # first call (a graph capture is 4 calls), warm-up, 3 timed
            if need > left:
                stopped = f"stopped before batch {b}: about {need:.1f} s needed, {max(0.0, left):.1f} s left of its budget"
                break
        try:
            call = call_for(b)

            def timed(call=call):
                call()
                synchronize(device)

            t = time.perf_counter()
            timed()
            first_call_s = time.perf_counter() - t
            cpu0 = cpu_snapshot()
            r = time_call(timed, warmup=1, min_repeats=3, min_seconds=min_seconds)
            cpu = other_cpu_load(cpu0, cpu_snapshot())
        except Exception as e:  # noqa: BLE001 - recorded, or raised to the caller that decides
            if not record_errors:
                raise
            rows.append({"batch": b, "error": f"{type(e).__name__}: {e}"[:500]})
            stopped = f"batch {b} failed"
            break
        ips = b / r["median_s"]
        per_image_s = r["median_s"] / b
        tflops = ips * flops_per_image / 1e12
        rows.append({
            "batch": b, "images_per_s": round(ips, 3), "seconds_per_batch": round(r["median_s"], 9),
            "ms_per_batch": round(r["median_s"] * 1000, 3), "repeats": r["repeats"],
            "spread_ms": [round(r["min_s"] * 1000, 3), round(r["max_s"] * 1000, 3)], "first_call_s": round(first_call_s, 3),
            "model_tflops": significant(tflops), "fraction_of_matmul": significant(tflops / ceiling_tflops) if ceiling_tflops else None,
            "other_processes_cores": cpu["other_processes_cores"],  # CPU other jobs took meanwhile (should be ~0)
        })  # fmt: skip
    return {"rows": rows, "stopped": stopped}
