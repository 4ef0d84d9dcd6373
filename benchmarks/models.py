"""Benchmark models: ViT checkpoints built from a named config (random weights, nothing downloaded), their FLOPs,
and an artifact exported from them with the real export pipeline.

Sizes (patch 16 @ 224 unless noted; FLOPs per image from :func:`vit_flops`):

    tiny       2 layers, hidden 64, 32 px, patch 8  (the test model: HTTP overhead dominates it)
    vit-small  12 layers, hidden 384, 6 heads, mlp 1536   (DeiT-S / ViT-S/16, 22M params,  ~9.2 GFLOP)
    vit-base   12 layers, hidden 768, 12 heads, mlp 3072  (ViT-B/16,            86M params, ~35.1 GFLOP)
    vit-large  24 layers, hidden 1024, 16 heads, mlp 4096 (ViT-L/16,           304M params, ~123.1 GFLOP)

FLOPs count a multiply-add as 2 and cover the matmuls only (softmax, LayerNorm, GELU are O(T·d) and ignored).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from finetune.shapes import VitShape, shape_from_hf, vit_flops  # noqa: F401 - one shape and FLOP model, shared with `vitserve plan`

CONFIGS: dict[str, VitShape] = {
    "tiny": VitShape(image_size=32, patch_size=8, hidden=64, layers=2, heads=4, mlp=128, labels=10),
    "vit-small": VitShape(image_size=224, patch_size=16, hidden=384, layers=12, heads=6, mlp=1536),
    "vit-base": VitShape(image_size=224, patch_size=16, hidden=768, layers=12, heads=12, mlp=3072),
    "vit-large": VitShape(image_size=224, patch_size=16, hidden=1024, layers=24, heads=16, mlp=4096),
}


def make_checkpoint(name: str, path: Path, *, seed: int = 0, labels: int | None = None) -> Path:
    """A random ViTForImageClassification of the named size (with `labels` classes instead of the size's own count),
    saved as `vitserve finetune` would save one. Its head is spread like a trained one's (a fresh head gives
    near-identical logits)."""
    from finetune.model import shape_config, write_random_vit

    s = CONFIGS[name] if name in CONFIGS else _unknown(name)
    if labels is not None:
        s = replace(s, labels=labels)
    class_names = [f"class_{i}" for i in range(s.labels)]
    return write_random_vit(path, shape_config(s), seed=seed, labels=class_names, head_std=0.2)


def checkpoint_shape(path: Path) -> VitShape:
    return shape_from_hf(json.loads((Path(path) / "config.json").read_text()))


def build_artifact(checkpoint: Path, out: Path, *, max_images: int = 400, max_batch: int = 32) -> Path:
    """The real export pipeline (FP16 ONNX, the fastest gated CPU ONNX, pytorch/ weights) into ``out``. 400 images:
    the fewest whose 95 % lower bound can reach the FP16/FP32 gates' 0.99 agreement (service.parity.images_needed)."""
    from export.pipeline import ExportOptions, export_artifact

    result = export_artifact(ExportOptions(
        checkpoint=str(checkpoint), output=Path(out), max_images=max_images, max_batch=max_batch, force=True,
    ))
    if not result.passed:
        failed = {k: r.failures for k, r in result.reports.items() if not r.passed}
        raise RuntimeError(f"export of {checkpoint} failed its parity gate: {failed}")
    return Path(out)


def _unknown(name: str):
    raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(CONFIGS)}")
