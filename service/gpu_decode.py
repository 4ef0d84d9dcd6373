"""JPEG bytes → model input on the GPU (``VITSERVE_GPU_DECODE``): nvJPEG through ``torchvision.io.decode_jpeg(...,
device="cuda")``, then the manifest's resize, centre crop and normalisation as tensor ops on the same device.

Why: a ViT-L engine on one GPU answers thousands of images a second, and a 640×480 JPEG costs about a millisecond of
a CPU core to decode, so CPU decoding alone needs most of a host's cores to keep up. Only what is safe and exact to
move goes to the GPU: Pillow still reads every header (format, size limit before any pixel is decoded, EXIF
orientation) and decodes everything else (PNG, WebP, rotated JPEGs, and any JPEG nvJPEG rejects, whose error the CPU
path then names), so bad input is refused exactly as on the CPU path. The pixels differ slightly from the CPU path's
(nvJPEG's IDCT, and a full decode + antialiased resize where Pillow decodes at a reduced DCT scale): the GPU check
measures that difference and the top-1 agreement; it is off by default until it has run on your GPU.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

from service.preprocess import Preprocessor, decode_image


class GpuDecoder:
    """``__call__(bytes) -> (3, H, W) float32`` (host memory, as the batcher takes pixels), thread-safe."""

    def __init__(self, pre: Preprocessor, device: str = "cuda", decode_jpeg: Callable | None = None):
        import torch

        if decode_jpeg is None:
            from torchvision.io import ImageReadMode
            from torchvision.io import decode_jpeg as nvjpeg  # nvJPEG when device is "cuda"

            def decode_jpeg(encoded, device):
                return nvjpeg(encoded, mode=ImageReadMode.RGB, device=device)
        self.pre, self.device, self._decode_jpeg = pre, device, decode_jpeg
        self._torch = torch
        self._scale = torch.from_numpy(pre.scale).to(device)
        self._offset = torch.from_numpy(pre.offset).to(device)
        self.mode = pre.spec.resample if pre.spec.resample in ("bilinear", "bicubic", "nearest") else "bilinear"

    def resize_crop_normalize(self, chw):
        """(3, H, W) uint8 on the device → (3, h, w) float32 model input: the Preprocessor's steps, as tensor ops
        (sizes from the Preprocessor's resized_size and crop_origin; values rounded to uint8 after resizing, as Pillow's are)."""
        import torch.nn.functional as F

        _, h, w = chw.shape
        new_w, new_h = self.pre.resized_size(w, h)
        x = chw.unsqueeze(0).float()
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode=self.mode, antialias=self.mode != "nearest",
                              align_corners=False if self.mode != "nearest" else None)
            x = x.round().clamp(0, 255)
        if self.pre.spec.center_crop is not None:
            ch, cw = self.pre.spec.center_crop
            h, w = x.shape[-2:]
            left, top = self.pre.crop_origin(w, h)
            pad = (max(0, -left), max(0, left + cw - w), max(0, -top), max(0, top + ch - h))  # black where it exceeds
            if any(pad):
                x = F.pad(x, pad)
                left, top = left + pad[0], top + pad[2]
            x = x[..., top : top + ch, left : left + cw]
        return (x[0] * self._scale + self._offset).float()

    def __call__(self, data: bytes, *, max_pixels: int, index: int = 0) -> np.ndarray:
        from PIL import Image

        torch = self._torch
        try:
            header = Image.open(io.BytesIO(data))  # the header only: format, size, EXIF; no pixels decoded
            plain_jpeg = header.format == "JPEG" and header.mode in ("RGB", "L") and \
                header.size[0] * header.size[1] <= max_pixels and header.getexif().get(0x0112, 1) == 1
        except Exception:  # noqa: BLE001 - the CPU path below names what is wrong with these bytes
            plain_jpeg = False
        if plain_jpeg:
            try:
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                chw = self._decode_jpeg(encoded, device=self.device)
                return self.resize_crop_normalize(chw).cpu().numpy()
            except RuntimeError:
                pass  # nvJPEG refused it (corrupt, or a JPEG flavour it lacks): the CPU path decodes or names it
        img = decode_image(data, max_pixels=max_pixels, index=index)  # full size: the same resize as above
        chw = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).to(self.device)
        return self.resize_crop_normalize(chw).cpu().numpy()


def available(device: str) -> str | None:
    """Why GPU decoding cannot run on ``device`` here, or None when it can."""
    if not device.startswith("cuda"):
        return f"the engine runs on {device}, not a CUDA GPU"
    try:
        import torchvision.io  # noqa: F401
    except Exception as e:  # noqa: BLE001 - missing, or built for another torch
        return f"torchvision.io cannot be imported ({type(e).__name__}: {e})"
    return None
