"""The training run behind `vitserve finetune`, top to bottom (`_run` calls these stages in this order):

    open_run_folder -> prepare_data (scan, split) -> build_model (resolution, drop path, freeze / LoRA)
    -> make_loaders -> build_stepper (optimizer + schedule) -> [restore] -> train: epochs of train_epoch
    (steps, save_training_state), validate (best checkpoint) -> finish: calibrate, test, report (+ attention)

Smallest real run (3,000 Fashion-MNIST images, a 0.35M-parameter ViT from scratch; measured on the shared 2-core
dev machine: 2.4 min, 68 % test top-1):

    python -m demo.fashion_mnist --out /tmp/fm --per-class-train 300 --per-class-test 100
    python -m demo.tiny_base --out /tmp/tiny --image-size 28 --patch-size 7 --hidden 96 --layers 3 --heads 3
    python -m finetune --train-dir /tmp/fm/train --test-dir /tmp/fm/test --base /tmp/tiny --output /tmp/run \
        --epochs 5 --batch-size 32 --lr 1e-3 --num-workers 0

The full demo (60,000 images, ~88-89 %, ~11 min on 2 cores) is in docs/finetune.md, "The demo model".

RUN_DIR afterwards: checkpoint/ (HF folder + vitserve_calibration.json), train_state/ (for --resume), split.json,
args.json, metrics.json, report/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from finetune import calibration, data, evaluate, optim, plan, report, runtime, train_state
from finetune import model as model_lib
from finetune.augment import BatchAugment
from finetune.config import RESUME_SAFE, TrainConfig, UsageError, to_dict
from finetune.storage import Folder

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


# --- what the stages hand each other ---------------------------------------------------------------------------


@dataclass
class Splits:
    """The images of each split (prepare_data)."""

    classes: list[str]
    train_root: Folder
    train_samples: list[tuple[str, int]]
    val_root: Folder
    val_samples: list[tuple[str, int]]
    test_scan: data.Scan | None = None  # scanned after split.json is written


@dataclass
class Model:
    """The model being fine-tuned and how its inputs are prepared (build_model)."""

    net: torch.nn.Module
    processor: Any
    image_size: int
    spec: data.Preprocessing  # what export will write into the serving manifest
    scale: torch.Tensor  # normalization on the device: pixels * scale + offset
    offset: torch.Tensor
    autocast: Callable[[], contextlib.AbstractContextManager]  # --precision
    trainable: int  # parameter counts
    total: int


@dataclass
class Loaders:
    """The data loaders at the batch size that fits (make_loaders)."""

    train: DataLoader
    sampler: ResumableSampler
    val: DataLoader
    test: DataLoader | None
    micro: int  # images per forward/backward, per process
    accum: int  # micro-batches per optimizer step
    steps_per_epoch: int  # counted once: len(train) shrinks while the sampler starts mid-epoch
    total_steps: int


@dataclass
class Stepper:
    """What one optimizer step uses (build_stepper)."""

    train_model: torch.nn.Module  # Model.net, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    warmup_steps: int
    sam: optim.SAM | None
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling
    augment: BatchAugment
    trainable_params: list[torch.nn.Parameter]


@dataclass
class RunState:
    """Where the run is and what it has measured. Saved with the training state under these field names and
    restored by --resume."""

    progress: dict  # step, epoch, batch (micro-batches into the epoch), epoch_loss, epoch_steps, since_log
    best: dict  # metric, value and epoch of the best checkpoint
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    log: list[dict] = field(default_factory=list)  # train loss / lr every log_every_steps

    @classmethod
    def fresh(cls, metric: str) -> RunState:
        progress = {"step": 0, "epoch": 0, "batch": 0, "epoch_loss": 0.0, "epoch_steps": 0, "since_log": []}
        return cls(progress, {"metric": metric, "value": None, "epoch": None})

    def record_step(self, loss: float, micro_batches: int, lr: float, log_every: int) -> None:
        """One optimizer step done; every `log_every` steps the train log gets the mean loss since its last entry."""
        p = self.progress
        p["step"] += 1
        p["batch"] += micro_batches
        p["epoch_loss"] += loss
        p["epoch_steps"] += 1
        p["since_log"].append(loss)
        if p["step"] % log_every == 0:
            self.log.append({"step": p["step"], "loss": sum(p["since_log"]) / len(p["since_log"]), "lr": lr})
            p["since_log"].clear()

    def end_epoch(self, epoch: int) -> float:
        """Move to the start of the next epoch; returns the mean train loss of `epoch`."""
        p = self.progress
        train_loss = p["epoch_loss"] / max(p["epoch_steps"], 1)
        p.update(epoch=epoch + 1, batch=0, epoch_loss=0.0, epoch_steps=0)
        return train_loss


class Throughput(NamedTuple):
    images: int  # trained on by this rank this epoch
    seconds: float  # the epoch's training steps only: validation and saving the state are not training throughput

    def per_second(self, world_size: int) -> float:
        return self.images * world_size / max(self.seconds, 1e-9)


# --- the run ------------------------------------------------------------------------------------------------------


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
    autocast = autocast_for(cfg.precision, rt.device)
    saved = open_run_folder(cfg, rt)
    splits = prepare_data(cfg, rt, resuming=saved is not None)
    m = build_model(cfg, rt, splits.classes, autocast)
    loaders = make_loaders(cfg, rt, splits, m)
    stepper = build_stepper(cfg, rt, m, loaders.total_steps, len(splits.classes))
    runtime.seed_everything(cfg.seed + rt.rank)  # augmentation and dropout differ across ranks
    state = RunState.fresh(cfg.metric) if saved is None else restore(rt, saved, m, stepper, loaders.total_steps)
    write_args(cfg, rt, splits, m, loaders, stepper)
    if train(cfg, rt, m, loaders, stepper, state) == EXIT_SIGTERM:
        return EXIT_SIGTERM
    if rt.is_main:  # only rank 0 calibrates, tests and reports; the others wait
        finish(Path(cfg.output), rt.device, splits.classes, m, loaders, state)
    rt.barrier()
    return 0


# --- before training ------------------------------------------------------------------------------------------------


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


# --- training -------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, rt: runtime.Runtime, m: Model, loaders: Loaders, stepper: Stepper, state: RunState) -> int:
    """The epochs from where `state` is: train, validate every --eval-steps epochs (and after the last), save the
    training state at each epoch end. Returns 0, or EXIT_SIGTERM once a SIGTERM made it save and stop."""
    with sigterm_flag() as stop:
        bar = tqdm(
            total=loaders.total_steps, initial=state.progress["step"], unit="step", dynamic_ncols=True,
            mininterval=1.0, disable=not rt.is_main,
        )  # fmt: skip
        for epoch in range(state.progress["epoch"], cfg.epochs):
            throughput = train_epoch(cfg, rt, epoch, m, loaders, stepper, state, bar, stop)
            if throughput is None:
                bar.close()
                rt.info(f"SIGTERM: saved the training state at step {state.progress['step']}; continue with --resume")
                return EXIT_SIGTERM
            train_loss = state.end_epoch(epoch)
            if (epoch + 1) % cfg.eval_steps == 0 or epoch + 1 == cfg.epochs:
                lr = stepper.scheduler.get_last_lr()[0]
                entry = {"epoch": epoch + 1, "step": state.progress["step"], "train_loss": train_loss, "lr": lr}
                validate(cfg, rt, m, loaders.val, state, entry, throughput, bar)
            save_training_state(cfg, rt, m, stepper, state)
        bar.close()
    return 0


@contextlib.contextmanager
def sigterm_flag():
    """While inside, SIGTERM only sets flag["requested"]: the run finishes its step, saves and exits."""
    flag = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: flag.update(requested=True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def train_epoch(
    cfg: TrainConfig, rt: runtime.Runtime, epoch: int, m: Model, loaders: Loaders, stepper: Stepper,
    state: RunState, bar: tqdm, stop: dict,
) -> Throughput | None:
    """Optimizer steps over what is left of `epoch` (all of it unless resumed mid-epoch), saving the training state
    every --save-every-steps. Returns the epoch's Throughput, or None once a SIGTERM made it save and stop."""
    loaders.sampler.set_epoch(epoch, start=state.progress["batch"] * loaders.micro)
    batches = iter(loaders.train)
    bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
    started, images, saving, window = time.perf_counter(), 0, 0.0, (time.perf_counter(), 0)
    while group := list(itertools.islice(batches, loaders.accum)):
        loss = train_step(cfg, rt, m, stepper, group)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {state.progress['step'] + 1}: lower --learning-rate, keep "
                "--max-grad-norm on, or use --precision bf16/fp32"
            )
        n = sum(len(labels) for _, labels in group)
        images += n
        lr = stepper.scheduler.get_last_lr()[0]
        state.record_step(loss, len(group), lr, cfg.log_every_steps)
        window = show_progress(bar, rt, loss, lr, n, window)
        stopping = rt.any(stop["requested"])
        if stopping or (cfg.save_every_steps and state.progress["step"] % cfg.save_every_steps == 0):
            t = time.perf_counter()
            save_training_state(cfg, rt, m, stepper, state)
            saving += time.perf_counter() - t
        if stopping:
            return None
    return Throughput(images, time.perf_counter() - started - saving)


