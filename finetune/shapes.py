"""A ViT's shape, as `vitserve plan` and fine-tuning count it: named models, shapes read from a checkpoint's config,
parameter counts and FLOPs per image. Nothing here imports torch."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# --- shapes ------------------------------------------------------------------------------------------------------


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

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + [CLS]


MODELS: dict[str, VitShape] = {
    "vit-tiny": VitShape(224, 16, 192, 12, 3, 768),
    "vit-small": VitShape(224, 16, 384, 12, 6, 1536),
    "vit-base": VitShape(224, 16, 768, 12, 12, 3072),
    "vit-large": VitShape(224, 16, 1024, 24, 16, 4096),
    "vit-huge": VitShape(224, 14, 1280, 32, 16, 5120),
}
HUB_IDS = {  # the Google in21k checkpoints `--base` takes for these names
    "vit-base": "google/vit-base-patch16-224-in21k",
    "vit-large": "google/vit-large-patch16-224-in21k",
    "vit-huge": "google/vit-huge-patch14-224-in21k",
}
DEFAULT_BASE = HUB_IDS["vit-large"]  # finetune.config.TrainConfig.base
FAMILY_BY_WIDTH = {192: "ViT-Tiny", 384: "ViT-Small", 768: "ViT-Base", 1024: "ViT-Large", 1280: "ViT-Huge"}


def shape_from_hf(cfg: dict) -> VitShape:
    """An HF ViT config.json (as a dict) → VitShape."""
    size, patch = cfg.get("image_size", 224), cfg.get("patch_size", 16)
    return VitShape(
        image_size=size if isinstance(size, int) else size[0], patch_size=patch if isinstance(patch, int) else patch[0],
        hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
        mlp=cfg["intermediate_size"], channels=cfg.get("num_channels", 3),
        labels=len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2),
    )  # fmt: skip


def resolve_shape(model: str) -> tuple[VitShape, str]:
    """A name in MODELS, one of their hub ids, or a local HF / timm checkpoint folder → (shape, hub id or path)."""
    if model in MODELS:
        return MODELS[model], HUB_IDS.get(model, model)
    for name, hub_id in HUB_IDS.items():
        if model == hub_id:
            return MODELS[name], hub_id
    path = Path(model)
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("model_type") == "vit":
            return shape_from_hf(cfg), model
        from export.checkpoint import is_timm_config, timm_vit_config  # the safetensors header only, no weights

        if is_timm_config(cfg):
            return shape_from_hf(timm_vit_config(path, cfg).to_dict()), model
    known = ", ".join([*MODELS, *HUB_IDS.values()])
    raise ValueError(f"{model!r} is neither a known model ({known}) nor a folder with an HF or timm ViT config.json")


def family(shape: VitShape) -> str:
    return FAMILY_BY_WIDTH.get(shape.hidden, f"a width-{shape.hidden}, {shape.layers}-block ViT")


def parameter_shapes(s: VitShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of transformers' ViTForImageClassification, with its shape (per-layer ones once, '*')."""
    d, m, c, p = s.hidden, s.mlp, s.channels, s.patch_size
    layer = [("q", (d, d)), ("q.bias", (d,)), ("k", (d, d)), ("k.bias", (d,)), ("v", (d, d)), ("v.bias", (d,)),
             ("o", (d, d)), ("o.bias", (d,)), ("ln1", (d,)), ("ln1.bias", (d,)), ("ln2", (d,)), ("ln2.bias", (d,)),
             ("fc1", (m, d)), ("fc1.bias", (m,)), ("fc2", (d, m)), ("fc2.bias", (d,))]  # fmt: skip
    embeddings = [("cls", (1, 1, d)), ("pos", (1, s.tokens, d)), ("patch", (d, c, p, p)), ("patch.bias", (d,))]
    head = [("ln", (d,)), ("ln.bias", (d,)), ("classifier", (s.labels, d)), ("classifier.bias", (s.labels,))]
    return embeddings + [(f"*.{n}", sh) for n, sh in layer] * s.layers + head


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def parameter_count(s: VitShape) -> int:
    return sum(numel(sh) for _, sh in parameter_shapes(s))


# --- FLOPs -------------------------------------------------------------------------------------------------------


def vit_flops(s: VitShape) -> dict[str, float]:
    """Forward FLOPs per image (a multiply-add = 2), matmuls only (softmax, LayerNorm, GELU are O(T·d)): per-layer QKV,
    attention scores and weighted sum, output projection and MLP, times layers, plus patch embedding and head.
    ViT-L/16 at 224 px (197 tokens) ≈ 123.1 GFLOP."""
    patches, t, d, m = s.tokens - 1, s.tokens, s.hidden, s.mlp
    weights = 2 * (t * d * 3 * d + t * d * d + 2 * t * d * m)  # per layer: q, k, v, o, fc1, fc2
    attention = 2 * (t * t * d * 2)  # per layer: Q·Kᵀ and A·V, over all heads
    patch_embed = 2 * patches * (s.channels * s.patch_size**2) * d
    head = 2 * d * s.labels
    encoder = (weights + attention) * s.layers
    return {"encoder": float(encoder), "patch_embed": float(patch_embed), "head": float(head),
            "total": float(encoder + patch_embed + head), "tokens": t,
            "layer_weight_matmuls": float(weights), "layer_attention_matmuls": float(attention)}  # fmt: skip
