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
import json
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ENTROPY_COLLAPSE = 0.05  # of ln N: ≥ ~95 % of each query's attention on one token (ViT-B's 197 tokens: < 0.26 nats)
DUPLICATE_JSD = 0.01  # nats, of at most ln 2 = 0.69: two heads' attention rows nearly the same distributions
RESIDUAL_WEIGHT = 0.5  # rollout's share of the identity (Abnar & Zuidema's 0.5 · A + 0.5 · I)
DIAGNOSTIC_IMAGES = 256  # enough for stable per-head means; finetune's report uses this many validation images
ROLLOUT_IMAGES = 8


# --- the numbers ---------------------------------------------------------------------------------------------------


def entropy(attention: torch.Tensor) -> torch.Tensor:
    """(..., N) rows of probabilities → (...) entropy in nats, with 0 · ln 0 = 0."""
    p = attention.double()
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # float64: ln of tiny probabilities stays finite


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between rows of probabilities, over the last axis."""
    return entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2


def rollout(attentions: list[torch.Tensor], residual: float = RESIDUAL_WEIGHT) -> torch.Tensor:
    """Abnar & Zuidema's attention rollout: blocks' (B, H, T, T) attention → (B, T, T) token-to-input attribution."""
    result = None
    for a in attentions:
        mixed = (1 - residual) * a.double().mean(1) + residual * torch.eye(a.shape[-1], dtype=torch.float64)
        mixed = mixed / mixed.sum(-1, keepdim=True)  # (B, T, T), rows sum to 1
        result = mixed if result is None else mixed @ result
    return result


def patch_positions(tokens: int) -> torch.Tensor:
    """(P, 2) row, column of each patch token on the square grid (token 0 is the class token)."""
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise ValueError(f"{tokens - 1} patch tokens do not form a square grid")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], 1).double()


def weighted_distance(weights: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Σ w·d / Σ w over the last axis."""
    return (weights * distances).sum(-1) / weights.sum(-1).clamp_min(1e-300)


