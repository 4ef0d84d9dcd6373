"""What the fine-tuning stages hand each other (finetune/prepare.py builds them, finetune/train.py runs with them), and
the sampler that lets a resumed run start mid-epoch."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from finetune import data, optim
from finetune.augment import BatchAugment
from finetune.storage import Folder

CHECKPOINT_DIR = "checkpoint"  # RUN_DIR/checkpoint: the best checkpoint, an HF folder


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
