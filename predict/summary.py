"""What a run's rows add up to: counts and errors by type, and for a folder laid out by class, finetune's own
evaluation (finetune/evaluate.py) and report files (finetune/report.py).

Everything is computed from the rows in the output file, not from the run in memory: a run resumed three times and
one that was never interrupted report the same figures, and they are the figures anyone can recompute from the file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from predict.folder import labels_by_folder
from predict.output import Row


def report_paths(output: Path) -> dict[str, Path]:
    """The files written next to ``output`` (preds.csv → preds.summary.json, preds.per_class.csv, ...)."""
    stem = output.with_suffix("")
    return {name: stem.with_name(f"{stem.name}.{name}") for name in
            ("summary.json", "per_class.csv", "per_class.json", "confusion.png")}  # fmt: skip


def counts(rows: list[Row]) -> dict:
    errors = Counter(r.error_type for r in rows if r.failed)
    return {"files": len(rows), "scored": len(rows) - sum(errors.values()), "failed": sum(errors.values()),
            "errors_by_type": dict(sorted(errors.items()))}  # fmt: skip


def served_probabilities(rows: list[Row], num_labels: int) -> np.ndarray:
    """(N, L) probabilities as far as the rows tell: the top-k scores where written, the rest of the probability
    mass spread evenly over the other labels. Whatever depends on the top-1 alone (accuracy, per-class figures,
    confusion matrix, ECE) is exact; top-5 needs k ≥ 5 and the loss every label's score (see :func:`evaluate`)."""
    probs = np.empty((len(rows), num_labels), dtype=np.float64)
    for i, row in enumerate(rows):
        known = [p.index for p in row.top]
        left = max(0.0, 1.0 - sum(p.score for p in row.top))
        probs[i] = left / (num_labels - len(known)) if num_labels > len(known) else 0.0
        probs[i, known] = [p.score for p in row.top]
    return probs


def evaluate(rows: list[Row], truth: dict[str, int], labels: list[str], top_k: int) -> tuple[dict, list[dict], list]:
    """finetune's metrics, per-class rows (classes present in the folder) and confusion counts (true × predicted)
    over the scored rows. The probabilities are the served ones (the manifest's temperature), so the ECE is the
    calibration clients see."""
    import torch

    from finetune.evaluate import confusion, metrics, per_class

    scored = [r for r in rows if not r.failed]
    # metrics() takes logits: log-probabilities give back the same probabilities under its softmax
    logits = torch.from_numpy(np.log(np.clip(served_probabilities(scored, len(labels)), 1e-30, None))).float()
    target = torch.tensor([truth[r.file] for r in scored], dtype=torch.long)
    figures = metrics(logits, target)
    if top_k < min(5, len(labels)):
        del figures["top5"]  # the rows hold fewer than 5 labels
    if top_k < len(labels):
        del figures["loss"]  # needs the true label's score, which rows lack when it is outside the top-k
    classes = [c for c in per_class(logits, target, labels) if c["support"] > 0]
    return figures, classes, confusion(logits, target).tolist()


def write_reports(paths: dict[str, Path], classes: list[dict], confusion_counts: list, labels: list[str], title: str) -> None:
    import torch

    from finetune.report import confusion_matrix, per_class_files

    per_class_files(classes, paths["per_class.csv"])  # it swaps the suffix for .csv and .json
    confusion_matrix(torch.tensor(confusion_counts), labels, paths["confusion.png"], title=title)


def class_figures(rows: list[Row], files: list[str], labels: list[str], top_k: int, paths: dict[str, Path]) -> dict:
    """For a folder laid out by class, the summary's accuracy fields, with the per-class and confusion files written;
    otherwise ``{"no_accuracy": why}`` where the layout is partly by class, or nothing."""
    truth = labels_by_folder(files, labels)
    for name in ("per_class.csv", "per_class.json", "confusion.png"):
        paths[name].unlink(missing_ok=True)  # an earlier run's, which this one may not replace
    if len(truth) < len(files):
        outside = f"{len(files) - len(truth)} of {len(files)} files are not under a folder named after a label"
        return {"no_accuracy": outside} if truth else {}
    if all(r.failed for r in rows):
        return {"no_accuracy": "no file could be scored"}
    try:
        figures, classes, confusion = evaluate(rows, truth, labels, top_k)
        write_reports(paths, classes, confusion, labels, f"top-1 {figures['top1']:.2%} over {figures['num_samples']} images")
    except ImportError as e:  # torchmetrics and matplotlib come with the finetune extra, not with serving
        return {"no_accuracy": f"finetune's evaluation needs {e.name}: pip install 'vitserve[finetune]'"}
    correct = sum(confusion[i][i] for i in range(len(confusion)))  # exact, where metrics() gives float32
    return {"accuracy": correct / figures["num_samples"], "correct": correct, "classes": len(set(truth.values())),
            "metrics": figures, "per_class": classes,
            "confusion": {"labels": labels, "rows_true_columns_predicted": confusion}}  # fmt: skip


def describe(summary: dict) -> list[str]:
    """The short summary printed at the end of a run."""
    c, run = summary["counts"], summary["run"]
    errors = ", ".join(f"{n} {t}" for t, n in c["errors_by_type"].items())
    lines = [
        f"{c['files']} files: {c['scored']} scored, {c['failed']} failed" + (f" ({errors})" if errors else ""),
        f"this run: {run['rows_written']} files in {run['scoring_s']:.1f} s = {run['images_per_s']:.0f} img/s "
        f"(engine {summary['engine']}, batch {summary['batch_size']}, {summary['decode_threads']} decode threads; "
        f"startup {run['startup_s']:.1f} s)" + (f"; {run['resumed_rows']} rows were already written" if run["resumed_rows"] else ""),
    ]  # fmt: skip
    m = summary.get("metrics")
    if m is not None:
        top5 = f", top-5 {m['top5']:.2%}" if "top5" in m else ""
        lines.append(f"accuracy {summary['accuracy']:.2%} (top-1{top5}, macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f}) "
                     f"over {m['num_samples']} scored images in {summary['classes']} class folders")  # fmt: skip
    elif "no_accuracy" in summary:
        lines.append(f"no accuracy: {summary['no_accuracy']}")
    if summary.get("rows_for_other_files"):
        lines.append(f"{summary['rows_for_other_files']} rows in the output name files not in the folder: left out of these figures")
    return lines
