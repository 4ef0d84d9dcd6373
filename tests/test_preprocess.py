"""bytes → RGB → tensor: every image mode, EXIF, draft mode, and each way bytes can be bad."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from service.artifact import Preprocessing
from service.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from service.preprocess import Preprocessor, decode_image, to_rgb

VIT = Preprocessing(resize_mode="exact", resize_size=(32, 32), resample="bilinear")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    img = gradient().convert("RGB" if mode in ("I;16", "I", "F") else mode) if mode not in ("I;16", "I", "F") else None
    if img is None:
        base = np.linspace(0, 65535 if mode == "I;16" else 1000, 64 * 48).reshape(48, 64)
        img = Image.fromarray(base.astype(np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32), mode=None)
        img = img if img.mode == mode else img.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (64, 48)
    arr = np.asarray(out)
    assert arr.max() > arr.min(), f"{mode} lost its contents"


def test_sixteen_bit_is_scaled_not_clipped():
    img = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert img.mode.startswith("I;16")
    assert np.asarray(to_rgb(img)).min() == 255
    half = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert 126 <= np.asarray(to_rgb(half)).mean() <= 129


def test_transparency_composites_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(to_rgb(img)).min() == 255


def test_exif_orientation_is_applied():
    img = gradient(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = encode(img, "JPEG", exif=exif)
    out = decode_image(data, max_pixels=10**7)
    assert out.size == (32, 64)


def test_jpeg_draft_mode_decodes_at_the_manifests_margin():
    data = encode(gradient(512, 384), "JPEG", quality=90)
    # The DCT scales are 1/2, 1/4, 1/8: the smallest that keeps margin × 32 px is 1/4 for margin 2, 1/8 for 1.
    for margin, size in ((2.0, (128, 96)), (1.0, (64, 48)), (0.0, (512, 384))):
        assert decode_image(data, max_pixels=10**8, target_size=(32, 32), draft_margin=margin).size == size, margin
    spec = VIT.model_copy(update={"jpeg_draft_margin": 2.0})
    assert Preprocessor(spec).decode(data, max_pixels=10**8).size == (128, 96)  # the spec's margin is the one used
    x = Preprocessor(VIT).from_bytes(data, max_pixels=10**8)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32


def test_matches_transformers_vit_image_processor():
    from transformers import ViTImageProcessorPil

    img = gradient(97, 61)
    ours = Preprocessor(VIT)(img)
    theirs = ViTImageProcessorPil(size={"height": 32, "width": 32})(img, return_tensors="np")["pixel_values"][0]
    assert np.abs(ours - theirs).max() < 1e-5


def test_shortest_edge_and_center_crop():
    spec = Preprocessing(resize_mode="shortest_edge", resize_size=(36, 36), center_crop=(32, 32), resample="bicubic",
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = Preprocessor(spec)(gradient(100, 50))
    assert x.shape == (3, 32, 32)


# Landscape, portrait, square and odd sizes, chosen so that the long side's float quotient has a fractional part of
# more and of less than one half (round and truncate disagree on the first) and the crop's excess is odd and even.
ASPECTS = [(640, 480), (480, 640), (300, 300), (257, 191), (191, 333), (1001, 750), (97, 31)]


def photo(width: int, height: int) -> Image.Image:
    """A real photograph (scikit-image's astronaut) at ``width`` × ``height``: texture everywhere, so a crop shifted
    by a pixel or a resize a pixel off shows up in every row."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("size", ASPECTS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_shortest_edge_matches_transformers(size):
    """A shortest-edge + centre-crop processor from transformers (its PIL backend, the one that runs without
    torchvision), read into our manifest by ``Preprocessing.from_hf``: the same tensor as transformers' own."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 248}, crop_size={"height": 224, "width": 224})
    spec = Preprocessing.from_hf(processor.to_dict(), 224)
    assert (spec.resize_mode, spec.crop_offset) == ("shortest_edge", "floor")
    img = photo(*size)
    theirs = processor(img, return_tensors="np")["pixel_values"][0]
    ours = Preprocessor(spec)(img)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize("crop_pct,image_size", [(0.875, 224), (0.9, 224), (0.95, 384), (1.0, 384), (0.96, 256)])
def test_shortest_edge_sizes_follow_timm(crop_pct, image_size):
    """timm's eval transform, from its documented formula: Resize(floor(img_size / crop_pct)) then
    CenterCrop(img_size), both torchvision's: the long side int(size * long / short), the crop's origin
    int(round(excess / 2))."""
    from export.checkpoint import timm_preprocessing

    pre = Preprocessor(timm_preprocessing({"crop_pct": crop_pct, "interpolation": "bicubic"}, image_size))
    scale_size = math.floor(image_size / crop_pct)
    for w, h in ASPECTS:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = scale_size, int(scale_size * long / short)
        expected = (new_short, new_long) if w <= h else (new_long, new_short)
        assert pre.resized_size(w, h) == expected
        rw, rh = expected
        left, top = int(round((rw - image_size) / 2.0)), int(round((rh - image_size) / 2.0))
        assert pre.crop_origin(rw, rh) == (left, top)
        # torchvision's Resize and CenterCrop on a PIL image are PIL's resize and crop at those numbers: same pixels.
        img = photo(w, h)
        theirs = img.resize(expected, Image.Resampling.BICUBIC).crop((left, top, left + image_size, top + image_size))
        assert np.array_equal(np.asarray(pre.resize_and_crop(img)), np.asarray(theirs))


def test_crop_origin_rules_differ_only_on_odd_excess():
    """The two libraries' crop rules, side by side: equal for an even excess, a pixel apart for some odd ones."""
    base = dict(resize_mode="shortest_edge", resize_size=(256, 256), center_crop=(224, 224))
    rounding = Preprocessor(Preprocessing(**base, crop_offset="round"))
    flooring = Preprocessor(Preprocessing(**base, crop_offset="floor"))
    assert rounding.crop_origin(340, 256) == flooring.crop_origin(340, 256) == (58, 16)
    assert rounding.crop_origin(331, 256) == (54, 16) and flooring.crop_origin(331, 256) == (53, 16)  # 107 / 2
    assert rounding.crop_origin(329, 256) == flooring.crop_origin(329, 256) == (52, 16)  # 105 / 2: half to even
    assert rounding.crop_origin(200, 256)[0] == flooring.crop_origin(200, 256)[0] == -12  # padded, as torchvision does


def test_not_an_image():
    with pytest.raises(UnsupportedImage) as e:
        decode_image(b"hello, this is text", max_pixels=10**7, index=3)
    assert e.value.index == 3 and "3" in e.value.message


def test_empty_bytes():
    with pytest.raises(UnsupportedImage):
        decode_image(b"", max_pixels=10**7)


def test_truncated_jpeg():
    data = encode(gradient(256, 256), "JPEG")
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2], max_pixels=10**7, index=1)


