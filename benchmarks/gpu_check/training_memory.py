"""Step training_memory: peak CUDA memory of a ViT-L training step, beside the planner's estimate."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.gpu_check.run import Budget, Run


def training_step_memory(checkpoint: Path, batch: int, device: str) -> dict:
    """One fine-tuning step as `vitserve finetune --precision bf16` takes it: FP32 weights, BF16 autocast forward,
    FP32 loss, backward, AdamW (finetune.optim, weight decay on matrices). Two steps (the first allocates AdamW's
    state); the peak of both is what a planner must predict."""
    import torch
    import torch.nn.functional as F
    from transformers import ViTForImageClassification

    from finetune import optim

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    model = ViTForImageClassification.from_pretrained(checkpoint, use_safetensors=True).to(device).train()
    opt = optim.build("adamw", optim.param_groups(model, 0.05), lr=5e-5)
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, model.config.num_labels, (batch,), device=device)
    step_s = []
    for _ in range(2):
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(pixel_values=x).logits
        F.cross_entropy(logits.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t)
    params = sum(p.numel() for p in model.parameters())
    out = {"batch": batch, "device": device, "parameters": params, "weights_bytes": 4 * params, "grads_bytes": 4 * params,
           "adamw_state_bytes": 8 * params, "step_s": round(step_s[1], 4), "first_step_s": round(step_s[0], 4)}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        out |= {"peak_allocated_bytes": int(peak), "peak_allocated_gib": round(peak / 2**30, 3),
                "activations_and_workspace_bytes": int(peak - 16 * params)}  # peak minus weights, grads and AdamW state
    del model, opt, x, logits
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def planner_estimate(checkpoint: Path, batch: int, device: str) -> dict:
    """`vitserve plan`'s estimate (finetune.estimates.training_memory) for the same model, batch and setup. Its
    allocated_peak is what torch.cuda.max_memory_allocated measures; its total adds the CUDA context and the
    allocator's fragmentation."""
    try:
        from finetune import estimates, shapes

        shape, _ = shapes.resolve_shape(str(checkpoint))
        m = estimates.training_memory(shape, estimates.Setup(batch=batch, precision="bf16", optimizer="adamw", device=device))
    except Exception as e:  # noqa: BLE001 - the planner is another module's work: its absence or failure is recorded
        return {"allocated_peak_bytes": None, "note": f"finetune.estimates.training_memory unavailable: {type(e).__name__}: {e}"[:300]}
    return {"allocated_peak_bytes": m.allocated_peak, "total_bytes": m.total, "activations_bytes": m.activations_total,
            "note": "finetune.estimates.training_memory(resolve_shape(checkpoint), Setup(batch, precision='bf16', optimizer='adamw'))"}


def step_training_memory(run: Run, budget: Budget) -> dict:
    checkpoint = run.checkpoint(run.plan.model)
    device = "cuda" if run.cuda else "cpu"
    rows, skipped = [], {}
    for b in run.plan.train_batches:
        if rows and budget.left() < rows[-1]["first_step_s"] * 3 * b / rows[-1]["batch"]:
            skipped[f"batch {b}"] = f"budget: {budget.left():.0f} s left"
            break
        row = training_step_memory(checkpoint, b, device)
        row["planner"] = planner_estimate(checkpoint, b, device)
        estimate, measured = row["planner"]["allocated_peak_bytes"], row.get("peak_allocated_bytes")
        row["planner_over_measured"] = round(estimate / measured, 3) if estimate and measured else None
        rows.append(row)
        run.log(f"  training step batch {b} ({device}): {row.get('peak_allocated_gib', '-')} GiB peak measured, "
                f"{estimate / 2**30 if estimate else float('nan'):.3f} GiB planned, {row['step_s']:.3f} s/step")
    if device == "cpu":
        skipped["peak memory"] = "torch.cuda.max_memory_allocated is CUDA-only; on CPU only the step time and the byte counts of weights, grads and AdamW state"
    return {"model": run.plan.model, "precision": "bf16 autocast, FP32 weights (as `vitserve finetune --precision bf16`)",
            "optimizer": "AdamW (finetune.optim)", "rows": rows, "skipped": skipped}


