"""Peer: the engine with no server — the ceiling a service can approach.

Loads the artifact's engine the way the service does (``service.engines.load_engine``, same session options) and
times ``engine.run`` on real preprocessed photographs at the batch sizes given (warm-up, then a steady window;
median seconds per batch). Decode + preprocess (``Preprocessor.from_bytes``, the service's own path) is timed
separately per image over the same photographs, and combined into an end-to-end figure for the same cores doing
both in turn:

    end-to-end raw images/s at batch B = B / (engine seconds per batch(B) + B × decode+preprocess seconds per image)

which is what a service on the same cores can at best reach (its decode threads and the engine share them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.harness.measure import time_call
from benchmarks.photos import Photo


def decode_cost(photos: list[Photo], preprocessor, *, min_seconds: float = 1.0) -> dict:
    """Median decode+preprocess seconds per photograph, and their mean over the set (the load test's mix)."""
    per_photo = {}
    for p in photos:
        r = time_call(lambda p=p: preprocessor.from_bytes(p.data, max_pixels=50_000_000), min_repeats=3,
                      min_seconds=min_seconds / len(photos))
        per_photo[p.name] = round(r["median_s"] * 1000, 3)
    mean_ms = sum(per_photo.values()) / len(per_photo)
    return {"mean_ms_per_image": round(mean_ms, 3), "per_photo_ms": per_photo}


def measure(artifact: Path, photos: list[Photo], batch_sizes: list[int], *, engine: str = "auto",
            min_seconds: float = 3.0, log=print) -> dict:
    from service.artifact import load_artifact
    from service.engines import load_engine
    from service.preprocess import Preprocessor

    art = load_artifact(artifact)
    eng = load_engine(art, engine)
    pre = Preprocessor(art.manifest.preprocessing)
    decode = decode_cost(photos, pre)
    log(f"  raw decode+preprocess: {decode['mean_ms_per_image']:.2f} ms/image (mean over {len(photos)} photos)")
    pixels = np.stack([pre.from_bytes(p.data, max_pixels=50_000_000) for p in photos])
    rows = []
    for b in batch_sizes:
        x = pixels[np.arange(b) % len(pixels)]  # (B, 3, H, W), real photographs cycled
        t = time_call(lambda x=x: eng.run(x), warmup=1, min_repeats=3, min_seconds=min_seconds)
        per_batch = t["median_s"]
        e2e = b / (per_batch + b * decode["mean_ms_per_image"] / 1000)
        rows.append({
            "batch": b, "seconds_per_batch": round(per_batch, 9), "engine_images_per_s": round(b / per_batch, 3),
            "end_to_end_images_per_s": round(e2e, 3), "repeats": t["repeats"],
            "spread_s": [round(t["min_s"], 5), round(t["max_s"], 5)],
        })
        log(f"  raw engine batch {b:>3}: {b / per_batch:7.2f} img/s engine only, {e2e:7.2f} img/s with decode ({t['repeats']} runs)")
    best = max(rows, key=lambda r: r["end_to_end_images_per_s"])
    return {
        "engine": eng.describe(), "per_image_calls": bool(getattr(eng, "per_image", False)),
        "decode_preprocess": decode, "batches": rows,
        "best": {"batch": best["batch"], "engine_images_per_s": best["engine_images_per_s"],
                 "end_to_end_images_per_s": best["end_to_end_images_per_s"]},
    }
