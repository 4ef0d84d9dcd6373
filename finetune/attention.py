"""Attention diagnostics: per block and head, entropy, where the class token looks, collapsed and duplicate heads,
and attention rollout, over the pixels the service serves. `vitserve explain` (finetune/explain.py) and `vitserve
finetune`'s report use them; the measures are described there."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
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
