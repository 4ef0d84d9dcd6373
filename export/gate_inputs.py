"""The parity gate's inputs: which images, decoded how, and the FP32 reference they are judged against.

Images go through ``service.preprocess`` (bytes → decode → resize/crop → uint8 → normalise), the code the service
runs, so what passes here is what clients get. The comparison itself (top-1 agreement and top-5 overlap with 95 %
confidence bounds, max |Δlogit|, max |Δprobability| at the served temperature, batch invariance) is
``service.parity``: the service re-runs the same function on the artifact's golden set at startup.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from service.parity import run_batched
from service.errors import ServiceError
from service.preprocess import Preprocessor, decode_image, to_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
# Photographs shipped inside the scikit-image wheel (no download); grey ones exercise the L→RGB path.
_SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "clock",
    "hubble_deep_field", "immunohistochemistry", "retina", "microaneurysms", "grass", "gravel", "brick", "horse",
)
_MAX_SIDE = 640  # photos are shrunk to this first: views of a 1411 px retina scan cost decode time, not information


def _skimage_photos():
    try:
        from skimage import data as skdata
    except ImportError:
        raise RuntimeError(
            "the default parity images come from scikit-image: `pip install scikit-image`, or pass --calibration-dir"
        ) from None
    from PIL import Image

    photos = []
    for name in _SKIMAGE_PHOTOS:
        try:
            arr = getattr(skdata, name)()
        except Exception:  # noqa: BLE001 - some need a download in some versions: skip those
            continue
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) / max(arr.max(), 1) * 255).astype(np.uint8)
        img = Image.fromarray(arr)
        img.thumbnail((_MAX_SIDE, _MAX_SIDE), Image.Resampling.LANCZOS)
        photos.append((name, img))
    return photos


def _view(img, view: int):
    """View 0 is the photo, view 1 its mirror; later views are a deterministic crop (40–100 % of each side, anywhere
    in the frame), maybe mirrored, maybe rescaled to half size, saved as JPEG at quality 50–95 or PNG."""
    from PIL import ImageOps

    if view == 0:
        return img, "JPEG", 90
    if view == 1:
        return ImageOps.mirror(img), "PNG", None
    rng = random.Random(view)
    w, h = img.size
    cw, ch = max(8, int(w * rng.uniform(0.4, 1.0))), max(8, int(h * rng.uniform(0.4, 1.0)))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    v = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        v = ImageOps.mirror(v)
    if rng.random() < 0.3:
        v = v.resize((max(8, cw // 2), max(8, ch // 2)))
    return (v, "PNG", None) if rng.random() < 0.3 else (v, "JPEG", rng.choice((50, 70, 85, 95)))


def default_image_bytes(limit: int) -> list[tuple[str, bytes]]:
    """``limit`` encoded views of scikit-image's photographs: every photo's view 0, then every photo's view 1, ...,
    so any prefix covers all photos. Deterministic: the same bytes on every machine with the same Pillow."""
    return _views(_skimage_photos(), limit)


def _views(photos: list, limit: int, first_view: int = 0) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    view = first_view
    while len(out) < limit and photos:
        for name, img in photos:
            v, fmt, quality = _view(img, view)
            buf = io.BytesIO()
            v.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {"compress_level": 1}))
            out.append((f"{Path(name).stem}-view{view}.{fmt.lower()}", buf.getvalue()))
            if len(out) >= limit:
                break
        view += 1
    return out


def split_calibration(images: list, count: int) -> tuple[list, list]:
    """(gate images, INT8 calibration images): every k-th image calibrates, so both sets span all sources and the
    gate never judges a quantiser on the images it was calibrated on."""
    count = min(count, len(images) // 4)
    if count <= 0:
        return images, []
    step = len(images) / count
    picked = {int(i * step + step / 2) for i in range(count)}
    return [x for i, x in enumerate(images) if i not in picked], [x for i, x in enumerate(images) if i in picked]


def directory_image_bytes(root: Path, limit: int, log=None) -> list[tuple[str, bytes]]:
    """``limit`` images from ``root``: evenly spaced picks when there are more (so every class subfolder is
    represented), and when there are fewer, every file followed by deterministic views of them (the crops, flips and
    rescales ``default_image_bytes`` makes of the bundled photos). The gate compares the engine with the FP32 model,
    not with labels, so views of the user's own images measure it on their domain as well as more photos would."""
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise RuntimeError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    if len(files) >= limit:
        step = len(files) / limit
        return [(str(files[int(i * step)].relative_to(root)), files[int(i * step)].read_bytes()) for i in range(limit)]
    out = [(str(p.relative_to(root)), p.read_bytes()) for p in files]
    if log:
        log(f"{root} has {len(files)} images; adding views (crops, flips, rescales) of them to reach {limit}")
    photos = []
    for name, data in out:
        try:
            photos.append((name, to_rgb(decode_image(data, max_pixels=50_000_000))))
        except ServiceError:
            continue  # unreadable files fail the gate's own decode below, with their name
    return out + _views(photos, limit - len(out), first_view=2)
def decode_images(images: list[tuple[str, bytes]], pre: Preprocessor, max_pixels: int = 50_000_000) -> np.ndarray:
    """The serving path up to normalisation: decode + resize/crop. Returns (N, H, W, 3) uint8 (what the golden set
    stores)."""
    return np.stack(
        [pre.to_uint8(pre.decode(b, max_pixels=max_pixels, index=i)) for i, (_, b) in enumerate(images)]
    )


def preprocess_images(images: list[tuple[str, bytes]], pre: Preprocessor, max_pixels: int = 50_000_000) -> np.ndarray:
    """The whole serving path: decode + preprocess. Returns (N, 3, H, W) float32."""
    return pre.normalize(decode_images(images, pre, max_pixels))


def reference_logits(model: torch.nn.Module, pixels: np.ndarray, batch: int = 16) -> np.ndarray:
    with torch.inference_mode():
        return run_batched(lambda x: model(torch.from_numpy(x)).float().numpy(), pixels, batch)
