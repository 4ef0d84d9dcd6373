"""Before training: the run folder, the data and its split, the model, the loaders at a batch size that fits, the
optimizer and schedule, and what a resumed run restores (finetune/train.py calls these in this order)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from finetune import data, estimates, optim, runtime, shapes, train_state
from finetune import model as model_lib
from finetune.augment import BatchAugment
from finetune.config import RESUME_SAFE, TrainConfig, UsageError, to_dict
from finetune.stages import CHECKPOINT_DIR, Loaders, Model, ResumableSampler, RunState, Splits, Stepper


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """--precision as a context for forward passes; refuses what the device cannot do."""
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU (CPUs have no fast fp16); on CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bf16 support (pre-Ampere): use --precision fp16 or fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return functools.partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext


def open_run_folder(cfg: TrainConfig, rt: runtime.Runtime) -> dict | None:
    """Check RUN_DIR against --resume and create it; returns the training state to resume from, if any."""
    run_dir = Path(cfg.output)
    saved = None
    if cfg.resume:
        saved = train_state.load_state(run_dir)
        if saved is None:
            raise UsageError(f"--resume: {run_dir} has no training state ({train_state.STATE_DIR}/)")
        changed = {
            k: (saved["config"].get(k), v)
            for k, v in to_dict(cfg).items()
            if k not in RESUME_SAFE and saved["config"].get(k) != v
        }
        if changed:
            rt.warn(f"--resume with options that differ from the interrupted run (was, now): {changed}")
    elif (run_dir / train_state.STATE_DIR).exists() or (run_dir / CHECKPOINT_DIR).exists():
        raise UsageError(f"{run_dir} already holds a run: add --resume to continue it, or choose another --output")
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        train_state.recover(run_dir / CHECKPOINT_DIR)
    return saved


def prepare_data(cfg: TrainConfig, rt: runtime.Runtime, resuming: bool) -> Splits:
    """Scan the folders, hold out validation unless --val-dir, describe the data, write split.json."""
    threads = max(1, cfg.num_workers)
    train_scan = data.scan_folder(cfg.train_dir, threads=threads)
    classes = train_scan.classes
    if cfg.val_dir:
        val_scan = data.scan_folder(cfg.val_dir, classes, threads=threads)
        warn_unreadable(rt, val_scan)
        train_samples, val_samples = train_scan.samples, val_scan.samples
        val_root, val_sha = val_scan.root, val_scan.sha256
    else:
        train_samples, val_samples = data.stratified_split(train_scan.samples, cfg.val_split, cfg.seed)
        val_root, val_sha = train_scan.root, {rel: train_scan.sha256[rel] for rel, _ in val_samples}
    if not val_samples:
        raise UsageError("the validation set is empty")
    rt.info(f"classes ({len(classes)}): {', '.join(classes)}")
    data.describe(train_scan, train_samples, val_samples, val_sha, rt.info, rt.warn, base=cfg.base)
    splits = Splits(classes, train_scan.root, train_samples, val_root, val_samples)
    write_split(cfg, rt, splits, resuming)
    if cfg.test_dir:
        splits.test_scan = data.scan_folder(cfg.test_dir, classes, threads=threads)
        warn_unreadable(rt, splits.test_scan)
    return splits


def warn_unreadable(rt: runtime.Runtime, scan: data.Scan) -> None:
    for rel, reason in scan.corrupt:
        rt.warn(f"skipping unreadable file {scan.root}/{rel} ({reason})")


def write_split(cfg: TrainConfig, rt: runtime.Runtime, splits: Splits, resuming: bool) -> None:
    """RUN_DIR/split.json, the files of each side; a resumed run must see the files it started with."""
    run_dir = Path(cfg.output)
    split = {
        "classes": splits.classes,
        "train_dir": str(splits.train_root),
        "val_dir": str(splits.val_root),
        "seed": cfg.seed,
        "val_split": None if cfg.val_dir else cfg.val_split,
        "train": [[rel, label] for rel, label in splits.train_samples],
        "val": [[rel, label] for rel, label in splits.val_samples],
    }
    if resuming and (run_dir / "split.json").exists():
        with open(run_dir / "split.json") as f:
            saved = json.load(f)
            if any(saved[k] != split[k] for k in ("classes", "train", "val")):
                raise UsageError("--resume: the training or validation files changed since the run started")
    if rt.is_main:
        train_state.write_json_atomically(run_dir / "split.json", split)


def build_model(cfg: TrainConfig, rt: runtime.Runtime, classes: list[str], autocast) -> Model:
    """The base with a new head for `classes`, at --image-size, with drop path, freezing or LoRA, on the device."""
    runtime.seed_everything(cfg.seed)  # the new head's initialisation
    net = model_lib.load(cfg.base, classes, cfg.dropout, cfg.attention_dropout)
    base_size = net.config.image_size
    image_size = cfg.image_size or (base_size if isinstance(base_size, int) else base_size[0])
    model_lib.set_image_size(net, image_size)
    processor = model_lib.load_processor(cfg.base, image_size)
    spec = data.preprocessing(processor, image_size)
    scale, offset = data.normalization(spec, rt.device)
    if cfg.drop_path:
        model_lib.add_drop_path(net, cfg.drop_path)
    model_lib.freeze(net, cfg.freeze)
    if cfg.gradient_checkpointing:  # renamed "activation checkpointing" in transformers 5
        if hasattr(net, "activation_checkpointing_enable"):
            net.activation_checkpointing_enable({"use_reentrant": False})
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        net = model_lib.add_lora(net, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    net.to(rt.device).train()
    trainable, total = model_lib.count_parameters(net)
    rt.info(
        f"model: {cfg.base} at {image_size}px, {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable, "
        f"new {len(classes)}-class head"
    )
    return Model(net, processor, image_size, spec, scale, offset, autocast, trainable, total)


def make_loaders(cfg: TrainConfig, rt: runtime.Runtime, splits: Splits, m: Model) -> Loaders:
    """Loaders of the three splits at the micro-batch that fits (--auto-batch), and the steps they make."""
    micro, accum = cfg.batch_size, cfg.gradient_accumulation_steps
    if cfg.auto_batch:
        micro, accum = auto_batch(cfg, m.net, micro * accum, m.image_size, rt.device, m.autocast, rt)
    train_set = data.ImageFolderDataset(splits.train_root, splits.train_samples, m.spec)
    sampler = ResumableSampler(train_set, rt.world_size, rt.rank, cfg.seed)
    workers = cfg.num_workers
    loader_kw = dict(num_workers=workers, pin_memory=rt.device.type == "cuda", persistent_workers=workers > 0)
    # A private generator: creating an iterator then draws nothing from the global RNG, which resume restores.
    generator = torch.Generator().manual_seed(cfg.seed)
    train = DataLoader(train_set, micro, sampler=sampler, generator=generator, **loader_kw)
    val = DataLoader(data.ImageFolderDataset(splits.val_root, splits.val_samples, m.spec), micro * 2, **loader_kw)
    test_scan = splits.test_scan
    test = (
        DataLoader(data.ImageFolderDataset(test_scan.root, test_scan.samples, m.spec), micro * 2, **loader_kw)
        if test_scan and test_scan.samples
        else None
    )
    steps_per_epoch = math.ceil(len(train) / accum)
    return Loaders(train, sampler, val, test, micro, accum, steps_per_epoch, cfg.epochs * steps_per_epoch)


def build_stepper(cfg: TrainConfig, rt: runtime.Runtime, m: Model, total_steps: int, num_classes: int) -> Stepper:
    """Optimizer, warmup + cosine schedule, SAM, fp16 loss scaling, batch augmentation, and the DDP wrapper."""
    optimizer = optim.build(cfg.optimizer, optim.param_groups(m.net, cfg.weight_decay), cfg.learning_rate)
    scheduler, warmup_steps = optim.schedule(optimizer, total_steps, cfg.warmup_ratio)
    sam = optim.SAM(m.net.parameters(), cfg.sam_rho) if cfg.sam else None
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    trainable_params = [p for p in m.net.parameters() if p.requires_grad]
    augment = BatchAugment(cfg.augment, m.image_size, m.scale, m.offset, num_classes).to(rt.device)
    train_model = m.net
    if rt.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            m.net, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None
        )
    return Stepper(train_model, optimizer, scheduler, warmup_steps, sam, scaler, augment, trainable_params)


def restore(rt: runtime.Runtime, saved: dict, m: Model, stepper: Stepper, total_steps: int) -> RunState:
    """--resume: weights, optimizer, schedule, loss scale, every RNG and the run's progress as they were saved."""
    m.net.load_state_dict(saved["model"])
    stepper.optimizer.load_state_dict(saved["optimizer"])
    stepper.scheduler.load_state_dict(saved["scheduler"])
    if stepper.scaler is not None and saved["scaler"]:
        stepper.scaler.load_state_dict(saved["scaler"])
    runtime.set_rng_state(saved["rng"]["tensors"], saved["rng"]["values"])
    state = RunState(saved["progress"], saved["best"], saved["history"], saved["log"])
    where = f"epoch {state.progress['epoch'] + 1}, batch {state.progress['batch']}"
    rt.info(f"resumed at step {state.progress['step']}/{total_steps} ({where})")
    return state