def train_step(cfg: TrainConfig, rt: runtime.Runtime, m: Model, stepper: Stepper, micro_batches: list) -> float:
    """One optimizer step over `micro_batches` (augmented on the device); returns its loss."""
    optimizer, scaler = stepper.optimizer, stepper.scaler
    inputs = [
        stepper.augment(images.to(rt.device, non_blocking=True), labels.to(rt.device))
        for images, labels in micro_batches
    ]
    loss = loss_and_backward(cfg, rt, stepper, m.autocast, inputs)
    if stepper.sam is not None:  # second pass at the worst-case nearby weights; the step uses that gradient
        stepper.sam.perturb()
        optimizer.zero_grad(set_to_none=True)
        loss_and_backward(cfg, rt, stepper, m.autocast, inputs)
        stepper.sam.restore()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(stepper.trainable_params, cfg.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    stepper.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def loss_and_backward(cfg: TrainConfig, rt: runtime.Runtime, stepper: Stepper, autocast, inputs: list) -> float:
    """Forward/backward over the micro-batches of one step; gradients = mean over all their images."""
    model, scaler = stepper.train_model, stepper.scaler
    n_images, total_loss = sum(len(x) for x, _ in inputs), 0.0
    for i, (x, target) in enumerate(inputs):
        last = i == len(inputs) - 1
        sync = contextlib.nullcontext() if last or not rt.distributed else model.no_sync()
        with sync:
            with autocast():
                logits = model(pixel_values=x).logits  # (B, C)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
            loss = loss * (len(x) / n_images)  # each image weighs the same, whatever its micro-batch
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total_loss += loss.item()
    return total_loss


def show_progress(bar, rt: runtime.Runtime, loss: float, lr: float, n: int, window: tuple) -> tuple[float, int]:
    """Advance the bar; img/s is measured over windows of ~2 s (start time, images so far), returns the next one."""
    t0, n0 = window
    elapsed = time.perf_counter() - t0
    images_per_s = (n0 + n) * rt.world_size / max(elapsed, 1e-9)
    postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "img/s": f"{images_per_s:.0f}"}
    if (gb := runtime.memory_gb(rt.device)) is not None:
        postfix["gpu_mem"] = f"{gb:.1f}GB"
    bar.set_postfix(postfix, refresh=False)
    bar.update()
    return (time.perf_counter(), 0) if elapsed > 2 else (t0, n0 + n)


