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
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VitShape:
    image_size: int
    patch_size: int
    hidden: int
    layers: int
    heads: int
    mlp: int
    channels: int = 3
    labels: int = 1000


CONFIGS: dict[str, VitShape] = {
    "tiny": VitShape(image_size=32, patch_size=8, hidden=64, layers=2, heads=4, mlp=128, labels=10),
    "vit-small": VitShape(image_size=224, patch_size=16, hidden=384, layers=12, heads=6, mlp=1536),
    "vit-base": VitShape(image_size=224, patch_size=16, hidden=768, layers=12, heads=12, mlp=3072),
    "vit-large": VitShape(image_size=224, patch_size=16, hidden=1024, layers=24, heads=16, mlp=4096),
}


def shape_from_hf(cfg: dict) -> VitShape:
    """An HF ViT config.json (as a dict) → VitShape."""
    return VitShape(
        image_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 16), hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"], mlp=cfg["intermediate_size"],
        channels=cfg.get("num_channels", 3), labels=len(cfg.get("id2label") or {}) or 2,
    )


def vit_flops(s: VitShape) -> dict[str, float]:
    """FLOPs per image: per-layer QKV, attention scores + weighted sum, output projection and MLP, times layers,
    plus the patch embedding and the classifier head. ViT-L/16@224 (T = 197 tokens) gives ≈123.1 GFLOP."""
    patches = (s.image_size // s.patch_size) ** 2
    t, d, m = patches + 1, s.hidden, s.mlp  # tokens include [CLS]
    per_layer = 2 * (t * d * 3 * d + t * t * d * 2 + t * d * d + 2 * t * d * m)
    patch_embed = 2 * patches * (s.channels * s.patch_size**2) * d
    head = 2 * d * s.labels
    encoder = per_layer * s.layers
    return {"encoder": float(encoder), "patch_embed": float(patch_embed), "head": float(head),
            "total": float(encoder + patch_embed + head), "tokens": t}


def make_checkpoint(name: str, path: Path, *, seed: int = 0) -> Path:
    """A random ViTForImageClassification of the named size, saved as `vitserve finetune` would save one."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    s = CONFIGS[name] if name in CONFIGS else _unknown(name)
    torch.manual_seed(seed)
    labels = [f"class_{i}" for i in range(s.labels)]
    cfg = ViTConfig(
        image_size=s.image_size, patch_size=s.patch_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, intermediate_size=s.mlp, num_labels=s.labels,
        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
    )
    model = ViTForImageClassification(cfg)
    with torch.no_grad():  # a fresh head gives near-identical logits; spread them like a trained one
        model.classifier.weight.normal_(0, 0.2)
    model.save_pretrained(path)
    ViTImageProcessorPil(size={"height": s.image_size, "width": s.image_size}).save_pretrained(path)
    return path


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
