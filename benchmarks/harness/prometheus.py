"""Read a service's /metrics: Prometheus text parsed into samples, and the per-stage means of a measured window
from the differences of its histograms (ours where present, BentoML's adaptive batching for the peers)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx

from benchmarks.harness.measure import cpu_snapshot
from service import metrics


# empty the figures read here. A histogram's samples add _sum/_count/_bucket to its name; a counter's add _total.
def _name(metric) -> str:
    return metric.describe()[0].name


# Names taken from the metric objects (service/metrics.py), so renaming one there cannot silently empty the figures
# read here. A histogram's samples add _sum/_count/_bucket to its name; a counter's add _total.
REQUEST = _name(metrics.REQUEST_SECONDS)


DECODE = _name(metrics.DECODE_SECONDS)


QUEUE_WAIT = _name(metrics.QUEUE_WAIT_SECONDS)


INFERENCE = _name(metrics.INFERENCE_SECONDS)


POSTPROCESS = _name(metrics.POSTPROCESS_SECONDS)


BATCH_SIZE = _name(metrics.BATCH_SIZE)


REQUESTS_TOTAL = _name(metrics.REQUESTS) + "_total"


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format → [(sample name, labels, value)]."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        try:
            out.append((name, labels, float(value)))
        except ValueError:
            continue
    return out


def total(samples: list, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == want for k, want in labels.items()))


async def scrape(client: httpx.AsyncClient, base: str) -> list | None:
    try:
        r = await client.get(f"{base}/metrics", timeout=10)
        return parse_prometheus(r.text) if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def scrape_window(client: httpx.AsyncClient, base: str, start: float, end: float, snapshots: dict) -> None:
    """/metrics and this machine's CPU counters at a measured window's start and end (perf_counter times), into
    ``snapshots`` (before, cpu_before, after, cpu_after)."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    snapshots["before"], snapshots["cpu_before"] = await scrape(client, base), cpu_snapshot()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    snapshots["after"], snapshots["cpu_after"] = await scrape(client, base), cpu_snapshot()


def _delta(before: list, after: list, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def _mean(before: list, after: list, name: str, **labels: str) -> float | None:
    n = _delta(before, after, f"{name}_count", **labels)
    return _delta(before, after, f"{name}_sum", **labels) / n if n > 0 else None


def _has(samples: list, name: str) -> bool:
    return any(n == name for n, _, _ in samples)


def stage_breakdown(before: list | None, after: list | None, window_s: float) -> dict:
    """Means over the window from the server's own histograms. Ours (service/metrics.py) where present; BentoML's
    adaptive-batching histogram for the peers that have one."""
    if not before or not after:
        return {"available": False}
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    out: dict = {"available": True}
    if _has(after, f"{BATCH_SIZE}_count"):
        inference_sum = _delta(before, after, f"{INFERENCE}_sum")
        batched_images = _delta(before, after, f"{BATCH_SIZE}_sum")
        batches = _delta(before, after, f"{BATCH_SIZE}_count")
        out.update({
            "source": "vitserve histograms",
            "batches": int(batches),
            "images": int(batched_images),
            "mean_batch_size": round(batched_images / batches, 2) if batches else None,
            "decode_ms_per_image": ms(_mean(before, after, DECODE)),
            "queue_wait_ms_per_image": ms(_mean(before, after, QUEUE_WAIT)),
            "inference_ms_per_batch": ms(_mean(before, after, INFERENCE)),
            "inference_ms_per_image": ms(inference_sum / batched_images) if batched_images else None,
            "postprocess_ms_per_request": ms(_mean(before, after, POSTPROCESS)),
            "server_request_ms": ms(_mean(before, after, REQUEST, status="200")),
            # Share of the window the engine was computing: below ~1 at saturation means it was starved.
            "engine_busy_fraction": round(inference_sum / window_s, 3) if window_s > 0 else None,
        })
    elif _has(after, "bentoml_service_adaptive_batch_size_count"):
        out.update({
            "source": "bentoml histograms",
            "mean_batch_size": _round(_mean(before, after, "bentoml_service_adaptive_batch_size"), 2),
            "batches": int(_delta(before, after, "bentoml_service_adaptive_batch_size_count")),
        })
    else:
        out["source"] = "bentoml histograms"
    dur = _mean(before, after, "bentoml_service_request_duration_seconds", endpoint="/classify")
    if dur is not None:
        out["bentoml_request_ms"] = ms(dur)
    return out


def _round(v, n):
    return None if v is None else round(v, n)
