"""Validation and test metrics: top-1, top-5, macro-F1, expected calibration error (torchmetrics), loss, and
per-class precision/recall/F1 with the confusion matrix."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from finetune.calibration import ECE_BINS
from finetune.data import normalize


@torch.no_grad()
def predict(
    model, loader, device: torch.device, scale, offset, autocast=contextlib.nullcontext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) float32 and labels (N,) on CPU, in loader order. The model is put in eval mode and restored."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        pixel_values = normalize(images.to(device, non_blocking=True), scale, offset)  # (B, 3, S, S)
        with autocast():
            logits = model(pixel_values=pixel_values).logits  # (B, C)
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1, top5 (top-C when there are fewer than 5 classes), macro_f1, ece and mean cross-entropy loss."""
    c = logits.shape[-1]
    probs = logits.softmax(-1)
    return {
        "top1": float(multiclass_accuracy(logits, labels, num_classes=c, average="micro")),
        "top5": float(multiclass_accuracy(logits, labels, num_classes=c, top_k=min(5, c), average="micro")),
        "macro_f1": float(multiclass_f1_score(logits, labels, num_classes=c, average="macro")),
        "ece": float(multiclass_calibration_error(probs, labels, num_classes=c, n_bins=ECE_BINS, norm="l1")),
        "loss": float(F.cross_entropy(logits, labels)),
        "num_samples": int(len(labels)),
    }


def per_class(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[dict]:
    c = len(classes)
    precision = multiclass_precision(logits, labels, num_classes=c, average=None)
    recall = multiclass_recall(logits, labels, num_classes=c, average=None)
    f1 = multiclass_f1_score(logits, labels, num_classes=c, average=None)
    support = torch.bincount(labels, minlength=c)
    return [
        {
            "label": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    ]


def confusion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    return multiclass_confusion_matrix(logits, labels, num_classes=logits.shape[-1])


# Larger is better for these; smaller for the rest ("loss").
HIGHER_IS_BETTER = {"top1", "top5", "macro_f1"}


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric in HIGHER_IS_BETTER else value < best
