"""logits → calibrated probabilities → top-k predictions with labels."""

from __future__ import annotations

import numpy as np


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


def predictions(logits: np.ndarray, labels: list[str], *, temperature: float, k: int) -> list[dict]:
    """One dict per image: {"top1": {...}, "top5": [...]} where top5 holds the ``k`` best (k defaults to 5)."""
    probs = softmax(logits, temperature)
    idx = topk_indices(probs, k)
    out = []
    for row, ids in zip(probs, idx):
        ranked = [{"label": labels[i], "index": int(i), "score": float(row[i])} for i in ids]
        out.append({"top1": ranked[0], "top5": ranked})
    return out
