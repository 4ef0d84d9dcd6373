"""The one narrow contract every engine meets: load (the constructor), warmup, max batch, run, describe.

The batcher and the parity check talk only to this. Inputs are always float32 NCHW and outputs float32
logits, whatever the engine computes in inside: precision is the engine's business, not its callers'.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import numpy as np

from service.artifact import EngineFile


class Engine(ABC):
    #: stable identifier used in logs and as the ``engine`` metric label, e.g. "onnxruntime-cpu-int8-static"
    name: str
    #: largest batch the engine accepts; the batcher's limit is capped by this, never the reverse
    max_batch_size: int
    #: batch sizes the engine is fastest at or requires (fixed-shape engines); the batcher pads up to these
    batch_buckets: tuple[int, ...] = ()
    #: (H, W) of the input tensor
    input_size: tuple[int, int]
    #: "cpu" or "cuda": where the engine computes
    device: str
    #: e.g. "onnxruntime-1.32.0"
    runtime: str

    def __init__(self, entry: EngineFile, input_size: tuple[int, int], *, name: str, device: str, runtime: str):
        self.entry = entry
        self.input_size = input_size
        self.max_batch_size = entry.max_batch
        self.name = name
        self.device = device
        self.runtime = runtime

    @abstractmethod
    def run(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 → (B, num_labels) float32 logits. Called from one thread at a time."""

    def warmup(self, batch_sizes: Iterable[int]) -> None:
        """Run every batch size once so lazy allocation / autotuning happens before readiness."""
        for b in batch_sizes:
            self.run(np.zeros((b, 3, *self.input_size), dtype=np.float32))

    def describe(self) -> dict[str, str]:
        """Facts for logs, /info and the engine-info metric: engine, runtime, device, precision, file."""
        return {
            "engine": self.name,
            "runtime": self.runtime,
            "device": self.device,
            "precision": self.entry.precision,
            "file": self.entry.file,
        }
