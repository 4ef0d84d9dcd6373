"""logits → calibrated probabilities → top-k predictions with labels: typed, for every front-end to render."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int  # logit index of the label
    score: float  # calibrated softmax probability


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64, max-subtracted so it never overflows."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, L) → (B, k) indices by descending score; ties go to the lower index, so results are deterministic."""
    k = min(k, scores.shape[-1])
    # A stable sort on -score keeps index order among equals; L is small (classes), so a full sort is cheap.
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def rank(probabilities: np.ndarray, labels: list[str], k: int) -> list[list[Prediction]]:
    """(B, L) probabilities → per image, the ``k`` best predictions, best first."""
    return [
        [Prediction(labels[i], int(i), float(row[i])) for i in ids]
        for row, ids in zip(probabilities, topk_indices(probabilities, k))
    ]


def predictions(logits: np.ndarray, labels: list[str], *, temperature: float, k: int) -> list[list[Prediction]]:
    """Logits → the ``k`` best calibrated predictions per image."""
    return rank(softmax(logits, temperature), labels, k)