def test_unsupported_format():
    data = encode(gradient(), "ICO")
    with pytest.raises(UnsupportedImage, match="unsupported format"):
        decode_image(data, max_pixels=10**7)


def test_decompression_bomb_is_refused_from_the_header():
    # A 1-bit 20000×20000 PNG: tiny on the wire, 400 M pixels if decoded.
    data = encode(Image.new("1", (20000, 20000)), "PNG", optimize=True)
    assert len(data) < 200_000
    with pytest.raises(ImageTooLarge, match="400000000 pixels"):
        decode_image(data, max_pixels=50_000_000, index=0)


def test_pillows_warning_between_its_own_limits_does_not_escape_and_ours_decides():
    """90 M pixels: over Pillow's warning threshold (~89 M), under its error (~179 M). Pillow's warning is ignored by a
    filter the module installs once (not by catch_warnings per decode: not thread-safe), so the service's own limit
    decides. In a fresh interpreter with such warnings turned into errors: pytest discards filters added while it
    collects, and a warning raised as an error would surface as "could not be read" instead."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import io\nfrom PIL import Image\nfrom service.preprocess import decode_image\nfrom service.errors import ImageTooLarge\n"
        "buf = io.BytesIO(); Image.new('1', (10000, 9000)).save(buf, 'PNG', optimize=True)\n"
        "try:\n    decode_image(buf.getvalue(), max_pixels=50_000_000)\nexcept ImageTooLarge as e:\n    print('refused:', e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert "refused: image 0 is 10000x9000 = 90000000 pixels" in out.stdout, out.stdout + out.stderr


def test_our_pixel_limit_applies_below_pillows():
    data = encode(Image.new("RGB", (3000, 2000)), "PNG")
    with pytest.raises(ImageTooLarge, match="6000000 pixels, over the limit of 5000000"):
        decode_image(data, max_pixels=5_000_000, index=2)


def test_normalize_is_the_float32_formula_bit_for_bit():
    """Every uint8 value in every channel, one image and a batch: ``pixel * scale + offset`` in float32, as the served
    arithmetic has always been (training and the parity gate fold it the same way), in a C-contiguous (..., 3, H, W)."""
    spec = VIT.model_copy(update={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    pre = Preprocessor(spec)
    rng = np.random.default_rng(0)
    every_value = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 2, 3)).reshape(16, 32, 3)
    for hwc in (every_value, rng.integers(0, 256, (4, 7, 5, 3), dtype=np.uint8)):
        reference = np.moveaxis(hwc, -1, -3).astype(np.float32) * pre.scale + pre.offset
        out = pre.normalize(hwc)
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == reference.shape
        assert np.array_equal(out, reference)
