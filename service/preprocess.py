"""bytes → decoded RGB image → normalised CHW float32 tensor, exactly as the manifest says.

This is the serving path's preprocessing and also what the export parity gate feeds both the FP32
reference and every engine, so parity is measured on the bytes-to-tensor path clients actually hit.
CPU-bound: the service runs it in a thread pool, never on the event loop (Pillow releases the GIL).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.artifact import Preprocessing
from service.errors import ImageTooLarge, InvalidImage, UnsupportedImage

# Formats we accept. Others (e.g. PDF/EPS need external tools) are refused before any decoding.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "MPO"})

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale in the DCT, far cheaper than a full decode; how much larger than
# the model's input the draft must stay is the manifest's preprocessing.jpeg_draft_margin (benchmarks/decode.py
# measures it against parity and decode time).
DEFAULT_DRAFT_MARGIN = 1.0

# Pillow warns (then raises) on huge images by its own limit; ours (max_pixels) is applied below instead. Ignored once,
# process-wide, rather than inside warnings.catch_warnings() per decode: that swaps the process's filter list, which is
# not thread-safe (decode threads run side by side), and cost 5-10 µs per image.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(
    data: bytes, *, max_pixels: int, target_size: tuple[int, int] | None = None, index: int = 0,
    draft_margin: float = DEFAULT_DRAFT_MARGIN,
) -> Image.Image:
    """Decode untrusted bytes into an RGB image (JPEGs at a DCT scale keeping ``draft_margin`` × ``target_size``).
    Raises a ServiceError naming ``index`` on bad input."""
    if not data:
        raise UnsupportedImage(f"image {index} is empty", index=index)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedImage(f"image {index} is not a recognised image format", index=index) from None
    except Image.DecompressionBombError as e:  # Pillow's own ceiling (~179 M pixels), hit before ours
        raise ImageTooLarge(f"image {index} is too large to decode safely: {e}", index=index) from None
    except Exception as e:  # noqa: BLE001 - any parser failure on untrusted bytes is the client's bad image
        raise InvalidImage(f"image {index} could not be read: {e}", index=index) from None

    if img.format not in ACCEPTED_FORMATS:
        raise UnsupportedImage(
            f"image {index} has unsupported format {img.format}; accepted: {', '.join(sorted(ACCEPTED_FORMATS))}",
            index=index,
        )
    width, height = img.size
    if width * height > max_pixels:
        # Checked from the header, before any pixel is decoded: a decompression bomb costs nothing.
        raise ImageTooLarge(
            f"image {index} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}", index=index
        )
    if img.format == "JPEG" and target_size is not None and draft_margin > 0:
        th, tw = target_size
        img.draft("RGB", (math.ceil(tw * draft_margin), math.ceil(th * draft_margin)))
    try:
        img.load()
        # Phones store rotation in EXIF, not in the pixels. In place: otherwise an upright image (most) is copied whole,
        # 16-30 µs of a decode thread holding the GIL (measured, 640×480 JPEG decoded at 80×60 and 320×240).
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image {index} is too large to decode safely: {e}", index=index) from None
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data surfaces here, at decode time
        raise InvalidImage(f"image {index} is corrupt or truncated: {e}", index=index) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB. Transparency is composited on white; high bit depths are rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's convert("L") clips these to 0..255 instead of scaling; scale by the type's range.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        lo = 0.0 if mode.startswith("I;16") else min(float(arr.min()), 0.0)
        arr = np.clip((arr - lo) / (top - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


class Preprocessor:
    """Resize/crop/normalise per the manifest. Stateless apart from precomputed constants: thread-safe."""

    def __init__(self, spec: Preprocessing):
        self.spec = spec
        self.input_size = spec.input_size  # (H, W)
        self._resample = _RESAMPLE[spec.resample]
        # (x * rescale - mean) / std  ==  x * scale + offset, folded once.
        std = np.asarray(spec.std, dtype=np.float32)
        self._scale = (spec.rescale_factor / std).reshape(3, 1, 1).astype(np.float32)
        self._offset = (-np.asarray(spec.mean, dtype=np.float32) / std).reshape(3, 1, 1).astype(np.float32)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(W, H) of an image of ``width`` × ``height`` after the manifest's resize. Shortest edge: the short side
        becomes ``resize_size[0]`` and the long side is *truncated*, ``int(size * long / short)``, as torchvision's
        ``Resize``, timm's eval transform (which is torchvision's) and transformers' ``get_resize_output_image_size``
        all compute it (integer floor division here: the same value without float rounding)."""
        s = self.spec
        if s.resize_mode == "exact":
            h, w = s.resize_size
            return w, h
        short = s.resize_size[0]
        if width <= height:
            return short, max(1, height * short // width)
        return max(1, width * short // height), short

    def crop_origin(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop in a resized image of ``width`` × ``height`` (negative: the crop exceeds the
        image and is padded with black there, as torchvision pads ``(crop - size) // 2`` before the origin). Where
        the excess is odd the libraries differ, so the manifest names its source's rule: ``round`` is torchvision's
        and timm's ``int(round(excess / 2))`` (Python's round, half to even), ``floor`` is transformers' ``excess // 2``."""
        ch, cw = self.spec.center_crop
        floor = self.spec.crop_offset == "floor"

        def origin(excess: int) -> int:
            if excess < 0:
                return -((-excess) // 2)
            return excess // 2 if floor else int(round(excess / 2.0))

        return origin(width - cw), origin(height - ch)

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        size = self.resized_size(*img.size)
        if size != img.size:
            img = img.resize(size, self._resample)
        if self.spec.center_crop is not None:
            ch, cw = self.spec.center_crop
            left, top = self.crop_origin(*img.size)
            img = img.crop((left, top, left + cw, top + ch))  # pads with black where the crop exceeds
        return img

    @property
    def scale(self) -> np.ndarray:
        """(3, 1, 1) float32: the model input is ``uint8 pixel * scale + offset`` (training folds it the same way)."""
        return self._scale

    @property
    def offset(self) -> np.ndarray:
        return self._offset

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        """RGB image → resized/cropped (H, W, 3) uint8: every pixel decision made, before normalisation."""
        return np.asarray(self.resize_and_crop(img), dtype=np.uint8)

    def normalize(self, hwc: np.ndarray) -> np.ndarray:
        """(..., H, W, 3) uint8 → (..., 3, H, W) float32 model input, C-contiguous: ``pixel * scale + offset`` in float32.

        One channel at a time, converted, scaled and offset straight into its plane of the output. Converting the
        channels-last view whole (``moveaxis(...).astype``) walked memory 3 pixels apart, kept that layout and made two
        more arrays: 5-6× slower at 224² (0.57 → 0.10 ms an image on a 2-core Xeon), the same values bit for bit
        (float32 multiply, then add, as before; tests/test_preprocess.py holds it to that)."""
        out = np.empty((*hwc.shape[:-3], 3, *hwc.shape[-3:-1]), dtype=np.float32)
        for c in range(3):
            plane = out[..., c, :, :]
            np.multiply(hwc[..., c], self._scale[c, 0, 0], out=plane, dtype=np.float32)
            plane += self._offset[c, 0, 0]
        return out

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB image → (3, H, W) float32."""
        return self.normalize(self.to_uint8(img))

    def decode_uint8(self, data: bytes, *, max_pixels: int, index: int = 0) -> np.ndarray:
        """Bytes → (H, W, 3) uint8 exactly as served, before normalisation (training's data loader stops here)."""
        return self.to_uint8(self.decode(data, max_pixels=max_pixels, index=index))

    def decode(self, data: bytes, *, max_pixels: int, index: int = 0) -> Image.Image:
        """Bytes → RGB image, decoded at the size this model needs (the spec's JPEG draft margin)."""
        return decode_image(data, max_pixels=max_pixels, target_size=self.input_size, index=index,
                            draft_margin=self.spec.jpeg_draft_margin)

    def from_bytes(self, data: bytes, *, max_pixels: int, index: int = 0) -> np.ndarray:
        return self.normalize(self.decode_uint8(data, max_pixels=max_pixels, index=index))
