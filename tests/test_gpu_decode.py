"""GPU decoding (service/gpu_decode.py): its resize, crop and normalisation against the service's Preprocessor, run
on the CPU here with Pillow's full-size decode in nvJPEG's place (torchvision cannot be installed beside this torch);
the same on a CUDA GPU with real nvJPEG where there is one; and bad bytes refused exactly as on the CPU path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.artifact import load_artifact
from service.engines import load_engine
from service.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from service.gpu_decode import GpuDecoder
from service.preprocess import Preprocessor, decode_image

MAX_PIXELS = 40_000_000


def pillow_full_decode(encoded, device):
    """nvJPEG's part on the CPU: the whole JPEG decoded at full size, (3, H, W) uint8, as decode_jpeg returns it."""
    import torch

    img = decode_image(encoded.numpy().tobytes(), max_pixels=MAX_PIXELS)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).to(device)


@pytest.fixture(scope="module")
def model(tiny_artifact):
    art = load_artifact(tiny_artifact)
    return Preprocessor(art.manifest.preprocessing), load_engine(art, "onnxruntime-cpu", check=False)


def test_the_gpu_path_gives_the_cpu_paths_pixels_and_answers(model, photo_bytes):
    pre, engine = model
    gpu = GpuDecoder(pre, device="cpu", decode_jpeg=pillow_full_decode)
    jpegs = [d for _, d in photo_bytes if d[:3] == b"\xff\xd8\xff"]
    ours = np.stack([gpu(d, max_pixels=MAX_PIXELS) for d in jpegs])
    served = np.stack([pre.from_bytes(d, max_pixels=MAX_PIXELS) for d in jpegs])
    assert ours.shape == served.shape and ours.dtype == np.float32
    # Normalised units (×1/std of 8-bit steps): the CPU path decodes at a reduced DCT scale, this one at full size
    # with an antialiased resize; close, not identical, and the engine must agree on them.
    diff = np.abs(ours - served)
    assert diff.mean() < 0.05 and diff.max() < 1.0, (diff.mean(), diff.max())
    agree = (engine.run(ours).argmax(1) == engine.run(served).argmax(1)).mean()
    assert agree >= 0.9, agree


def test_non_jpegs_and_bad_bytes_take_the_cpu_path_and_its_errors(model):
    pre, _ = model
    gpu = GpuDecoder(pre, device="cpu", decode_jpeg=pillow_full_decode)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    x = gpu(buf.getvalue(), max_pixels=MAX_PIXELS)
    np.testing.assert_allclose(x, pre.from_bytes(buf.getvalue(), max_pixels=MAX_PIXELS), atol=1e-5)  # flat colour: exact
    jpeg = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 200, 30)).save(jpeg, format="JPEG")
    cases = [(b"not an image", UnsupportedImage), (jpeg.getvalue()[:300], InvalidImage)]
    big = io.BytesIO()
    Image.new("1", (3000, 2000)).save(big, format="PNG")
    cases.append((big.getvalue(), ImageTooLarge))
    for data, error in cases:
        with pytest.raises(error):
            gpu(data, max_pixels=5_000_000, index=3)


@pytest.mark.gpu
def test_nvjpeg_on_the_gpu_agrees_with_the_cpu_path(model, photo_bytes):
    pre, engine = model
    gpu = GpuDecoder(pre, device="cuda")  # real nvJPEG
    jpegs = [d for _, d in photo_bytes if d[:3] == b"\xff\xd8\xff"]
    ours = np.stack([gpu(d, max_pixels=MAX_PIXELS) for d in jpegs])
    served = np.stack([pre.from_bytes(d, max_pixels=MAX_PIXELS) for d in jpegs])
    assert np.abs(ours - served).mean() < 0.05
    assert (engine.run(ours).argmax(1) == engine.run(served).argmax(1)).mean() >= 0.9
