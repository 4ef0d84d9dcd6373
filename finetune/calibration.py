"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One scalar T > 0 divides the logits; T is fitted on the validation logits by minimising the negative
log-likelihood (LBFGS on log T, so T stays positive). Accuracy is unchanged (argmax is), confidence becomes honest.

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


def calibrate(logits: torch.Tensor, labels: torch.Tensor, source: str = "validation") -> dict:
    """Fit T and measure ECE / NLL before and after: the content of vitserve_calibration.json."""
    t = fit_temperature(logits, labels)
    return {
        "temperature": t,
        "ece_before": ece(logits, labels),
        "ece_after": ece(logits, labels, t),
        "nll_before": nll(logits, labels),
        "nll_after": nll(logits, labels, t),
        "num_samples": int(len(labels)),
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