def validate(
    cfg: TrainConfig, rt: runtime.Runtime, m: Model, val_loader: DataLoader, state: RunState, entry: dict,
    throughput: Throughput, bar: tqdm,
) -> None:
    """Rank 0 evaluates on validation, adds `entry` to the history, saves the checkpoint when it is the best so
    far and rewrites metrics.json; the other ranks wait."""
    if rt.is_main:
        logits, labels = evaluate.predict(m.net, val_loader, rt.device, m.scale, m.offset, m.autocast)
        val = evaluate.metrics(logits, labels)
        state.history.append({**entry, "val": val, "images_per_s": throughput.per_second(rt.world_size)})
        improved = evaluate.is_better(cfg.metric, val[cfg.metric], state.best["value"])
        if improved:
            state.best.update(value=val[cfg.metric], epoch=entry["epoch"])
            save_best_checkpoint(cfg, m)
        bar.write(
            f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f} | val top-1 {val['top1']:.4f} "
            f"top-5 {val['top5']:.4f} macro-F1 {val['macro_f1']:.4f} ECE {val['ece']:.4f}"
            + (" (best, saved)" if improved else "")
        )
        write_metrics(Path(cfg.output), state)
    rt.barrier()


# --- saving ---------------------------------------------------------------------------------------------------------


def save_best_checkpoint(cfg: TrainConfig, m: Model) -> None:
    train_state.write_dir_atomically(
        Path(cfg.output) / CHECKPOINT_DIR, lambda tmp: model_lib.save_checkpoint(m.net, m.processor, tmp)
    )


