"""Step decode: GPU JPEG decode (nvJPEG, batched) against the service's CPU decode."""

from __future__ import annotations

import numpy as np

from benchmarks.gpu_check.run import Budget, Run
from benchmarks.harness.results import NO_GPU

DECODE_SIZES = ((640, 480), (1920, 1080))


def cpu_decode(photos, pre, min_seconds: float) -> dict:
    """The service's decode + preprocess (Preprocessor.from_bytes): one thread, and every core the service would use."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.harness.measure import time_call
    from benchmarks.peers.raw_engine import decode_cost
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

    from benchmarks.harness.measure import time_call
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


