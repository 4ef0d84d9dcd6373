"""Steps engines/<model> and compile/<model>: each variant built, gated against FP32, swept across batch sizes."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.gpu_check.plan import tail_of
from benchmarks.gpu_check.run import Budget, Run
from benchmarks.gpu_check.variants import engine_offers
from benchmarks.harness.sweep import Variant, engine_calls, sweep


@dataclass
class ModelContext:
    """One model's checkpoint, parity images and FP32 reference logits, shared by every variant and step."""

    key: str
    checkpoint: Path
    ckpt: object  # export.checkpoint.LoadedCheckpoint
    shape: object  # benchmarks.models.VitShape
    flops: float  # per image
    pixels: np.ndarray  # (N, 3, H, W) float32, through the service's decode and preprocessing
    reference: np.ndarray  # (N, labels) FP32 logits
    reference_info: dict
    entry: object  # service.artifact.EngineFile for the safetensors weights (as the artifact lists them)
    setup_s: dict


def model_context(run: Run, key: str) -> ModelContext:
    return run.cached(f"context/{key}", lambda: _model_context(run, key))


def _model_context(run: Run, key: str) -> ModelContext:
    from benchmarks.harness.engine_builds import engine_entry
    from benchmarks.models import checkpoint_shape, vit_flops
    from export.checkpoint import load_checkpoint
    from export.gate_inputs import default_image_bytes, preprocess_images
    from service.preprocess import Preprocessor

    timings = {}
    t = time.perf_counter()
    checkpoint = run.checkpoint(key)
    timings["checkpoint"] = time.perf_counter() - t
    t = time.perf_counter()
    ckpt = load_checkpoint(str(checkpoint))  # FP32, eager attention: export's reference model
    shape = checkpoint_shape(checkpoint)
    pre = Preprocessor(ckpt.preprocessing)
    images = run.cached("parity_images", lambda: default_image_bytes(run.plan.parity_images))  # export's own views
    pixels = preprocess_images(images, pre)
    timings["load_and_parity_images"] = time.perf_counter() - t
    t = time.perf_counter()
    reference, info = fp32_reference(ckpt.model, pixels, "cuda" if run.cuda else "cpu")
    timings["reference"] = time.perf_counter() - t
    h, w = pre.input_size
    # The weights as an artifact lists them (FP32 safetensors); the PyTorch engine computes in its own precision.
    entry = engine_entry(checkpoint / "model.safetensors", "fp32", h, w, len(ckpt.labels), max(run.plan.batches), "any", fmt="safetensors")
    return ModelContext(key, checkpoint, ckpt, shape, vit_flops(shape)["total"], pixels, reference, info, entry,
                        {k: round(v, 2) for k, v in timings.items()})


def fp32_reference(model, pixels: np.ndarray, device: str) -> tuple[np.ndarray, dict]:
    """Export's reference: the FP32 model (eager attention, export.checkpoint) over the parity images. On CUDA with TF32
    off, so that it is FP32 arithmetic; its first images are also run on the CPU, where export computes them."""
    import torch

    from export.gate_inputs import reference_logits
    from service.parity import run_batched

    if device == "cpu":
        return reference_logits(model, pixels), {"device": "cpu", "images": len(pixels)}
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model.to("cuda")
        with torch.inference_mode():
            reference = run_batched(lambda x: model(torch.from_numpy(x).to("cuda")).float().cpu().numpy(), pixels, 16)
    finally:
        model.to("cpu")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    on_cpu = reference_logits(model, pixels[:8])
    return reference, {"device": "cuda", "tf32": False, "images": len(pixels),
                       "max_abs_logit_diff_vs_cpu_first_8": float(np.abs(reference[:8] - on_cpu).max())}