def save_training_state(cfg: TrainConfig, rt: runtime.Runtime, m: Model, stepper: Stepper, state: RunState) -> None:
    """RUN_DIR/train_state/, everything --resume needs to continue bit for bit (rank 0 writes, all ranks wait)."""
    if rt.is_main:
        rng_tensors, rng_values = runtime.rng_state()
        train_state.save_state(Path(cfg.output), {
            "model": m.net.state_dict(),
            "optimizer": stepper.optimizer.state_dict(),
            "scheduler": stepper.scheduler.state_dict(),
            "scaler": stepper.scaler.state_dict() if stepper.scaler is not None else None,
            "rng": {"tensors": rng_tensors, "values": rng_values},
            **dataclasses.asdict(state),  # progress, best, history, log
            "config": to_dict(cfg),
        })  # fmt: skip
    rt.barrier()


def write_metrics(run_dir: Path, state: RunState, final: dict | None = None, test: dict | None = None) -> None:
    """RUN_DIR/metrics.json. `final` (the best checkpoint on validation, its calibration) and `test` are null
    until finish() writes the file for the last time."""
    out = {"history": state.history, "best": state.best, "final": final, "test": test, "train_log": state.log}
    train_state.write_json_atomically(run_dir / "metrics.json", out)


# --- after training (rank 0) ----------------------------------------------------------------------------------------


def finish(run_dir: Path, device, classes: list[str], m: Model, loaders: Loaders, state: RunState) -> None:
    """Reload the saved best checkpoint (proving it loads standalone), calibrate it on validation, evaluate the
    test set, write report/ and the final metrics.json."""
    from transformers import ViTForImageClassification

    ckpt = run_dir / CHECKPOINT_DIR
    best = ViTForImageClassification.from_pretrained(ckpt, use_safetensors=True).to(device)
    logits, labels = evaluate.predict(best, loaders.val, device, m.scale, m.offset, m.autocast)
    final = calibrate(ckpt, logits, labels, state.best["epoch"])
    temperature = final["calibration"]["temperature"]

    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    report.training_curves(state.log, state.history, out / "training_curves.png")
    report.confusion_matrix(torch.tensor(final["val"]["confusion"]), classes, out / "confusion_matrix.png", "validation")
    report.reliability_diagram(logits, labels, temperature, out / "reliability_diagram.png")
    report.per_class_files(evaluate.per_class(logits, labels, classes), out / "per_class")
    test = None
    if loaders.test is not None:
        t_logits, t_labels = evaluate.predict(best, loaders.test, device, m.scale, m.offset, m.autocast)
        test = evaluate_test(t_logits, t_labels, classes, temperature, out)
    attention_report(best, loaders.val, m.scale, m.offset, classes, out)
    write_metrics(run_dir, state, final, test)
    page = report.html_report(out, {"final": final, "test": test, "history": state.history}, f"Fine-tune report: {run_dir.name}")
    print(f"checkpoint: {ckpt}  report: {page}")


def calibrate(ckpt: Path, logits: torch.Tensor, labels: torch.Tensor, best_epoch: int) -> dict:
    """Fit the softmax temperature on the best checkpoint's validation logits and write it into the checkpoint;
    returns metrics.json's "final"."""
    cal = calibration.calibrate(logits, labels, source="validation")
    calibration.write(ckpt, cal)
    val = {**evaluate.metrics(logits, labels), "confusion": evaluate.confusion(logits, labels).tolist()}
    final = {"best_epoch": best_epoch, "val": val, "calibration": cal}
    print(
        f"best epoch {best_epoch}: val top-1 {final['val']['top1']:.4f}; calibration: {cal['decision']} "
        f"(ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f})"
    )
    if cal["warning"]:
        print(f"warning: {cal['warning']}", file=sys.stderr)
    return final


def evaluate_test(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], temperature: float, out: Path):
    """The test set's metrics (ECE and NLL also at the fitted temperature), confusion matrix and per-class files."""
    test = evaluate.metrics(logits, labels)
    test["ece_calibrated"] = calibration.ece(logits, labels, temperature)
    test["nll_calibrated"] = calibration.nll(logits, labels, temperature)
    confusion = evaluate.confusion(logits, labels)
    test["confusion"] = confusion.tolist()  # counts, for the artifact's model card (export reads metrics.json)
    report.confusion_matrix(confusion, classes, out / "test_confusion_matrix.png", "test")
    report.per_class_files(evaluate.per_class(logits, labels, classes), out / "test_per_class")
    print(
        f"test: top-1 {test['top1']:.4f} top-5 {test['top5']:.4f} macro-F1 {test['macro_f1']:.4f} "
        f"({test['num_samples']} images)"
    )
    return test


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
