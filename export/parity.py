"""The parity gate: every engine against the FP32 PyTorch model, on the same preprocessed images.

Images go through ``service.preprocess`` (bytes → decode → resize/crop/normalise), the code the service
runs, so what passes here is what clients get. Metrics: top-1 agreement, top-5 set overlap, max |Δlogit|
and max |Δprobability| (probabilities at the manifest's temperature, i.e. as served).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from service.artifact import ParityReport, ParityThresholds
from service.engines.base import Engine
from service.preprocess import Preprocessor, decode_image
from service.topk import softmax, topk_indices

# Defaults per precision. FP16 ones are the (a trained model); INT8 is looser because dynamic
# quantisation rounds activations per tensor at run time, which moves logits by tenths, not hundredths.
DEFAULT_THRESHOLDS: dict[str, ParityThresholds] = {
    "fp32": ParityThresholds(min_top1_agreement=0.999, min_top5_overlap=0.99, max_abs_logit_diff=1e-3, max_abs_prob_diff=1e-4, max_batch_logit_diff=1e-3),
    "bf16": ParityThresholds(min_top1_agreement=0.99, min_top5_overlap=0.97, max_abs_logit_diff=0.25, max_abs_prob_diff=0.03, max_batch_logit_diff=0.1),
    "fp16": ParityThresholds(min_top1_agreement=0.995, min_top5_overlap=0.98, max_abs_logit_diff=0.05, max_abs_prob_diff=0.01, max_batch_logit_diff=0.02),
    "int8": ParityThresholds(min_top1_agreement=0.97, min_top5_overlap=0.90, max_abs_logit_diff=1.0, max_abs_prob_diff=0.10, max_batch_logit_diff=1e-3),
}
# Batch invariance is part of the gate: the batcher mixes clients' images, so an engine whose answer for
# one image depends on its batch-mates would make one client's result depend on another's traffic.

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
# Photographs shipped inside the scikit-image wheel (no download); grey ones exercise the L→RGB path.
_SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "clock",
    "hubble_deep_field", "immunohistochemistry", "retina", "microaneurysms", "grass", "gravel", "brick", "horse",
)


def default_image_bytes(limit: int) -> list[tuple[str, bytes]]:
    """Real photographs from scikit-image, encoded as JPEG/PNG, plus crops and flips for more views."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise RuntimeError(
            "the default parity images come from scikit-image: `pip install scikit-image`, or pass --calibration-dir"
        ) from None
    from PIL import Image, ImageOps

    photos = []
    for name in _SKIMAGE_PHOTOS:
        try:
            arr = getattr(skdata, name)()
        except Exception:  # noqa: BLE001 - some need a download in some versions: skip those
            continue
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) / max(arr.max(), 1) * 255).astype(np.uint8)
        photos.append((name, Image.fromarray(arr)))
    out: list[tuple[str, bytes]] = []
    for view in range(6):
        for name, img in photos:
            w, h = img.size
            if view == 0:
                v = img
            elif view == 1:
                v = ImageOps.mirror(img)
            else:  # four overlapping corner crops at 60 % size
                cx, cy = (view - 2) % 2, (view - 2) // 2
                cw, ch = int(w * 0.6), int(h * 0.6)
                v = img.crop((cx * (w - cw), cy * (h - ch), cx * (w - cw) + cw, cy * (h - ch) + ch))
            buf = io.BytesIO()
            fmt = "JPEG" if (view + len(name)) % 2 == 0 else "PNG"
            v.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            out.append((f"{name}-view{view}.{fmt.lower()}", buf.getvalue()))
            if len(out) >= limit:
                return out
    return out


