"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One scalar T > 0 divides the logits; T is fitted on the validation logits by minimising the negative
log-likelihood (LBFGS on log T, so T stays positive). Accuracy is unchanged (argmax is), confidence becomes honest.

Calibration never hurts: T is only applied if it helps on images it was not fitted on. Two-fold check: fit on one
half of the validation set, measure ECE and NLL on the other, and the other way round; unless both improve on
average, T = 1 is kept and the file says why. A small validation set is warned about (MIN_RELIABLE_IMAGES).

The result is written to checkpoint/vitserve_calibration.json. Its file name and the key "temperature" are a
contract: the export stage copies the temperature into the serving manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

CALIBRATION_FILE = "vitserve_calibration.json"
ECE_BINS = 15  # Guo et al. use 15 equal-width confidence bins
# Below this many validation images the ECE estimate is mostly sampling noise: a *perfectly* calibrated classifier
# (confidences ~ Beta(8, 1.2), mean 0.87) shows a 15-bin ECE of 0.068 at 100 images, 0.031 at 500, 0.022 at 1,000 and
# 0.010 at 5,000 (300 simulations each) - at 1,000 still as large as the miscalibration temperature scaling removes
# from a fine-tuned ViT (a few hundredths; 0.029 → 0.014 for the demo model on 3,000).
MIN_RELIABLE_IMAGES = 1000


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The T > 0 minimising mean NLL of softmax(logits / T) on (N, C) logits and (N,) labels."""
    logits, labels = logits.detach().double(), labels.detach().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    probs = (logits.float() / temperature).softmax(-1)
    return float(multiclass_calibration_error(probs, labels, num_classes=logits.shape[-1], n_bins=ECE_BINS, norm="l1"))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def _held_out_gain(logits: torch.Tensor, labels: torch.Tensor, seed: int) -> dict:
    """Two-fold: fit T on one half, measure the other half at T and at 1, both ways. Mean gains (before - after)."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = (order[: n // 2], order[n // 2 :])
    folds = []
    for fit_on, judge_on in (halves, halves[::-1]):
        t = fit_temperature(logits[fit_on], labels[fit_on])
        z, y = logits[judge_on], labels[judge_on]
        folds.append({"temperature": t, "ece_gain": ece(z, y) - ece(z, y, t), "nll_gain": nll(z, y) - nll(z, y, t)})
    return {
        "folds": folds,
        "ece_gain": sum(f["ece_gain"] for f in folds) / 2,
        "nll_gain": sum(f["nll_gain"] for f in folds) / 2,
    }


def calibrate(logits: torch.Tensor, labels: torch.Tensor, source: str = "validation", seed: int = 0) -> dict:
    """Fit T, check on held-out halves that it helps, and measure ECE / NLL before and after the T that is applied:
    the content of vitserve_calibration.json (``temperature`` is what export ships; 1.0 when fitting did not help)."""
    n = int(len(labels))
    fitted = fit_temperature(logits, labels)
    wrong = logits.argmax(-1) != labels
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves_have_errors = n >= 4 and bool(wrong[order[: n // 2]].any()) and bool(wrong[order[n // 2 :]].any())
    held = _held_out_gain(logits, labels, seed) if halves_have_errors else {"folds": [], "ece_gain": 0.0, "nll_gain": 0.0}
    helps = halves_have_errors and held["ece_gain"] > 0 and held["nll_gain"] > 0
    t = fitted if helps else 1.0
    if helps:
        note = (f"T = {fitted:.3f} applied: on held-out halves it lowered ECE by {held['ece_gain']:.4f} and NLL by "
                f"{held['nll_gain']:.4f}")
    elif not halves_have_errors:
        # With every image of a half classified right, NLL keeps falling as T → 0: the "fit" only says "be 100 %
        # sure", which unseen images would contradict.
        note = (f"T = 1 kept: {int(wrong.sum())} of {n} {source} images are misclassified, too few to fit a temperature "
                f"(each held-out half needs one; the fit ran to T = {fitted:.3f})")
    else:
        note = (f"T = 1 kept: the fitted T = {fitted:.3f} did not lower both ECE ({held['ece_gain']:+.4f}) and NLL "
                f"({held['nll_gain']:+.4f}) on held-out halves of the {source} set")
    warning = None
    if n < MIN_RELIABLE_IMAGES:
        warning = (f"only {n} {source} images: ECE is mostly sampling noise below {MIN_RELIABLE_IMAGES} (a perfectly "
                   "calibrated model already shows ~0.02-0.07); the temperature decision is not reliable")
    return {
        "temperature": t,
        "fitted_temperature": fitted,
        "applied": helps,
        "decision": note,
        "warning": warning,
        "held_out": held,
        "ece_before": ece(logits, labels),
        "ece_after": ece(logits, labels, t),
        "nll_before": nll(logits, labels),
        "nll_after": nll(logits, labels, t),
        "num_samples": n,
        "min_reliable_samples": MIN_RELIABLE_IMAGES,
        "source": source,
    }


def write(checkpoint_dir: Path, result: dict) -> Path:
    """Atomically write checkpoint_dir/vitserve_calibration.json."""
    path = Path(checkpoint_dir) / CALIBRATION_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
