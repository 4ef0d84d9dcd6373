"""A randomly initialised ViT checkpoint folder, the offline `--base` for demos and tests.

Nothing can be downloaded on the project's machines, so the embedded demo trains a small ViT from scratch:

    python -m demo.tiny_base --out runs/tiny-base --image-size 28 --patch-size 4 --hidden 128 --layers 4 --heads 4

writes config.json, model.safetensors and preprocessor_config.json (mean/std 0.5, as the in21k ViTs), which
`vitserve finetune --base runs/tiny-base` loads like any Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import transformers
from transformers import ViTForImageClassification

from finetune.model import tiny_config, write_random_vit
from service.cli import HelpFormatter


def write_tiny_base(
    out: str | Path,
    image_size: int = 32,
    patch_size: int = 4,
    hidden: int = 192,
    layers: int = 6,
    heads: int = 3,
    mlp_ratio: float = 4.0,
    num_labels: int = 10,
    seed: int = 0,
) -> Path:
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of the number of heads {heads}")
    transformers.utils.logging.disable_progress_bar()
    config = tiny_config(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=int(hidden * mlp_ratio),
        num_labels=num_labels,
    )
    return write_random_vit(out, config, seed=seed)  # HF init: truncated normal, std 0.02


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.tiny_base",
        description="Write a randomly initialised ViTForImageClassification checkpoint folder.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--image-size", type=int, default=32, help="input resolution")
    parser.add_argument("--patch-size", type=int, default=4, help="patch size (image size must be a multiple)")
    parser.add_argument("--hidden", type=int, default=192, help="hidden size")
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=3, help="attention heads")
    parser.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP width / hidden size")
    parser.add_argument("--num-labels", type=int, default=10, help="head size (fine-tuning resizes it anyway)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    a = parser.parse_args(argv)
    try:
        out = write_tiny_base(
            a.out, a.image_size, a.patch_size, a.hidden, a.layers, a.heads, a.mlp_ratio, a.num_labels, a.seed
        )
    except ValueError as e:
        parser.error(str(e))
    n = sum(p.numel() for p in ViTForImageClassification.from_pretrained(out, use_safetensors=True).parameters())
    print(f"wrote a random ViT ({n / 1e6:.2f}M parameters, {a.image_size}px, patch {a.patch_size}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
