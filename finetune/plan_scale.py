"""`vitserve plan` beyond one GPU: what a multi-node fine-tune and a batch-prediction Job cost in time.

    vitserve plan --model vit-large --precision bf16 --gpu a100 --nodes 2 --gpus-per-node 4 --images 100000 --epochs 3
    vitserve plan --model vit-large --gpu l4 --predict-images 10000000 --pods 100
    vitserve plan --predict-images 10000000 --pods 100 --pod-images-per-s 850    # a measured figure: the GPU check's

Built on plan's one-GPU estimates. Data-parallel training runs each GPU's step as one GPU would, then all-reduces
the gradients: over NVLink inside a node that costs little, across nodes it is bounded by the network, so the
estimate applies a stated scaling efficiency (``DDP_EFFICIENCY``) per extra node rather than pretending to model the
fabric. Batch prediction is embarrassingly parallel (k8s/jobs/predict): pods × each pod's images/s, where a pod's
rate is the engine's estimate on its GPU unless a measured one is given (the service's speed curve, the GPU check,
or `vitserve predict`'s own "img/s" line), plus each pod's start-up.
"""

from __future__ import annotations

import math

# Assumptions, not measurements (no GPU has been lent to this project): all-reduce of a ViT's gradients overlaps
# with backward inside a node (NVLink); each node beyond the first keeps ~90 % of linear scaling over a 100-400 Gb/s
# fabric. A pod's start-up (image pull from a warm registry, engine load, startup check) ~90 s.
INTRA_NODE_EFFICIENCY = 0.95
DDP_EFFICIENCY = 0.90
POD_STARTUP_S = 90.0


def training_scale(images_per_s_one_gpu: float, nodes: int, gpus_per_node: int, batch: int, images: int | None,
                   epochs: int) -> dict:
    """Images/s, step time and wall time of data-parallel training on nodes × GPUs (batch per GPU)."""
    gpus = nodes * gpus_per_node
    efficiency = (INTRA_NODE_EFFICIENCY if gpus_per_node > 1 else 1.0) * DDP_EFFICIENCY ** (nodes - 1)
    rate = images_per_s_one_gpu * gpus * efficiency
    out = {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpus": gpus, "scaling_efficiency": efficiency,
           "images_per_s": rate, "global_batch": batch * gpus, "step_s": batch * gpus / rate}  # fmt: skip
    if images:
        epoch_s = images / rate
        out |= {"epoch_s": epoch_s, "epochs_per_hour": 3600 / epoch_s, "wall_s": epochs * epoch_s, "epochs": epochs,
                "steps_per_epoch": math.ceil(images / (batch * gpus))}  # fmt: skip
    return out


def prediction_job(images: int, pods: int, pod_images_per_s: float, measured: bool) -> dict:
    """Wall time of an Indexed Job of ``pods`` shards over ``images`` (each shard ~images / pods)."""
    per_pod = math.ceil(images / pods)
    scoring_s = per_pod / pod_images_per_s
    return {"images": images, "pods": pods, "images_per_pod": per_pod, "pod_images_per_s": pod_images_per_s,
            "pod_rate_measured": measured, "startup_s": POD_STARTUP_S, "wall_s": POD_STARTUP_S + scoring_s,
            "pod_hours": pods * (POD_STARTUP_S + scoring_s) / 3600}  # fmt: skip


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def report_lines(r: dict) -> list[str]:
    lines = []
    t = r.get("multi_node")
    if t:
        lines += [f"Fine-tuning on {t['nodes']} node(s) × {t['gpus_per_node']} {t['gpu']} (data parallel, batch "
                  f"{t['global_batch']} in all): ~{t['images_per_s']:.0f} img/s, a step every {t['step_s'] * 1000:.0f} ms "
                  f"({t['scaling_efficiency']:.0%} of linear scaling assumed)"]  # fmt: skip
        if "epoch_s" in t:
            lines.append(f"  {t['steps_per_epoch']} steps per epoch of {r['images_for_scale']:,} images: "
                         f"{duration(t['epoch_s'])} per epoch, {t['epochs_per_hour']:.1f} epochs/hour, "
                         f"{t['epochs']} epoch(s) ≈ {duration(t['wall_s'])}")  # fmt: skip
    p = r.get("prediction_job")
    if p:
        source = "measured" if p["pod_rate_measured"] else f"estimated for one {p['gpu']}"
        lines += [f"Batch prediction of {p['images']:,} images on {p['pods']} pods (k8s/jobs/predict): "
                  f"{p['images_per_pod']:,} per pod at {p['pod_images_per_s']:.0f} img/s ({source}) → "
                  f"≈ {duration(p['wall_s'])} wall, {p['pod_hours']:.1f} pod-hours (incl. ~{p['startup_s']:.0f} s start-up)"]
    if lines:
        lines.append("  (estimates, not measurements; pass a measured --pod-images-per-s where you have one)")
    return lines
