"""`vitserve plan`: will it fit, how fast, and which model, before a GPU is rented.

    vitserve plan --model vit-large --batch-size 4 --precision bf16
    vitserve plan --model vit-large --batch-size 4 --precision bf16 --gradient-checkpointing --gpu-memory 16
    vitserve plan --model runs/mine/checkpoint --images 3000 --gpu l4     # a local HF or timm checkpoint

Training memory is the sum of what a step holds at its peak, each part counted from the model's shapes:

    weights (fp32 master copy)  +  optimizer state  +  max(saved activations + backward transient,
                                                            gradients + optimizer-step temporaries)
    + (CUDA) context and cuBLAS workspaces + allocator fragmentation

Saved activations are the tensors autograd keeps for backward in Hugging Face's ViT (eager or SDPA attention, fp32 or
bf16/fp16 autocast, full fine-tuning, frozen blocks or PEFT LoRA), listed tensor by tensor in `layer_activations`;
tests/test_plan.py checks the list against `torch.autograd.graph.saved_tensors_hooks` exactly and the whole step's
peak against a measured one. Speed is FLOPs over a stated fraction of the GPU's peak (GPUS) or, for small batches,
eager PyTorch's per-kernel launch cost, whichever is slower. Nothing here imports torch: plans are instant.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, replace

from finetune.estimates import (
    ATTENTIONS,
    FRAGMENTATION,
    LARGE_PARAMETERS,
    OPTIMIZERS,
    PRECISIONS,
    GiB,
    Setup,
    TrainingMemory,
    dataset_advice,
    fit_lines,
    inference_memory,
    largest_batch,
    millions,
    trainable_count,
    training_memory,
)
from finetune.gpu_speed import DEFAULT_GPUS, GPUS, KERNEL_SECONDS, SERVE_EFFICIENCY, TRAIN_EFFICIENCY, serving_images_per_s, train_flops_per_image, training_images_per_s
from finetune.shapes import MODELS, VitShape, family, parameter_count, resolve_shape, vit_flops

# --- command line --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from service.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve plan", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="vit-large", help=f"{' | '.join(MODELS)} | an HF/timm checkpoint folder")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (finetune --batch-size)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="finetune --precision (bf16/fp16: autocast)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="finetune --gradient-checkpointing")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="finetune --optimizer")
    p.add_argument("--lora", action="store_true", help="LoRA adapters on q/k/v (finetune --lora)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--freeze", default="none", help="none | patch-embed | blocks:N | linear-probe (finetune --freeze)")
    p.add_argument("--attention", choices=ATTENTIONS, default="sdpa",
                   help="sdpa: what finetune trains with; eager: what attention diagnostics need")
    p.add_argument("--image-size", type=int, default=None, help="resolution (default: the model's)")
    p.add_argument("--gpu", choices=list(GPUS), default=None, help=f"one GPU instead of {', '.join(DEFAULT_GPUS)}")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB available for training (default: the GPU's)")
    p.add_argument("--images", type=int, default=None, help="training images, for the model card's dataset-size advice")
    p.add_argument("--serve-batch", type=int, default=32, help="batch for serving memory")
    scale = p.add_argument_group("beyond one GPU (finetune/plan_scale.py)")
    scale.add_argument("--nodes", type=int, default=1, help="fine-tune on this many nodes (torchrun --nnodes)")
    scale.add_argument("--gpus-per-node", type=int, default=1, help="processes (GPUs) per node")
    scale.add_argument("--epochs", type=int, default=1, help="epochs, for the wall time (with --images)")
    scale.add_argument("--predict-images", type=int, default=None, help="images to score as a batch Job")
    scale.add_argument("--pods", type=int, default=1, help="pods (shards) of that Job")
    scale.add_argument("--pod-images-per-s", type=float, default=None,
                       help="a pod's measured img/s (default: the engine's estimate on --gpu)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")
    return p


def plan(args: argparse.Namespace) -> dict:
    """Every estimate the report prints, as plain data (bytes, FLOPs, images/s)."""
    shape, source = resolve_shape(args.model)
    if args.image_size:
        shape = replace(shape, image_size=args.image_size)
    setup = Setup(
        batch=args.batch_size, precision=args.precision, attention=args.attention,
        checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, lora_r=args.lora_r if args.lora else 0,
        frozen=args.freeze, accumulation=args.gradient_accumulation_steps,
    )  # fmt: skip
    memory = training_memory(shape, setup)
    gpus = [args.gpu] if args.gpu else list(DEFAULT_GPUS)
    budget = lambda name: int(GPUS[name].memory_gib * GiB)  # noqa: E731
    fit_gib = args.gpu_memory or (GPUS[args.gpu].memory_gib if args.gpu else None)
    return {
        "model": args.model, "source": source, "shape": shape.__dict__, "family": family(shape),
        "parameters": parameter_count(shape), "trainable": trainable_count(shape, setup),
        "flops_per_image": vit_flops(shape), "train_flops_per_image": train_flops_per_image(shape, setup),
        "setup": setup.__dict__, "training": memory_dict(memory),
        "checkpointed": memory_dict(training_memory(shape, replace(setup, checkpointing=True))),
        "inference": inference_memory(shape, args.serve_batch, "fp16"),
        "gpus": {name: {"memory_gib": budget(name) / GiB, "fits": memory.total <= budget(name),
                        "largest_batch": largest_batch(shape, setup, budget(name)),
                        "train_images_per_s": training_images_per_s(shape, setup, GPUS[name]),
                        "serve_images_per_s": serving_images_per_s(shape, GPUS[name]),
                        "bf16": GPUS[name].bf16} for name in gpus},
        "dataset_advice": dataset_advice(args.images, source)[1] if args.images else None,
        "fit_gib": fit_gib, "fit": fit_lines(shape, setup, int(fit_gib * GiB)) if fit_gib else None,
        "serve_batch": args.serve_batch, **scale_out(args, shape, setup),
    }  # fmt: skip


def scale_out(args: argparse.Namespace, shape: VitShape, setup: Setup) -> dict:
    """The multi-node fine-tune and batch-prediction estimates, on --gpu (default the first of the table's)."""
    from finetune import plan_scale

    gpu = args.gpu or DEFAULT_GPUS[-1]
    out: dict = {}
    if args.nodes > 1 or args.gpus_per_node > 1:
        out["multi_node"] = {**plan_scale.training_scale(training_images_per_s(shape, setup, GPUS[gpu]), args.nodes,
                                                         args.gpus_per_node, setup.batch, args.images, args.epochs),
                             "gpu": GPUS[gpu].name}  # fmt: skip
        out["images_for_scale"] = args.images
    if args.predict_images:
        measured = args.pod_images_per_s is not None
        rate = args.pod_images_per_s if measured else serving_images_per_s(shape, GPUS[gpu])
        out["prediction_job"] = {**plan_scale.prediction_job(args.predict_images, args.pods, rate, measured),
                                 "gpu": GPUS[gpu].name}
    return out


def memory_dict(m: TrainingMemory) -> dict:
    return {**asdict(m), "activations_total": m.activations_total, "step_peak": m.step_peak,
            "allocated_peak": m.allocated_peak, "total": m.total}  # fmt: skip


def gib(n: float) -> str:
    return f"{n / GiB:6.2f} GiB"


def describe_setup(setup: dict, trainable: int) -> str:
    precision = "fp32" if setup["precision"] == "fp32" else f"{setup['precision']} autocast"
    what = (f"LoRA r={setup['lora_r']}" if setup["lora_r"] else
            "full fine-tuning" if setup["frozen"] == "none" else f"--freeze {setup['frozen']}")  # fmt: skip
    extra = ", gradient checkpointing" if setup["checkpointing"] else ""
    return (f"batch {setup['batch']}, {precision}, {setup['attention'].upper()} attention, {setup['optimizer']}, "
            f"{what} ({millions(trainable)} trainable){extra}")  # fmt: skip


def format_report(r: dict) -> str:
    s, t, f, inf = r["shape"], r["training"], r["flops_per_image"], r["inference"]

    def with_checkpointing(key: str) -> str:
        other = r["checkpointed"][key] / GiB
        return "" if r["setup"]["checkpointing"] else f"   (with --gradient-checkpointing: {other:.2f})"

    lines = [
        f"{r['model']} ({r['source']}): {r['family']}, {s['image_size']} px, patch {s['patch_size']}, "
        f"{f['tokens']} tokens, {s['layers']} blocks, width {s['hidden']}, {s['heads']} heads, MLP {s['mlp']}",
        f"  {millions(r['parameters'])} parameters; {f['total'] / 1e9:.1f} GFLOP per image forward, "
        f"{r['train_flops_per_image'] / 1e9:.1f} per training image",
        "",
        f"Training memory, {describe_setup(r['setup'], r['trainable'])}:",
        f"  weights (fp32 master copy)           {gib(t['weights'])}",
        f"  gradients (fp32)                     {gib(t['gradients'])}",
        f"  optimizer state                      {gib(t['optimizer_state'])}",
        f"  activations saved for backward       {gib(t['activations_total'])}"
        + with_checkpointing("activations_total"),
        f"  backward transient                   {gib(t['backward_transient'])}",
        f"  optimizer-step temporaries           {gib(t['step_temporaries'])}",
        f"  peak allocated                       {gib(t['allocated_peak'])}   (weights + optimizer state + "
        "max(activations + transient, gradients + step temporaries))",
        f"  CUDA context + {FRAGMENTATION:.0%} fragmentation     {gib(t['total'] - t['allocated_peak'])}",
        f"  total                                {gib(t['total'])}{with_checkpointing('total')}",
        "",
        f"Serving (FP16 engine, batch {r['serve_batch']}): weights {inf['weights'] / GiB:.2f} GiB + input and working "
        f"set {(inf['input'] + inf['working']) / GiB:.2f} GiB + context = {inf['total'] / GiB:.2f} GiB",
        "",
        f"{'GPU':<16}{'memory':>8}{'fits':>6}{'largest batch':>15}{'train img/s':>13}{'serve img/s':>13}",
    ]  # fmt: skip
    for name, g in r["gpus"].items():
        note = "" if g["bf16"] or r["setup"]["precision"] != "bf16" else "  (no bf16: use --precision fp16)"
        lines.append(f"{GPUS[name].name:<16}{g['memory_gib']:>7.0f}G{'yes' if g['fits'] else 'no':>6}"
                     f"{g['largest_batch']:>15}{g['train_images_per_s']:>13.0f}{g['serve_images_per_s']:>13.0f}{note}")
    lines.append(f"  (speed: {TRAIN_EFFICIENCY[r['setup']['attention']]:.0%} of dense peak when training, "
                 f"{SERVE_EFFICIENCY:.0%} serving FP16, or {KERNEL_SECONDS * 1e6:.0f} µs per kernel if slower; "
                 "estimates, not measurements)")  # fmt: skip
    if r["fit"]:
        lines += ["", *r["fit"]]
    from finetune.plan_scale import report_lines

    if scaled := report_lines(r):
        lines += ["", *scaled]
    lines += ["", *advice_lines(r)]
    return "\n".join(lines)


def advice_lines(r: dict) -> list[str]:
    """The model card's advice for this model, dataset and GPU."""
    large = r["parameters"] >= LARGE_PARAMETERS
    out = ["Advice:"]
    if r["dataset_advice"]:
        out.append(f"  data: {r['dataset_advice']}")
    elif large:
        out.append("  data: the model card recommends 10,000+ images for ViT-Large (under 5,000 it will likely "
                   "overfit: use ViT-Base); pass --images N to check yours")  # fmt: skip
    if large and r["fit_gib"] and r["fit_gib"] < 16:
        out.append("  GPU: the model card asks for a 16 GB+ GPU for ViT-Large; below that prefer ViT-Base or --lora")
    if not r["fit"] and not all(g["fits"] for g in r["gpus"].values()):
        out.append("  memory: where it does not fit: --gradient-checkpointing, a smaller --batch-size with "
                   "--gradient-accumulation-steps, --lora or --freeze blocks:N (--gpu-memory GiB estimates each)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.batch_size, args.gradient_accumulation_steps, args.lora_r, args.nodes, args.gpus_per_node, args.epochs,
           args.pods) < 1 or (args.pod_images_per_s is not None and args.pod_images_per_s <= 0):
        print("vitserve plan: error: --batch-size, --gradient-accumulation-steps, --lora-r, --nodes, --gpus-per-node, "
              "--epochs and --pods must be >= 1, --pod-images-per-s > 0", file=sys.stderr)  # fmt: skip
        return 2
    if not re.fullmatch(r"none|patch-embed|linear-probe|blocks:\d+", args.freeze):
        print(f"vitserve plan: error: --freeze {args.freeze!r}: expected none, patch-embed, blocks:N or linear-probe",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        result = plan(args)
    except ValueError as e:
        print(f"vitserve plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