def write_args(cfg: TrainConfig, rt: runtime.Runtime, splits: Splits, m: Model, loaders: Loaders, stepper: Stepper):
    """RUN_DIR/args.json: every option, plus the values resolved from them and from the data."""
    import transformers

    resolved = {
        "image_size": m.image_size,
        "micro_batch_size": loaders.micro,
        "gradient_accumulation_steps": loaders.accum,
        "effective_batch_size": loaders.micro * loaders.accum * rt.world_size,
        "world_size": rt.world_size,
        "device": str(rt.device),
        "steps_per_epoch": loaders.steps_per_epoch,
        "total_steps": loaders.total_steps,
        "warmup_steps": stepper.warmup_steps,
        "num_train": len(splits.train_samples),
        "num_val": len(splits.val_samples),
        "num_test": len(splits.test_scan.samples) if splits.test_scan else 0,
        "trainable_parameters": m.trainable,
        "total_parameters": m.total,
        "classes": splits.classes,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if rt.is_main:
        train_state.write_json_atomically(Path(cfg.output) / "args.json", {**to_dict(cfg), "resolved": resolved})


def auto_batch(cfg: TrainConfig, model, effective: int, image_size: int, device, autocast, rt) -> tuple[int, int]:
    """--auto-batch: (micro-batch, accumulation steps) keeping `effective` images per step. On CUDA the memory
    estimate (`vitserve plan`) picks the first micro-batch to try, and a trial forward/backward confirms it."""
    shape = shapes.shape_from_hf(model.config.to_dict())  # as trained: image size and head already set
    if device.type != "cuda":
        need = estimates.training_memory(shape, estimates.setup_from_config(cfg, device="cpu")).total
        rt.info(f"--auto-batch: nothing to search on {device.type}; keeping batch size {cfg.batch_size} (estimated "
                f"peak {estimates.human_bytes(need)})")  # fmt: skip
        return cfg.batch_size, cfg.gradient_accumulation_steps
    free, _ = torch.cuda.mem_get_info(device)  # what other processes leave us, plus what we already hold
    budget = free + torch.cuda.memory_reserved(device) + estimates.CUDA_CONTEXT_BYTES
    setup = estimates.setup_from_config(cfg, batch=effective)
    estimate = estimates.largest_batch(shape, dataclasses.replace(setup, accumulation=1), budget)
    if estimate < effective:  # accumulating micro-batches also holds the gradients through backward
        estimate = estimates.largest_batch(shape, dataclasses.replace(setup, accumulation=2), budget)
    start = max(1, min(effective, estimate))
    micro = rt.min(find_micro_batch(model, start, image_size, device, autocast, cfg.optimizer))
    accum = math.ceil(effective / micro)
    rt.info(
        f"--auto-batch: the memory estimate (vitserve plan) allows a micro-batch of {estimate} in "
        f"{budget / estimates.GiB:.1f} GiB; a trial step fits {micro}: {micro} x {accum} accumulation steps = "
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
        shape, _ = shapes.resolve_shape(cfg.base)
        shape = dataclasses.replace(shape, image_size=cfg.image_size or shape.image_size)
        budget = torch.cuda.get_device_properties(device).total_memory
    except (ValueError, OSError, RuntimeError, AssertionError):  # an unknown hub id, or no CUDA device to ask
        return message
    fits = "\n".join(estimates.fit_lines(shape, estimates.setup_from_config(cfg), budget))
    return f"{message}\nvitserve plan's estimates for this GPU ({budget / estimates.GiB:.1f} GiB):\n{fits}"


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


