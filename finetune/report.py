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


# --- the run's report as one file ----------------------------------------------------------------------------------
# Written with html.escape rather than a template engine: one page of fixed structure, and no new dependency.
IMAGES = (  # (file in report/, caption), in reading order; missing ones are skipped
    ("training_curves.png", "Training curves: loss and learning rate per logged step, validation top-1 per epoch"),
    ("confusion_matrix.png", "Confusion matrix on validation (best checkpoint), rows normalised to recall"),
    ("test_confusion_matrix.png", "Confusion matrix on the test set"),
    ("reliability_diagram.png", "Reliability diagram: accuracy against confidence, before and after temperature scaling"),
    ("attention_entropy.png", "Attention entropy per head (C collapsed, D duplicate)"),
    ("attention_rollout.png", "Attention rollout on validation images"),
)
REPORT_CSS = (
    "body{font:15px/1.45 system-ui,sans-serif;max-width:64rem;margin:0 auto;padding:1rem;color:#1b1f24}"
    "table{border-collapse:collapse;margin:.5rem 0 1rem}th,td{padding:.2rem .6rem;border-bottom:1px solid #d7dbe0;"
    "text-align:right}th:first-child,td:first-child{text-align:left}img{max-width:100%;height:auto}"
    "figure{margin:1rem 0}figcaption{color:#5b6470;font-size:.9rem}.muted{color:#5b6470}"
)


def html_report(out: Path, metrics: dict, title: str) -> Path:
    """OUT/index.html: the whole report in one self-contained file (figures embedded as data: URIs, no scripts), to
    open from disk or attach to a ticket. ``metrics`` is metrics.json's content."""
    import base64
    from html import escape

    def table(rows: list[dict], columns: list[str]) -> str:
        head = "".join(f"<th>{escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{escape(cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)

    parts = [f"<h1>{escape(title)}</h1>"]
    final, test = metrics.get("final") or {}, metrics.get("test")
    summary = []
    if final:
        summary.append({"split": f"validation (best epoch {final['best_epoch']})", **final["val"]})
    if test:
        summary.append({"split": "test", **test})
    if summary:
        parts += ["<h2>Summary</h2>", table(summary, ["split", "num_samples", "top1", "top5", "macro_f1", "ece", "loss"])]
    if final.get("calibration"):
        c = final["calibration"]
        parts.append(f"<p>Calibration: {escape(str(c.get('decision')))}, temperature {cell(c.get('temperature'))}, "
                     f"ECE {cell(c.get('ece_before'))} → {cell(c.get('ece_after'))}.</p>")
    if metrics.get("history"):
        rows = [{"epoch": h["epoch"], **h["val"]} for h in metrics["history"]]
        parts += ["<h2>Validation per epoch</h2>", table(rows, ["epoch", "top1", "top5", "macro_f1", "ece", "loss"])]
    for stem, heading in (("per_class", "Per class, validation"), ("test_per_class", "Per class, test")):
        if (out / f"{stem}.json").is_file():
            rows = json.loads((out / f"{stem}.json").read_text())
            parts += [f"<h2>{heading}</h2>", table(rows, ["label", "precision", "recall", "f1", "support"])]
    if (out / "attention.json").is_file():
        flagged = json.loads((out / "attention.json").read_text())["flagged"]
        lines = "".join(f"<li>block {f['layer']} head {f['head']}: {escape(', '.join(f['why']))}</li>" for f in flagged)
        parts += ["<h2>Attention heads</h2>", f"<ul>{lines}</ul>" if lines else "<p>No collapsed or duplicate heads.</p>"]
    for name, caption in IMAGES:
        if (out / name).is_file():
            data = base64.b64encode((out / name).read_bytes()).decode()
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
                         f"<figcaption>{escape(caption)}</figcaption></figure>")
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{escape(title)}</title><style>{REPORT_CSS}</style>'
            f'</head><body>{"".join(parts)}<p class="muted">Written by vitserve finetune; the PNG, CSV and JSON files '
            f"beside this one hold the same figures.</p></body></html>\n")
    path = out / "index.html"
    path.write_text(page)
    return path
