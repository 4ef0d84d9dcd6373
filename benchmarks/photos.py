"""The request images for load tests: real photographs, re-encoded as a phone or browser would send them.

scikit-image ships these photographs inside its wheel (nothing is downloaded). Each is scaled to cover 640×480
and centre-cropped to exactly that (a typical web upload), then encoded as JPEG (quality 90) and as PNG, so the
server pays a realistic decode: ~50–80 KB JPEGs and ~400–600 KB PNGs, not pre-made tensors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

COLOR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SIZE = (640, 480)  # (W, H)


@dataclass(frozen=True)
class Photo:
    name: str
    data: bytes
    content_type: str


def realistic_photos(size: tuple[int, int] = SIZE, formats: tuple[str, ...] = ("JPEG", "PNG")) -> list[Photo]:
    """One entry per (photograph, format), JPEGs and PNGs interleaved so that cycling through the list alternates them."""
    from PIL import Image
    from skimage import data as skdata

    w, h = size
    out: list[Photo] = []
    for name in COLOR_PHOTOS:
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        scale = max(w / img.width, h / img.height)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.Resampling.LANCZOS)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
        for fmt in formats:
            buf = io.BytesIO()
            img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            ext = "jpg" if fmt == "JPEG" else fmt.lower()
            out.append(Photo(f"{name}.{ext}", buf.getvalue(), f"image/{fmt.lower()}"))
    return out


def describe(photos: list[Photo]) -> dict:
    by_type: dict[str, list[int]] = {}
    for p in photos:
        by_type.setdefault(p.content_type, []).append(len(p.data))
    return {
        "source": "scikit-image photographs " + ", ".join(COLOR_PHOTOS),
        "size_px": list(SIZE),
        "count": len(photos),
        "mean_bytes": {k: round(sum(v) / len(v)) for k, v in by_type.items()},
    }
