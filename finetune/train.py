"""The training run behind `vitserve finetune`, top to bottom:

    scan data -> split -> model (resolution, drop path, freeze / LoRA) -> loaders -> optimizer + schedule
    -> [resume] -> epochs (steps, training-state saves, evaluation, best checkpoint)
    -> calibration on validation -> test -> report (+ attention diagnostics)

Smallest real run (3,000 Fashion-MNIST images, a 0.35M-parameter ViT from scratch; measured on the shared 2-core
dev machine: 2.4 min, 68 % test top-1):

    python -m finetune.fashion_mnist --out /tmp/fm --per-class-train 300 --per-class-test 100
    python -m finetune.tiny_base --out /tmp/tiny --image-size 28 --patch-size 7 --hidden 96 --layers 3 --heads 3
    python -m finetune --train-dir /tmp/fm/train --test-dir /tmp/fm/test --base /tmp/tiny --output /tmp/run \
        --epochs 5 --batch-size 32 --lr 1e-3 --num-workers 0

The full demo (60,000 images, ~88-89 %, ~11 min on 2 cores) is in finetune/README_SECTION.md.

RUN_DIR afterwards: checkpoint/ (HF folder + vitserve_calibration.json), train_state/ (for --resume), split.json,
args.json, metrics.json, report/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from finetune import calibration, checkpoint, data, evaluate, optim, plan, report, runtime
from finetune import model as model_lib
from finetune.augment import BatchAugment
from finetune.config import RESUME_SAFE, TrainConfig, UsageError, to_dict

CHECKPOINT_DIR = "checkpoint"
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class ResumableSampler(DistributedSampler):
    """DistributedSampler (a seeded permutation per epoch, this rank's share of it) that can start mid-epoch,
    so a resumed run sees exactly the batches the interrupted one had left. Works without a process group."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def run(cfg: TrainConfig) -> int:
    rt = runtime.setup(cfg.device)
    run_dir = Path(cfg.output)
    created = not run_dir.exists()
    code = 1
    try:
        code = _run(cfg, rt)
        return code
    except torch.cuda.OutOfMemoryError:
        rt.error(out_of_memory_message(cfg, rt.device))
        return 1
    except FloatingPointError as e:
        rt.error(str(e))
        return 1
    finally:
        runtime.teardown(rt)
        if code != 0 and created and rt.is_main:
            _remove_if_empty(run_dir)  # a run that failed before writing anything leaves no folder behind


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` and its empty subfolders if no file was written under it."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def _run(cfg: TrainConfig, rt: runtime.Runtime) -> int:
    import transformers

    transformers.utils.logging.set_verbosity_error()  # we report the head re-initialisation ourselves
    transformers.utils.logging.disable_progress_bar()
    run_dir = Path(cfg.output)
    device = rt.device

    # --- precision --------------------------------------------------------------------------------------------
    if cfg.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU (CPUs have no fast fp16); on CPU use bf16 or fp32")
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bf16 support (pre-Ampere): use --precision fp16 or fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    # --- run folder -------------------------------------------------------------------------------------------
    state = None
    if cfg.resume:
        state = checkpoint.load_state(run_dir)
        if state is None:
            raise UsageError(f"--resume: {run_dir} has no training state ({checkpoint.STATE_DIR}/)")
        changed = {
            k: (state["config"].get(k), v)
            for k, v in to_dict(cfg).items()
            if k not in RESUME_SAFE and state["config"].get(k) != v
        }
        if changed:
            rt.warn(f"--resume with options that differ from the interrupted run (was, now): {changed}")
    elif (run_dir / checkpoint.STATE_DIR).exists() or (run_dir / CHECKPOINT_DIR).exists():
        raise UsageError(f"{run_dir} already holds a run: add --resume to continue it, or choose another --output")
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.recover(run_dir / CHECKPOINT_DIR)

    # --- data -------------------------------------------------------------------------------------------------
    threads = max(1, cfg.num_workers)
    train_scan = data.scan_folder(cfg.train_dir, threads=threads)
    classes = train_scan.classes
    if cfg.val_dir:
        val_scan = data.scan_folder(cfg.val_dir, classes, threads=threads)
        for rel, reason in val_scan.corrupt:
            rt.warn(f"skipping unreadable file {val_scan.root / rel} ({reason})")
        train_samples, val_samples = train_scan.samples, val_scan.samples
        val_root, val_sha = val_scan.root, val_scan.sha256
    else:
        train_samples, val_samples = data.stratified_split(train_scan.samples, cfg.val_split, cfg.seed)
        val_root, val_sha = train_scan.root, {rel: train_scan.sha256[rel] for rel, _ in val_samples}
    if not val_samples:
        raise UsageError("the validation set is empty")
    rt.info(f"classes ({len(classes)}): {', '.join(classes)}")
    data.describe(train_scan, train_samples, val_samples, val_sha, rt.info, rt.warn, base=cfg.base)
    split = {
        "classes": classes,
        "train_dir": str(train_scan.root),
        "val_dir": str(val_root),
        "seed": cfg.seed,
        "val_split": None if cfg.val_dir else cfg.val_split,
        "train": [[rel, label] for rel, label in train_samples],
        "val": [[rel, label] for rel, label in val_samples],
    }
    if state is not None and (run_dir / "split.json").exists():
        with open(run_dir / "split.json") as f:
            saved = json.load(f)
            if any(saved[k] != split[k] for k in ("classes", "train", "val")):
                raise UsageError("--resume: the training or validation files changed since the run started")
    if rt.is_main:
        checkpoint.write_json_atomically(run_dir / "split.json", split)
    test_scan = data.scan_folder(cfg.test_dir, classes, threads=threads) if cfg.test_dir else None
    if test_scan:
        for rel, reason in test_scan.corrupt:
            rt.warn(f"skipping unreadable file {test_scan.root / rel} ({reason})")

    # --- model ------------------------------------------------------------------------------------------------
    runtime.seed_everything(cfg.seed)  # the new head's initialisation
    model = model_lib.load(cfg.base, classes, cfg.dropout, cfg.attention_dropout)
    base_size = model.config.image_size
    image_size = cfg.image_size or (base_size if isinstance(base_size, int) else base_size[0])
    model_lib.set_image_size(model, image_size)
    processor = model_lib.load_processor(cfg.base, image_size)
    spec = data.preprocessing(processor, image_size)  # what export will write into the serving manifest
    scale, offset = data.normalization(spec, device)
    if cfg.drop_path:
        model_lib.add_drop_path(model, cfg.drop_path)
    model_lib.freeze(model, cfg.freeze)
    if cfg.gradient_checkpointing:  # renamed "activation checkpointing" in transformers 5
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        model = model_lib.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    model.to(device).train()
    trainable, total = model_lib.count_parameters(model)
    rt.info(
        f"model: {cfg.base} at {image_size}px, {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable, "
        f"new {len(classes)}-class head"
    )

    # --- batch size -------------------------------------------------------------------------------------------
    micro, accum = cfg.batch_size, cfg.gradient_accumulation_steps
    if cfg.auto_batch:
        micro, accum = auto_batch(cfg, model, micro * accum, image_size, device, autocast, rt)

    # --- loaders ----------------------------------------------------------------------------------------------
    train_set = data.ImageFolderDataset(train_scan.root, train_samples, spec)
    sampler = ResumableSampler(train_set, rt.world_size, rt.rank, cfg.seed)
    workers = cfg.num_workers
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    # A private generator: creating an iterator then draws nothing from the global RNG, which resume restores.
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, micro, sampler=sampler, generator=generator, **loader_kw)
    val_loader = DataLoader(data.ImageFolderDataset(val_root, val_samples, spec), micro * 2, **loader_kw)
    test_loader = (
        DataLoader(data.ImageFolderDataset(test_scan.root, test_scan.samples, spec), micro * 2, **loader_kw)
        if test_scan and test_scan.samples
        else None
    )
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    total_steps = cfg.epochs * steps_per_epoch

    # --- optimizer, schedule ------------------------------------------------------------------------------------
    optimizer = optim.build(cfg.optimizer, optim.param_groups(model, cfg.weight_decay), cfg.learning_rate)
    scheduler, warmup_steps = optim.schedule(optimizer, total_steps, cfg.warmup_ratio)
    sam = optim.SAM(model.parameters(), cfg.sam_rho) if cfg.sam else None
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    augment = BatchAugment(cfg.augment, image_size, scale, offset, len(classes)).to(device)
    train_model = model
    if rt.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if device.type == "cuda" else None
        )

    # --- progress (restored on --resume) ------------------------------------------------------------------------
    progress = {"step": 0, "epoch": 0, "batch": 0, "epoch_loss": 0.0, "epoch_steps": 0, "since_log": []}
    best = {"metric": cfg.metric, "value": None, "epoch": None}
    history: list[dict] = []  # one entry per evaluation
    log: list[dict] = []  # train loss / lr every log_every_steps
    runtime.seed_everything(cfg.seed + rt.rank)  # augmentation and dropout differ across ranks
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        runtime.set_rng_state(state["rng"]["tensors"], state["rng"]["values"])
        progress, best, history, log = state["progress"], state["best"], state["history"], state["log"]
        where = f"epoch {progress['epoch'] + 1}, batch {progress['batch']}"
        rt.info(f"resumed at step {progress['step']}/{total_steps} ({where})")

    resolved = {
        "image_size": image_size,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "effective_batch_size": micro * accum * rt.world_size,
        "world_size": rt.world_size,
        "device": str(device),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": warmup_steps,
        "num_train": len(train_samples),
        "num_val": len(val_samples),
        "num_test": len(test_scan.samples) if test_scan else 0,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "classes": classes,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if rt.is_main:
        checkpoint.write_json_atomically(run_dir / "args.json", {**to_dict(cfg), "resolved": resolved})

    def save_training_state() -> None:
        if rt.is_main:
            rng_tensors, rng_values = runtime.rng_state()
            checkpoint.save_state(run_dir, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": {"tensors": rng_tensors, "values": rng_values},
                "progress": progress, "best": best, "history": history, "log": log,
                "config": to_dict(cfg),
            })  # fmt: skip
        rt.barrier()

    def write_metrics(final: dict | None = None, test: dict | None = None) -> None:
        if rt.is_main:
            out = {"history": history, "best": best, "final": final, "test": test, "train_log": log}
            checkpoint.write_json_atomically(run_dir / "metrics.json", out)

    # --- one optimizer step -------------------------------------------------------------------------------------
    def loss_and_backward(inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Forward/backward over the micro-batches of one step; gradients = mean over all their images."""
        n_images, total_loss = sum(len(x) for x, _ in inputs), 0.0
        for i, (x, target) in enumerate(inputs):
            last = i == len(inputs) - 1
            sync = contextlib.nullcontext() if last or not rt.distributed else train_model.no_sync()
            with sync:
                with autocast():
                    logits = train_model(pixel_values=x).logits  # (B, C)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
                loss = loss * (len(x) / n_images)  # each image weighs the same, whatever its micro-batch
                (scaler.scale(loss) if scaler is not None else loss).backward()
            total_loss += loss.item()
        return total_loss

    def train_step(micro_batches: list) -> float:
        inputs = [augment(images.to(device, non_blocking=True), labels.to(device)) for images, labels in micro_batches]
        loss = loss_and_backward(inputs)
        if sam is not None:  # second pass at the worst-case nearby weights; the step uses that gradient
            sam.perturb()
            optimizer.zero_grad(set_to_none=True)
            loss_and_backward(inputs)
            sam.restore()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable_params, cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # --- SIGTERM: finish the step, save, exit ---------------------------------------------------------------------
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    # --- epochs ------------------------------------------------------------------------------------------------
    bar = tqdm(
        total=total_steps, initial=progress["step"], unit="step", dynamic_ncols=True, mininterval=1.0,
        disable=not rt.is_main,
    )  # fmt: skip
    try:
        for epoch in range(progress["epoch"], cfg.epochs):
            sampler.set_epoch(epoch, start=progress["batch"] * micro)
            batches = iter(train_loader)
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
            epoch_start, epoch_images, window = time.perf_counter(), 0, (time.perf_counter(), 0)
            since_log = progress["since_log"]  # losses since the last log entry
            while group := list(itertools.islice(batches, accum)):
                loss = train_step(group)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss} at step {progress['step'] + 1}: lower --learning-rate, keep "
                        "--max-grad-norm on, or use --precision bf16/fp32"
                    )
                n = sum(len(labels) for _, labels in group)
                epoch_images += n
                progress["step"] += 1
                progress["batch"] += len(group)
                progress["epoch_loss"] += loss
                progress["epoch_steps"] += 1
                since_log.append(loss)
                lr = scheduler.get_last_lr()[0]
                if progress["step"] % cfg.log_every_steps == 0:
                    log.append({"step": progress["step"], "loss": sum(since_log) / len(since_log), "lr": lr})
                    since_log.clear()
                t0, n0 = window
                elapsed = time.perf_counter() - t0
                images_per_s = (n0 + n) * rt.world_size / max(elapsed, 1e-9)
                postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "img/s": f"{images_per_s:.0f}"}
                if (gb := runtime.memory_gb(device)) is not None:
                    postfix["gpu_mem"] = f"{gb:.1f}GB"
                bar.set_postfix(postfix, refresh=False)
                bar.update()
                window = (time.perf_counter(), 0) if elapsed > 2 else (t0, n0 + n)

                stopping = rt.any(stop["requested"])
                if stopping or (cfg.save_every_steps and progress["step"] % cfg.save_every_steps == 0):
                    save_training_state()
                if stopping:
                    bar.close()
                    rt.info(f"SIGTERM: saved the training state at step {progress['step']}; continue with --resume")
                    return EXIT_SIGTERM

            # end of epoch: evaluate, keep the best checkpoint, save the training state
            train_loss = progress["epoch_loss"] / max(progress["epoch_steps"], 1)
            progress.update(epoch=epoch + 1, batch=0, epoch_loss=0.0, epoch_steps=0)
            if (epoch + 1) % cfg.eval_steps == 0 or epoch + 1 == cfg.epochs:
                if rt.is_main:
                    logits, labels = evaluate.predict(model, val_loader, device, scale, offset, autocast)
                    val = evaluate.metrics(logits, labels)
                    history.append({
                        "epoch": epoch + 1, "step": progress["step"], "train_loss": train_loss,
                        "lr": scheduler.get_last_lr()[0], "val": val,
                        "images_per_s": epoch_images * rt.world_size / (time.perf_counter() - epoch_start),
                    })  # fmt: skip
                    improved = evaluate.is_better(cfg.metric, val[cfg.metric], best["value"])
                    if improved:
                        best.update(value=val[cfg.metric], epoch=epoch + 1)
                        checkpoint.write_dir_atomically(
                            run_dir / CHECKPOINT_DIR, lambda tmp: model_lib.save_checkpoint(model, processor, tmp)
                        )
                    bar.write(
                        f"epoch {epoch + 1}: train loss {train_loss:.4f} | val top-1 {val['top1']:.4f} "
                        f"top-5 {val['top5']:.4f} macro-F1 {val['macro_f1']:.4f} ECE {val['ece']:.4f}"
                        + (" (best, saved)" if improved else "")
                    )
                    write_metrics()
                rt.barrier()
            save_training_state()
        bar.close()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    # --- after training (rank 0): calibrate the best checkpoint, test, report -----------------------------------
    if rt.is_main:
        finish(run_dir, classes, val_loader, test_loader, device, scale, offset, autocast, history, best, log)
    rt.barrier()
    return 0


def finish(run_dir: Path, classes, val_loader, test_loader, device, scale, offset, autocast, history, best, log) -> None:
    """Reload the saved best checkpoint (proving it loads standalone), fit the temperature on validation, evaluate
    the test set, write metrics.json and report/."""
    from transformers import ViTForImageClassification

    ckpt = run_dir / CHECKPOINT_DIR
    model = ViTForImageClassification.from_pretrained(ckpt, use_safetensors=True).to(device)
    logits, labels = evaluate.predict(model, val_loader, device, scale, offset, autocast)
    cal = calibration.calibrate(logits, labels, source="validation")
    calibration.write(ckpt, cal)
    final = {"best_epoch": best["epoch"], "val": evaluate.metrics(logits, labels), "calibration": cal}
    print(
        f"best epoch {best['epoch']}: val top-1 {final['val']['top1']:.4f}; calibration: {cal['decision']} "
        f"(ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f})"
    )
    if cal["warning"]:
        print(f"warning: {cal['warning']}", file=sys.stderr)

    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    report.training_curves(log, history, out / "training_curves.png")
    report.confusion_matrix(evaluate.confusion(logits, labels), classes, out / "confusion_matrix.png", "validation")
    report.reliability_diagram(logits, labels, cal["temperature"], out / "reliability_diagram.png")
    report.per_class_files(evaluate.per_class(logits, labels, classes), out / "per_class")

    test = None
    if test_loader is not None:
        t_logits, t_labels = evaluate.predict(model, test_loader, device, scale, offset, autocast)
        test = evaluate.metrics(t_logits, t_labels)
        test["ece_calibrated"] = calibration.ece(t_logits, t_labels, cal["temperature"])
        test["nll_calibrated"] = calibration.nll(t_logits, t_labels, cal["temperature"])
        t_confusion = evaluate.confusion(t_logits, t_labels)
        report.confusion_matrix(t_confusion, classes, out / "test_confusion_matrix.png", "test")
        report.per_class_files(evaluate.per_class(t_logits, t_labels, classes), out / "test_per_class")
        print(
            f"test: top-1 {test['top1']:.4f} top-5 {test['top5']:.4f} macro-F1 {test['macro_f1']:.4f} "
            f"({test['num_samples']} images)"
        )
    attention_report(model, val_loader, scale, offset, classes, out)
    checkpoint.write_json_atomically(
        run_dir / "metrics.json", {"history": history, "best": best, "final": final, "test": test, "train_log": log}
    )
    print(f"checkpoint: {ckpt}  report: {out}")


def attention_report(model, val_loader, scale, offset, classes: list[str], out: Path) -> None:
    """report/attention.json, attention_entropy.png, attention_rollout.png (finetune.attention) over up to
    DIAGNOSTIC_IMAGES validation images spread evenly over the (class-sorted) validation set."""
    from finetune import attention

    dataset = val_loader.dataset
    n = min(len(dataset), attention.DIAGNOSTIC_IMAGES)
    picks = [round(i * (len(dataset) - 1) / max(n - 1, 1)) for i in range(n)]
    loader = DataLoader(torch.utils.data.Subset(dataset, picks), val_loader.batch_size)
    every = max(1, n // attention.ROLLOUT_IMAGES)
    diagnostics = attention.diagnose(model, (images for images, _ in loader), scale, offset, n, every=every)
    attention.write_report(diagnostics, out, classes, [dataset.samples[i][0] for i in picks])
    flagged = attention.describe_flagged(diagnostics.summary)
    print(f"attention ({n} validation images, report/attention.json):\n{flagged}")


def auto_batch(cfg: TrainConfig, model, effective: int, image_size: int, device, autocast, rt) -> tuple[int, int]:
    """--auto-batch: (micro-batch, accumulation steps) keeping `effective` images per step. On CUDA the memory
    estimate (`vitserve plan`) picks the first micro-batch to try, and a trial forward/backward confirms it."""
    shape = plan.shape_from_hf(model.config.to_dict())  # as trained: image size and head already set
    if device.type != "cuda":
        need = plan.training_memory(shape, plan.setup_from_config(cfg, device="cpu")).total
        rt.info(f"--auto-batch: nothing to search on {device.type}; keeping batch size {cfg.batch_size} (estimated "
                f"peak {plan.human_bytes(need)})")  # fmt: skip
        return cfg.batch_size, cfg.gradient_accumulation_steps
    free, _ = torch.cuda.mem_get_info(device)  # what other processes leave us, plus what we already hold
    budget = free + torch.cuda.memory_reserved(device) + plan.CUDA_CONTEXT_BYTES
    setup = plan.setup_from_config(cfg, batch=effective)
    estimate = plan.largest_batch(shape, dataclasses.replace(setup, accumulation=1), budget)
    if estimate < effective:  # accumulating micro-batches also holds the gradients through backward
        estimate = plan.largest_batch(shape, dataclasses.replace(setup, accumulation=2), budget)
    start = max(1, min(effective, estimate))
    micro = rt.min(find_micro_batch(model, start, image_size, device, autocast, cfg.optimizer))
    accum = math.ceil(effective / micro)
    rt.info(
        f"--auto-batch: the memory estimate (vitserve plan) allows a micro-batch of {estimate} in "
        f"{budget / plan.GiB:.1f} GiB; a trial step fits {micro}: {micro} x {accum} accumulation steps = "
        f"{micro * accum} per step"
    )
    return micro, accum


def out_of_memory_message(cfg: TrainConfig, device: torch.device) -> str:
    """The remedies for a CUDA out-of-memory error, each with `vitserve plan`'s estimate when the base can be sized
    without the network."""
    message = (
        f"CUDA out of memory (batch size {cfg.batch_size}, image size {cfg.image_size or 'base'}). Remedies: a "
        "smaller --batch-size with --gradient-accumulation-steps to keep the effective batch (or --auto-batch), "
        "--gradient-checkpointing, a lower --image-size, --precision bf16, or fewer trainable weights "
        "(--lora, --freeze). The last training state, if any, is in the run folder: add --resume."
    )
    try:
        shape, _ = plan.resolve_shape(cfg.base)
        shape = dataclasses.replace(shape, image_size=cfg.image_size or shape.image_size)
        budget = torch.cuda.get_device_properties(device).total_memory
    except (ValueError, OSError, RuntimeError, AssertionError):  # an unknown hub id, or no CUDA device to ask
        return message
    estimates = "\n".join(plan.fit_lines(shape, plan.setup_from_config(cfg), budget))
    return f"{message}\nvitserve plan's estimates for this GPU ({budget / plan.GiB:.1f} GiB):\n{estimates}"


def find_micro_batch(model, effective: int, image_size: int, device, autocast, optimizer_name: str) -> int:
    """Largest micro-batch (effective, effective/2, ...) whose forward/backward fits in CUDA memory next to the
    optimizer's state (accumulation then makes up the rest of the effective batch). `effective` is where the trial
    starts: the memory estimate's largest batch when that is smaller."""
    moments = {"adamw": 2, "lamb": 2, "sgd": 1, "lars": 1, "adafactor": 0}[optimizer_name]
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = effective
    with torch.random.fork_rng(devices=[device]):  # the trial draws dropout masks: leave the RNG as it was
        while batch >= 1:
            try:
                reserve = [torch.empty_like(p) for p in trainable for _ in range(moments)]  # stand-in optimizer state
                x = torch.zeros(batch, 3, image_size, image_size, device=device)
                with autocast():
                    out = model(pixel_values=x).logits
                out.float().logsumexp(-1).mean().backward()
                torch.cuda.synchronize(device)
                del reserve, x, out
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                return batch
            except torch.cuda.OutOfMemoryError:
                reserve = x = out = None
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                batch //= 2
    raise torch.cuda.OutOfMemoryError("even a micro-batch of 1 does not fit")