def run_variants(run: Run, budget: Budget, ctx: ModelContext, variants: list[Variant], skipped: dict[str, str]) -> dict:
    """Each variant: build, parity against FP32 (export's gate function and thresholds), then the batch sweep (a
    variant with ``gate_last`` sweeps first); what is done is saved after each phase (Run.progress)."""
    import gc

    import torch

    results: dict = {}
    queue = list(variants)

    def partial() -> dict:
        return {"model": model_facts(ctx), "variants": results, "skipped": skipped}

    while queue:
        v = queue.pop(0)
        share = Budget(max(0.0, budget.left()) * v.weight / (v.weight + sum(u.weight for u in queue)))
        out: dict = {"device": v.device, "precision": v.precision, "note": v.note}
        results[v.name] = out
        engine = None
        try:
            t = time.perf_counter()
            engine = v.build()
            out["build_s"] = round(time.perf_counter() - t, 2)
            out["engine"] = engine.describe()
            phases = [_gate, _sweep] if not v.gate_last else [_sweep, _gate]
            for phase in phases:
                phase(run, ctx, v, engine, out, share)
                run.progress(partial())
            if v.after is not None:
                out["compile"] = v.after()
            _log_variant(run, v, out)
        except Exception as e:  # noqa: BLE001 - one engine failing must not lose the others' figures
            out["error"] = f"{type(e).__name__}: {e}"[:500]
            out["traceback_tail"] = tail_of(traceback.format_exc())
            run.log(f"  {v.name}: failed ({out['error']})")
            if v.fallback is not None:
                out["fallback"] = v.fallback.name
                queue.insert(0, v.fallback)
        finally:
            del engine
            gc.collect()
            if run.cuda:
                torch.cuda.empty_cache()
        run.progress(partial())
    failed = [n for n, r in results.items() if "error" in r]
    return {**partial(), "torch_engine_offers": engine_offers(),
            **({"status": "failed", "error": f"variant(s) failed: {', '.join(failed)}"} if failed else {})}


def _gate(run: Run, ctx: ModelContext, v: Variant, engine, out: dict, share: Budget) -> None:
    from service import hardware
    from service.parity import DEFAULT_THRESHOLDS, check_engine

    t = time.perf_counter()
    report = check_engine(engine, ctx.pixels, ctx.reference, temperature=ctx.ckpt.temperature,
                          thresholds=DEFAULT_THRESHOLDS[v.precision], hardware=hardware.describe(v.device))
    out["parity_s"] = round(time.perf_counter() - t, 2)
    out["parity"] = report.model_dump(mode="json")


def _sweep(run: Run, ctx: ModelContext, v: Variant, engine, out: dict, share: Budget) -> None:
    batches = v.batches or run.plan.batches
    out.update(sweep(engine_calls(engine, max(batches)), batches, device=v.device, flops_per_image=ctx.flops,
                     ceiling_tflops=run.ceilings.get((v.device, v.precision)), min_seconds=run.plan.min_seconds,
                     seconds=max(0.0, share.left()), max_batch=engine.max_batch_size))


def _log_variant(run: Run, v: Variant, out: dict) -> None:
    parity = out["parity"]
    best = max(out["rows"], key=lambda r: r.get("images_per_s", 0)) if out["rows"] else None
    run.log(f"  {v.name:<30} parity {'PASS' if parity['passed'] else 'FAIL'} (max |Δlogit| {parity['max_abs_logit_diff']:.3g}); "
            + (f"best {best['images_per_s']:.1f} img/s at batch {best['batch']}" if best and "images_per_s" in best else "no batch timed")
            + (f", {best['fraction_of_matmul']:.2f} of matmul" if best and best.get("fraction_of_matmul") else "")
            + (f"; {out['stopped']}" if out["stopped"] else ""))


def model_facts(ctx: ModelContext) -> dict:
    return {"name": ctx.key, "checkpoint": str(ctx.checkpoint if ctx.key == "demo" else f"benchmarks.models.make_checkpoint({ctx.key!r})"),
            "random_weights": ctx.key != "demo", "shape": ctx.shape.__dict__, "gflop_per_image": round(ctx.flops / 1e9, 3),
            "parity_images": {"count": len(ctx.pixels), "source": "export's default views of scikit-image's photographs (export.gate_inputs.default_image_bytes)"},
            "reference": ctx.reference_info, "setup_s": ctx.setup_s}  # fmt: skip


def engines_step(key: str, variants_of: Callable) -> Callable[[Run, Budget], dict]:
    def step(run: Run, budget: Budget) -> dict:
        ctx = model_context(run, key)
        variants, skipped = variants_of(run, ctx)
        return run_variants(run, budget, ctx, variants, skipped)

    return step


