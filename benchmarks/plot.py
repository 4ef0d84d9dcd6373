"""Latency–throughput figure for a peer comparison (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

COLORS = {"vitserve": "tab:blue", "bentoml-batching": "tab:orange", "naive-pipeline": "tab:red"}


def latency_throughput(result: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=120)
    for name, svc in result["services"].items():
        color = COLORS.get(name, None)
        closed = svc["closed_loop"]
        xs = [r["throughput_images_per_s"] for r in closed]
        ax.plot(xs, [r["latency"]["p99_ms"] or float("nan") for r in closed], "-o", color=color, label=f"{name} p99 (closed loop)")
        ax.plot(xs, [r["latency"]["p50_ms"] or float("nan") for r in closed], ":", color=color, alpha=0.7, label=f"{name} p50")
        for r in closed:
            ax.annotate(f"c={r['concurrency']}", (r["throughput_images_per_s"], r["latency"]["p99_ms"] or 0), fontsize=7,
                        textcoords="offset points", xytext=(3, 3), color=color)
        opened = [r for r in svc["open_loop"] if r["latency"]["p99_ms"]]
        ax.plot([r["throughput_images_per_s"] for r in opened], [r["latency"]["p99_ms"] for r in opened], "s", color=color,
                mfc="none", ms=8, label=f"{name} p99 (open loop)")
        for r in opened:
            ax.annotate(f"{r['target_rate_rps']:g}/s", (r["throughput_images_per_s"], r["latency"]["p99_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(5, -9), color=color)
    raw = result.get("raw_engine")
    served = [r["throughput_images_per_s"] for svc in result["services"].values() for r in svc["closed_loop"] + svc["open_loop"]]
    right = max(served + [0.0])
    if raw:
        e2e, engine_only = raw["best"]["end_to_end_images_per_s"], raw["best"]["engine_images_per_s"]
        ax.axvline(e2e, color="black", ls="--", lw=1, label=f"raw engine + decode ({e2e:.1f} img/s)")
        right = max(right, e2e)
        if engine_only <= 2 * right:
            ax.axvline(engine_only, color="gray", ls="--", lw=1, label=f"raw engine only ({engine_only:.1f} img/s)")
            right = max(right, engine_only)
        else:  # a tiny model's engine is so fast the line would squash everything else: say it instead
            ax.plot([], [], " ", label=f"raw engine only: {engine_only:.0f} img/s (off scale)")
    ax.set_xlim(0, right * 1.1 or 1)
    ax.set_yscale("log")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
