"""The process a run lives in: device, distributed rank, who may print and write, and every source of randomness.

The same command runs alone or under `torchrun --nproc-per-node N` / `accelerate launch` (both set WORLD_SIZE, RANK
and LOCAL_RANK). Under DDP every process trains on its shard of each epoch; only rank 0 prints, evaluates and writes.
"""

from __future__ import annotations

import datetime
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def info(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        if self.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        if self.is_main:
            print(f"vitserve finetune: error: {message}", file=sys.stderr, flush=True)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def min(self, value: int) -> int:
        """The smallest value over all ranks (e.g. the micro-batch every GPU can fit)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank if any rank says True (e.g. one of them got SIGTERM)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def setup(device: str = "auto") -> Runtime:
    """Pick the device; join the process group when launched by torchrun/accelerate (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        # Rank 0 evaluates alone while the others wait at a barrier: allow an hour instead of the default 10 min.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=1))
        return Runtime(torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"), rank, world_size, local_rank)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from finetune.config import UsageError

        raise UsageError(f"--device {device}: no CUDA GPU is visible to torch")
    return Runtime(torch.device(device))


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> tuple[dict, dict]:
    """All RNG states as (tensors, JSON-able values), for the training-state checkpoint."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    values = {
        "python": [version, list(state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, values


def set_rng_state(tensors: dict, values: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, state, gauss = values["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def memory_gb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated by this process, for the progress bar; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