def directory_image_bytes(root: Path, limit: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise RuntimeError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    # Evenly spaced picks, so class subfolders are all represented when limit < count.
    if len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return [(str(p.relative_to(root)), p.read_bytes()) for p in files]


def preprocess_images(images: list[tuple[str, bytes]], pre: Preprocessor, max_pixels: int = 50_000_000) -> np.ndarray:
    """The serving path: decode + preprocess. Returns (N, 3, H, W) float32."""
    return np.stack([pre(decode_image(b, max_pixels=max_pixels, target_size=pre.input_size, index=i)) for i, (_, b) in enumerate(images)])


def run_batched(fn, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def reference_logits(model: torch.nn.Module, pixels: np.ndarray, batch: int = 16) -> np.ndarray:
    with torch.inference_mode():
        return run_batched(lambda x: model(torch.from_numpy(x)).float().numpy(), pixels, batch)


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    temperature: float,
    thresholds: ParityThresholds,
    alone: np.ndarray | None = None,
) -> ParityReport:
    """``candidate``: the engine's logits in full batches; ``alone``: the same images one at a time."""
    ref_p, cand_p = softmax(reference, temperature), softmax(candidate, temperature)
    k = min(5, reference.shape[1])
    top1 = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    ref5, cand5 = topk_indices(ref_p, k), topk_indices(cand_p, k)
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref5, cand5)]))
    dlogit = float(np.max(np.abs(reference - candidate)))
    dprob = float(np.max(np.abs(ref_p - cand_p)))
    alone = candidate if alone is None else alone
    batch_diff = float(np.max(np.abs(alone - candidate)))
    batch_top5_same = bool(np.array_equal(topk_indices(softmax(alone, temperature), k), cand5))
    t = thresholds
    failures = []
    if not batch_top5_same:
        failures.append("top-5 differs between an image alone and inside a batch")
    if not np.isfinite(batch_diff) or batch_diff > t.max_batch_logit_diff:
        failures.append(f"batch variation |Δlogit| {batch_diff:.4g} > {t.max_batch_logit_diff}")
    if top1 < t.min_top1_agreement:
        failures.append(f"top-1 agreement {top1:.4f} < {t.min_top1_agreement}")
    if overlap < t.min_top5_overlap:
        failures.append(f"top-5 overlap {overlap:.4f} < {t.min_top5_overlap}")
    if not np.isfinite(dlogit) or dlogit > t.max_abs_logit_diff:
        failures.append(f"max |Δlogit| {dlogit:.4g} > {t.max_abs_logit_diff}")
    if not np.isfinite(dprob) or dprob > t.max_abs_prob_diff:
        failures.append(f"max |Δprob| {dprob:.4g} > {t.max_abs_prob_diff}")
    return ParityReport(
        images=len(reference),
        top1_agreement=top1,
        top5_overlap=overlap,
        max_abs_logit_diff=dlogit,
        max_abs_prob_diff=dprob,
        batch_logit_diff=batch_diff,
        batch_top5_identical=batch_top5_same,
        thresholds=thresholds,
        passed=not failures,
        failures=failures,
    )


def check_engine(engine: Engine, pixels: np.ndarray, reference: np.ndarray, *, temperature: float, thresholds: ParityThresholds) -> ParityReport:
    batch = max(1, min(engine.max_batch_size, 16))
    batched = run_batched(engine.run, pixels, batch)
    alone = run_batched(engine.run, pixels, 1)
    return compare(reference, batched, temperature=temperature, thresholds=thresholds, alone=alone)


def format_table(reports: dict[str, ParityReport]) -> str:
    head = f"{'engine':<42} {'images':>6} {'top1 agree':>10} {'top5 overlap':>12} {'max|Δlogit|':>12} {'max|Δprob|':>11} {'batch|Δ|':>9}  result"
    lines = [head, "-" * len(head)]
    for name, r in reports.items():
        verdict = "PASS" if r.passed else "FAIL: " + "; ".join(r.failures)
        lines.append(
            f"{name:<42} {r.images:>6} {r.top1_agreement:>10.4f} {r.top5_overlap:>12.4f} "
            f"{r.max_abs_logit_diff:>12.3g} {r.max_abs_prob_diff:>11.3g} {r.batch_logit_diff:>9.2g}  {verdict}"
        )
    return "\n".join(lines)