@dataclass
class AttentionStats:
    """Per block and head sums over images (divided by `images` in `summary`)."""

    layers: int
    heads: int
    tokens: int
    images: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0) + value.double().cpu()

    def update(self, attentions: list[torch.Tensor]) -> None:
        """One batch: `attentions` is a list (one per block) of (B, H, T, T) tensors."""
        per_layer = [self.layer_statistics(a.double().cpu()) for a in attentions]  # a block at a time: ViT-L's 24
        for name in per_layer[0]:  # stacked would be gigabytes
            self.add(name, torch.stack([s[name] for s in per_layer]))
        self.images += attentions[0].shape[0]

    def layer_statistics(self, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, H, T, T) attention of one block → per-head sums over the batch."""
        pos = patch_positions(self.tokens)  # (P, 2)
        cls = a[:, :, 0, 1:]  # (B, H, P): the class token's attention over the patches
        centroid = (cls.unsqueeze(-1) * pos).sum(-2) / cls.sum(-1, keepdim=True)  # (B, H, 2)
        jsd = torch.zeros(self.heads, self.heads, dtype=torch.float64)
        for h in range(self.heads - 1):  # each pair once: per query row, averaged over rows, summed over images
            d = js_divergence(a[:, h : h + 1], a[:, h + 1 :]).mean(-1).sum(0)  # (H - h - 1,)
            jsd[h, h + 1 :] = jsd[h + 1 :, h] = d
        return {
            "entropy": entropy(a).mean(-1).sum(0),  # (H,)
            "cls_distance": weighted_distance(cls, (pos - pos.mean(0)).norm(dim=1)).sum(0),
            "cls_spread": weighted_distance(cls, (pos - centroid.unsqueeze(-2)).norm(dim=-1)).sum(0),
            "mean_distance": weighted_distance(a[:, :, 1:, 1:], torch.cdist(pos, pos)).mean(-1).sum(0),
            "jsd": jsd,
        }

    def summary(self, patch_size: int) -> dict:
        """Means per block and head, in nats, patches and pixels, with the flagged heads and the thresholds."""
        mean = {k: v / max(self.images, 1) for k, v in self.sums.items()}
        uniform = math.log(self.tokens)
        pos = patch_positions(self.tokens)
        blocks, flagged = [], []
        for layer in range(self.layers):
            heads = []
            for h in range(self.heads):
                duplicates = [g for g in range(self.heads) if g != h and mean["jsd"][layer, h, g] < DUPLICATE_JSD]
                ent = float(mean["entropy"][layer, h])
                row = {"head": h, "entropy": ent, "entropy_fraction_of_uniform": ent / uniform,
                       "collapsed": ent < ENTROPY_COLLAPSE * uniform, "duplicate_of": duplicates}  # fmt: skip
                for name in ("cls_distance", "cls_spread", "mean_distance"):
                    row[f"{name}_patches"] = float(mean[name][layer, h])
                    row[f"{name}_px"] = float(mean[name][layer, h]) * patch_size
                heads.append(row)
                if row["collapsed"] or duplicates:
                    why = ["collapsed"] * row["collapsed"] + [f"duplicate of head {g}" for g in duplicates]
                    flagged.append({"layer": layer, "head": h, "why": why, "entropy": ent})
            pairs = mean["jsd"][layer][~torch.eye(self.heads, dtype=torch.bool)]  # every ordered pair of heads
            blocks.append({"layer": layer, "heads": heads, "min_pair_jsd": float(pairs.min()) if len(pairs) else None})
        return {
            "images": self.images, "tokens": self.tokens, "patch_size": patch_size,
            "thresholds": {"entropy_collapse_fraction_of_ln_n": ENTROPY_COLLAPSE, "entropy_collapse_nats":
                           ENTROPY_COLLAPSE * uniform, "duplicate_jsd_nats": DUPLICATE_JSD},
            "uniform": {"entropy": uniform,
                        "cls_distance_patches": float((pos - pos.mean(0)).norm(dim=1).mean()),
                        "mean_distance_patches": float(torch.cdist(pos, pos).mean())},
            "layers": blocks, "flagged": flagged,
        }  # fmt: skip


# --- running a model -----------------------------------------------------------------------------------------------


@dataclass
class Diagnostics:
    summary: dict
    # (served image (H, W, 3) uint8, rollout map (g, g), predicted class, index among the images)
    examples: list[tuple[np.ndarray, np.ndarray, int, int]]


@torch.no_grad()
def diagnose(
    model, batches: Iterable[torch.Tensor], scale: torch.Tensor, offset: torch.Tensor,
    max_images: int = DIAGNOSTIC_IMAGES, keep: int = ROLLOUT_IMAGES, every: int = 1,
) -> Diagnostics:  # fmt: skip
    """Attention statistics and rollout maps of `model` over uint8 (B, 3, S, S) batches from the service's
    preprocessing, normalised with the service's (scale, offset); rollout maps for `keep` images, one in `every`
    (folders are sorted by class: spacing them shows several classes). The model is switched to eager attention."""
    from finetune.data import normalize

    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")  # SDPA returns no attention weights
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    stats, examples, cfg = None, [], model.config
    for images in batches:
        images = images[: max_images - (stats.images if stats else 0)]
        out = model(pixel_values=normalize(images.to(device), scale.to(device), offset.to(device)),
                    output_attentions=True)  # fmt: skip
        if not out.attentions:
            raise RuntimeError("the model returned no attention weights (eager attention is needed)")
        stats = stats or AttentionStats(len(out.attentions), cfg.num_attention_heads, out.attentions[0].shape[-1])
        stats.update(list(out.attentions))
        first = stats.images - len(images)  # index of this batch's first image
        picks = [i for i in range(len(images)) if (first + i) % every == 0][: keep - len(examples)]
        if picks:
            grid = math.isqrt(stats.tokens - 1)
            maps = rollout([a[picks].cpu() for a in out.attentions])[:, 0, 1:].reshape(-1, grid, grid)  # CLS row
            predicted = out.logits[picks].argmax(-1).cpu()
            for i, m, c in zip(picks, maps, predicted):
                examples.append((images[i].permute(1, 2, 0).cpu().numpy(), m.numpy(), int(c), first + i))
        if stats.images >= max_images:
            break
    model.train(was_training)
    if stats is None:
        raise ValueError("no images to diagnose")
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    return Diagnostics(stats.summary(patch), examples)


def write_report(diagnostics: Diagnostics, out: Path, labels: list[str], names: list[str] | None = None) -> None:
    """OUT/attention.json, attention_entropy.png and attention_rollout.png."""
    from finetune import report

    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(diagnostics.summary, indent=2) + "\n")
    report.attention_entropy(diagnostics.summary, out / "attention_entropy.png")
    captions = [f"{names[i] if names else f'image {i}'} → {labels[c]}" for _, _, c, i in diagnostics.examples]
    pairs = [(image, rollout_map) for image, rollout_map, _, _ in diagnostics.examples]
    report.rollout_overlays(pairs, captions, out / "attention_rollout.png")


def describe_flagged(summary: dict) -> str:
    """One line per flagged head, or a line saying none was."""
    if not summary["flagged"]:
        return "  no collapsed or duplicate heads"
    return "\n".join(f"  block {f['layer']} head {f['head']}: {', '.join(f['why'])} (entropy {f['entropy']:.3f} nats)"
                     for f in summary["flagged"])  # fmt: skip


# --- vitserve explain ----------------------------------------------------------------------------------------------


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
