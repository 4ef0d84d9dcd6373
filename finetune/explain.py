"""Attention diagnostics: what each head attends to, which heads collapsed, and where the class token looks.

    vitserve explain photo.jpg more/ --checkpoint runs/mine/checkpoint --out explain/
    vitserve explain data/val --artifact artifacts/mine          # = --checkpoint artifacts/mine/pytorch

writes OUT/attention.json, OUT/attention_entropy.png (blocks × heads) and OUT/attention_rollout.png; `vitserve
finetune` writes the same for validation images into RUN_DIR/report/. Per block and head, averaged over the images:

    entropy            -Σ_j a_ij ln a_ij over the keys j, averaged over the queries i (nats). Uniform attention over
                       N tokens has the maximum, ln N; attention on a single token has 0.
    cls_distance       Σ_j a_0j · d(j, centre) / Σ_j a_0j over patch keys j: how far from the image centre the class
                       token looks (the class token has no position of its own), in patches and pixels
    cls_spread         the same distances measured from the class token's attention centroid: how concentrated
    mean_distance      the ViT paper's mean attention distance: Σ_j a_ij · d(i, j) / Σ_j a_ij over patch queries
                       and keys (Dosovitskiy et al. 2021, fig. 7)

A head is flagged **collapsed** when its entropy is under ENTROPY_COLLAPSE × ln N (nearly all of every query's
attention on one token), and **duplicate** when its attention differs from another head's in the same block by a
mean Jensen-Shannon divergence under DUPLICATE_JSD (the two compute nearly the same mixture; one could be pruned).

Attention rollout (Abnar & Zuidema 2020): each block's head-averaged attention, mixed half and half with the identity
for the residual connection, multiplied through the blocks; the class token's row, over the patch grid, is the map.

The weights come from `output_attentions=True` on the eager attention path. PyTorch's fused SDPA kernel never forms
the attention matrix, so transformers returns no weights for it (an empty tuple in transformers 5): models are
switched to eager attention here. Images go through the service's own preprocessing (the checkpoint's or the
artifact's manifest), so diagnostics see the pixels that are served.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from finetune.attention import DIAGNOSTIC_IMAGES, ROLLOUT_IMAGES, describe_flagged, diagnose, write_report


def build_parser() -> argparse.ArgumentParser:
    from service.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve explain", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", help="image files, or folders searched recursively for images")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an HF or timm ViT checkpoint folder, or an artifact's pytorch/ folder")
    source.add_argument("--artifact", help="an artifact folder: its pytorch/ weights and its manifest's preprocessing")
    p.add_argument("--out", type=Path, default=Path("explain"), help="folder for attention.json and the PNGs")
    p.add_argument("--max-images", type=int, default=DIAGNOSTIC_IMAGES, help="images averaged over")
    p.add_argument("--rollout-images", type=int, default=ROLLOUT_IMAGES, help="images shown with rollout maps")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    return p


def load_model(checkpoint: str | None, artifact: str | None):
    """(eager-attention HF model, preprocessing, labels): from an HF/timm checkpoint through export's loader registry,
    or from an artifact's checksum-verified pytorch/ weights. Beside a manifest (an artifact's pytorch/ folder) the
    manifest's preprocessing is used: the one the service applies."""
    from export.checkpoint import load_checkpoint
    from service.artifact import MANIFEST_NAME, load_artifact, read_manifest

    if artifact:
        manifest = read_manifest(Path(artifact))
        weights = [e for e in manifest.engines if e.format == "safetensors"]
        if not weights:
            raise ValueError(f"{artifact} has no PyTorch weights (exported with --no-pytorch); attention needs them")
        load_artifact(artifact, verify=weights)  # their sha256 against the manifest's
        checkpoint = str(Path(artifact) / Path(weights[0].file).parent)
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.model  # the HF model inside export's logits-only wrapper
    beside = Path(checkpoint).parent
    if (beside / MANIFEST_NAME).is_file():
        manifest = read_manifest(beside)
        return model, manifest.preprocessing, manifest.labels
    return model, loaded.preprocessing, loaded.labels


def image_files(paths: list[str]) -> list[Path]:
    from finetune.data import IMAGE_EXTENSIONS

    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return found


def served_batches(files: list[Path], spec, batch_size: int, skipped: list[str]) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches decoded, resized and cropped by the service's own code (unreadable files skipped)."""
    from finetune.data import MAX_TRAINING_PIXELS
    from service.errors import ServiceError
    from service.preprocess import Preprocessor

    pre, batch = Preprocessor(spec), []
    for i, f in enumerate(files):
        try:
            hwc = pre.decode_uint8(f.read_bytes(), max_pixels=MAX_TRAINING_PIXELS, index=i)
        except (ServiceError, OSError) as e:
            skipped.append(f"{f}: {getattr(e, 'message', e)}")
            continue
        batch.append(torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1))))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from service.artifact import ArtifactError
    from service.preprocess import Preprocessor

    try:
        files = image_files(args.images)[: args.max_images]
        model, spec, labels = load_model(args.checkpoint, args.artifact)
    except (ValueError, OSError, ArtifactError) as e:
        print(f"vitserve explain: error: {e}", file=sys.stderr)
        return 2
    if not files:
        print("vitserve explain: error: no images found", file=sys.stderr)
        return 2
    model.to(args.device)
    pre, skipped = Preprocessor(spec), []
    scale, offset = torch.from_numpy(pre.scale.reshape(3)), torch.from_numpy(pre.offset.reshape(3))
    batches = served_batches(files, spec, args.batch_size, skipped)
    every = max(1, len(files) // max(args.rollout_images, 1))
    result = diagnose(model, batches, scale, offset, args.max_images, args.rollout_images, every)
    for line in skipped:
        print(f"warning: skipped {line}", file=sys.stderr)
    kept = [f for f in files if not any(line.startswith(f"{f}:") for line in skipped)]
    write_report(result, args.out, labels, [f"{f.parent.name}/{f.name}" for f in kept])
    print(format_summary(result.summary))
    print(f"wrote {args.out / 'attention.json'}, attention_entropy.png, attention_rollout.png")
    return 0


def format_summary(summary: dict) -> str:
    """Per block: each head's entropy (nats) and class-token distance (px); then the flagged heads."""
    u = summary["uniform"]
    uniform_px = u["cls_distance_patches"] * summary["patch_size"]
    lines = [f"{summary['images']} images, {summary['tokens']} tokens: uniform attention has entropy "
             f"{u['entropy']:.2f} nats and class-token distance {uniform_px:.1f} px",
             f"{'block':<6}{'entropy per head (nats)':<40}{'class-token distance per head (px)'}"]  # fmt: skip
    for layer in summary["layers"]:
        ent = " ".join(f"{h['entropy']:.2f}" for h in layer["heads"])
        dist = " ".join(f"{h['cls_distance_px']:.1f}" for h in layer["heads"])
        lines.append(f"{layer['layer']:<6}{ent:<40}{dist}")
    t = summary["thresholds"]
    lines.append(f"flagged (collapsed: entropy < {t['entropy_collapse_nats']:.3f} nats; duplicate: mean JS divergence "
                 f"< {t['duplicate_jsd_nats']} nats):")  # fmt: skip
    lines.append(describe_flagged(summary))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
