"""The parity check: an engine's logits against the FP32 reference, with agreement judged at 95 % confidence.

One function (:func:`check_engine`) serves both places that ask "does this engine answer like the model?":

- export's gate (``export/pipeline.py``), on about a thousand images: it must *show* agreement, so top-1 agreement
  and top-5 overlap are judged by the lower end of their 95 % interval;
- the service's startup check (``service/engines/__init__.py``), on the artifact's few dozen golden images and on
  the hardware about to serve (INT8 kernels differ by CPU, TensorRT plans by GPU): it refuses only what those
  images *refute*, so agreement is judged by the upper end. Thirty-two images cannot show 99 % agreement, but two
  disagreements among them do show less than 99 %.

Max |Δlogit|, max |Δprob| and batch invariance are maxima over the images and are judged as measured, the same way
in both places. The thresholds an engine passed at export travel in its parity report, so the startup check holds
it to the same numbers.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from service.artifact import ParityReport, ParityThresholds
from service.engines.base import Engine
from service.topk import softmax, topk_indices

DecideOn = Literal["lower_bound", "upper_bound"]

# Agreement thresholds are lower bounds of a 95 % interval at export (see above). With every image agreeing, that
# bound is n / (n + 1.96²): 0.99 needs at least 380 images, 0.97 needs 119 (see images_needed). Max |Δ| thresholds:
# FP32 only reorders sums; FP16 keeps 10 mantissa bits; INT8 rounds every GEMM input to 256 levels, moving logits of
# a trained model by tenths.
DEFAULT_THRESHOLDS: dict[str, ParityThresholds] = {
    "fp32": ParityThresholds(min_top1_agreement=0.99, min_top5_overlap=0.98, max_abs_logit_diff=1e-3, max_abs_prob_diff=1e-4, max_batch_logit_diff=1e-3),
    "bf16": ParityThresholds(min_top1_agreement=0.98, min_top5_overlap=0.95, max_abs_logit_diff=0.25, max_abs_prob_diff=0.03, max_batch_logit_diff=0.1),
    "fp16": ParityThresholds(min_top1_agreement=0.99, min_top5_overlap=0.97, max_abs_logit_diff=0.05, max_abs_prob_diff=0.01, max_batch_logit_diff=0.02),
    "int8": ParityThresholds(min_top1_agreement=0.97, min_top5_overlap=0.90, max_abs_logit_diff=1.0, max_abs_prob_diff=0.10, max_batch_logit_diff=1e-3),
}  # fmt: skip
# Batch invariance is part of the check: the batcher mixes clients' images, so an engine whose answer for one image
# depends on its batch-mates would make one client's result depend on another's traffic.

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
BATCH_CHECK_IMAGES = 64  # batch invariance is a property of the kernels, not of the data: 64 images show it


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927): sound near 0 and 1, where the normal one is not.

    Written out rather than imported: it is a closed form, and scipy is not a dependency of the service. Also used
    for top-5 overlap (a mean of values in [0, 1], whose variance is at most p(1 - p), so the interval is
    conservative there)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def images_needed(threshold: float, z: float = Z95) -> int:
    """Fewest images whose lower bound can reach ``threshold`` at all (every one agreeing): n ≥ z²·t / (1 − t)."""
    return 1 if threshold <= 0 else math.inf if threshold >= 1 else math.ceil(z * z * threshold / (1 - threshold))


def _agreement_failure(name: str, value: float, ci: tuple[float, float], n: int, threshold: float, decide_on: DecideOn) -> str | None:
    lo, hi = ci
    if decide_on == "lower_bound" and lo < threshold:
        msg = f"{name} {value:.4f} over {n} images: 95 % lower bound {lo:.4f} < {threshold}"
        need = images_needed(threshold)
        if n < need:
            msg += f" ({n} images cannot show {threshold} even if all agree; the gate needs ≥ {need}: --max-images)"
        return msg
    if decide_on == "upper_bound" and hi < threshold:
        return f"{name} {value:.4f} over {n} images: 95 % upper bound {hi:.4f} < {threshold} (refuted on this machine)"
    return None


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    temperature: float,
    thresholds: ParityThresholds,
    alone: np.ndarray | None = None,
    batched_subset: np.ndarray | None = None,
    decide_on: DecideOn = "lower_bound",
    hardware: dict[str, str] | None = None,
) -> ParityReport:
    """``candidate``: the engine's logits in full batches; ``alone``: the first ``len(alone)`` images one at a time,
    compared with ``batched_subset`` (the same images inside a batch; the first rows of ``candidate`` by default)."""
    ref_p, cand_p = softmax(reference, temperature), softmax(candidate, temperature)
    n = len(reference)
    k = min(5, reference.shape[1])
    agree = int(np.sum(reference.argmax(1) == candidate.argmax(1)))
    ref5, cand5 = topk_indices(ref_p, k), topk_indices(cand_p, k)
    overlap_sum = float(np.sum([len(set(a) & set(b)) / k for a, b in zip(ref5, cand5)]))
    top1, overlap = agree / n, overlap_sum / n
    top1_ci, overlap_ci = wilson_interval(agree, n), wilson_interval(overlap_sum, n)
    dlogit = float(np.max(np.abs(reference - candidate)))
    dprob = float(np.max(np.abs(ref_p - cand_p)))
    alone = candidate if alone is None else alone
    in_batch = candidate[: len(alone)] if batched_subset is None else batched_subset
    batch_diff = float(np.max(np.abs(alone - in_batch)))
    batch_top5_same = bool(
        np.array_equal(topk_indices(softmax(alone, temperature), k), topk_indices(softmax(in_batch, temperature), k))
    )
    t = thresholds
    failures = []
    if not batch_top5_same:
        failures.append("top-5 differs between an image alone and inside a batch")
    if not np.isfinite(batch_diff) or batch_diff > t.max_batch_logit_diff:
        failures.append(f"batch variation |Δlogit| {batch_diff:.4g} > {t.max_batch_logit_diff}")
    for failure in (
        _agreement_failure("top-1 agreement", top1, top1_ci, n, t.min_top1_agreement, decide_on),
        _agreement_failure("top-5 overlap", overlap, overlap_ci, n, t.min_top5_overlap, decide_on),
    ):
        if failure:
            failures.append(failure)
    if not np.isfinite(dlogit) or dlogit > t.max_abs_logit_diff:
        failures.append(f"max |Δlogit| {dlogit:.4g} > {t.max_abs_logit_diff}")
    if not np.isfinite(dprob) or dprob > t.max_abs_prob_diff:
        failures.append(f"max |Δprob| {dprob:.4g} > {t.max_abs_prob_diff}")
    return ParityReport(
        images=n,
        top1_agreement=top1,
        top5_overlap=overlap,
        top1_agreement_ci95=(round(top1_ci[0], 6), round(top1_ci[1], 6)),
        top5_overlap_ci95=(round(overlap_ci[0], 6), round(overlap_ci[1], 6)),
        decided_on=decide_on,
        max_abs_logit_diff=dlogit,
        max_abs_prob_diff=dprob,
        batch_logit_diff=batch_diff,
        batch_top5_identical=batch_top5_same,
        batch_images=len(alone),
        thresholds=thresholds,
        passed=not failures,
        failures=failures,
        hardware=hardware or {},
    )


def run_batched(fn, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def check_engine(
    engine: Engine,
    pixels: np.ndarray,
    reference: np.ndarray,
    *,
    temperature: float,
    thresholds: ParityThresholds,
    decide_on: DecideOn = "lower_bound",
    hardware: dict[str, str] | None = None,
) -> ParityReport:
    """Run ``pixels`` (N, 3, H, W) through the engine in full batches, and the first images also one at a time;
    compare with the FP32 ``reference`` logits. The only parity check in vitserve."""
    batch = max(1, min(engine.max_batch_size, 16))
    batched = run_batched(engine.run, pixels, batch)
    few = pixels[:BATCH_CHECK_IMAGES]
    alone = run_batched(engine.run, few, 1)
    return compare(
        reference, batched, temperature=temperature, thresholds=thresholds, alone=alone,
        batched_subset=batched[: len(few)], decide_on=decide_on, hardware=hardware,
    )  # fmt: skip


def thresholds_for(precision: str, gated_precision: str, gated: ParityReport | None) -> ParityThresholds:
    """What an engine computing at ``precision`` is held to at startup: the thresholds its file passed at export
    when it computes at the precision it was gated at, else the defaults for the precision it computes at (PyTorch
    on CUDA runs FP32 weights in FP16, so it is held to FP16's)."""
    return gated.thresholds if gated is not None and precision == gated_precision else DEFAULT_THRESHOLDS[precision]


def format_table(reports: dict[str, ParityReport]) -> str:
    head = (
        f"{'engine':<44} {'images':>6} {'top1 agree (95% CI)':>22} {'top5 overlap':>12} {'max|Δlogit|':>12} "
        f"{'max|Δprob|':>11} {'batch|Δ|':>9}  result"
    )
    lines = [head, "-" * len(head)]
    for name, r in reports.items():
        verdict = "PASS" if r.passed else "FAIL: " + "; ".join(r.failures)
        ci = r.top1_agreement_ci95 or (r.top1_agreement, r.top1_agreement)
        lines.append(
            f"{name:<44} {r.images:>6} {r.top1_agreement:>8.4f} [{ci[0]:.4f},{ci[1]:.4f}] {r.top5_overlap:>12.4f} "
            f"{r.max_abs_logit_diff:>12.3g} {r.max_abs_prob_diff:>11.3g} {r.batch_logit_diff:>9.2g}  {verdict}"
        )
    return "\n".join(lines)
