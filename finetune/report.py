"""RUN_DIR/report/: training curves, confusion matrix, reliability diagram, per-class scores and attention diagnostics
(PNG, CSV, JSON)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from finetune.calibration import ECE_BINS, ece  # noqa: E402


def training_curves(log: list[dict], history: list[dict], path: Path) -> None:
    """Train loss and learning rate per logged step, validation top-1 per evaluation."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in log]
    axes[0].plot(steps, [r["loss"] for r in log])
    axes[0].set(title="train loss", xlabel="step")
    axes[1].plot(steps, [r["lr"] for r in log])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot([h["epoch"] for h in history], [h["val"]["top1"] for h in history], marker="o")
    axes[2].set(title="validation top-1", xlabel="epoch", ylim=(0, 1))
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(counts: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    """Rows normalised to recall; the counts are written in the cells when there are at most 20 classes."""
    c = len(classes)
    rates = counts.float() / counts.sum(1, keepdim=True).clamp(min=1)
    size = min(4 + 0.5 * c, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(c), yticks=range(c), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8, color=color)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reliability_diagram(logits: torch.Tensor, labels: torch.Tensor, temperature: float, path: Path) -> None:
    """Accuracy against confidence in ECE_BINS bins, before and after temperature scaling."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    edges = torch.linspace(0, 1, ECE_BINS + 1)
    for ax, t, name in ((axes[0], 1.0, "raw"), (axes[1], temperature, f"temperature {temperature:.3f}")):
        conf, pred = (logits / t).softmax(-1).max(-1)
        correct = (pred == labels).float()
        bins = torch.bucketize(conf, edges[1:-1])  # bin index in [0, ECE_BINS)
        acc = [float(correct[bins == b].mean()) if (bins == b).any() else 0.0 for b in range(ECE_BINS)]
        ax.bar(edges[:-1].numpy(), acc, width=1 / ECE_BINS, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set(title=f"{name}: ECE {ece(logits, labels, t):.4f}", xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def per_class_files(rows: list[dict], stem: Path) -> None:
    """stem.csv and stem.json with label, precision, recall, f1, support."""
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows(rows)
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump(rows, f, indent=2)


def attention_entropy(summary: dict, path: Path) -> None:
    """Blocks × heads, each head's mean attention entropy as a fraction of uniform attention's ln N; flagged heads
    (finetune.attention: collapsed or duplicate) are marked."""
    layers = summary["layers"]
    grid = torch.tensor([[h["entropy_fraction_of_uniform"] for h in layer["heads"]] for layer in layers])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * grid.shape[1] + 2), max(3.0, 0.35 * grid.shape[0] + 1.5)))
    image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for f in summary["flagged"]:
        ax.text(f["head"], f["layer"], "C" if "collapsed" in f["why"] else "D", ha="center", va="center", color="red")
    ax.set(xlabel="head", ylabel="block",
           title=f"attention entropy / ln N\n{summary['images']} images; C collapsed, D duplicate")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rollout_overlays(examples: list, captions: list[str], path: Path) -> None:
    """Each served image beside itself overlaid with its attention-rollout map (the class token's row, upsampled)."""
    fig, axes = plt.subplots(len(examples), 2, figsize=(5, 2.5 * len(examples)), squeeze=False)
    for (image, rollout_map), caption, (left, right) in zip(examples, captions, axes):
        h, w = image.shape[:2]
        heat = rollout_map / max(float(rollout_map.max()), 1e-12)
        left.imshow(image)
        right.imshow(image)
        right.imshow(heat, cmap="jet", alpha=0.5, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
        left.set_title(caption, fontsize=8)
        right.set_title("attention rollout", fontsize=8)
        for ax in (left, right):
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
