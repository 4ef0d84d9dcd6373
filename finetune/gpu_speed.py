"""GPUs by their datasheets, and how fast a ViT trains and serves on one: FLOPs over a stated fraction of the peak, or
eager PyTorch's per-kernel launch cost for small batches, whichever is slower. Nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.estimates import Setup, frozen_layers
from finetune.shapes import VitShape, vit_flops


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    tflops_16bit: float  # dense bf16/fp16 tensor-core peak (no 2:4 sparsity)
    tflops_fp32: float  # plain FP32 (torch does not use TF32 for matmuls by default)
    bf16: bool = True


# Peak figures from NVIDIA's datasheets; the "with sparsity" figures are twice these.
GPUS = {
    "h100": Gpu("H100 SXM 80GB", 80, 989.4, 66.9),  # H100 Tensor Core GPU datasheet (SXM5)
    "h100-pcie": Gpu("H100 PCIe 80GB", 80, 756.0, 51.2),  # same datasheet, PCIe column
    "h200": Gpu("H200 SXM 141GB", 141, 989.4, 66.9),  # H200 datasheet (H100 SXM's compute, more memory)
    "a100": Gpu("A100 SXM 80GB", 80, 312.0, 19.5),  # A100 Tensor Core GPU datasheet
    "a100-40gb": Gpu("A100 40GB", 40, 312.0, 19.5),  # same datasheet
    "l40s": Gpu("L40S 48GB", 48, 362.1, 91.6),  # L40S datasheet
    "a10": Gpu("A10 24GB", 24, 125.0, 31.2),  # A10 datasheet
    "l4": Gpu("L4 24GB", 24, 121.0, 30.3),  # L4 datasheet (242 TFLOP/s with sparsity)
    "t4": Gpu("T4 16GB", 16, 65.0, 8.1, bf16=False),  # T4 datasheet (mixed-precision FP16/FP32); Turing has no bf16
    "v100": Gpu("V100 SXM2 32GB", 32, 125.0, 15.7, bf16=False),  # V100 datasheet
}


DEFAULT_GPUS = ("t4", "l4", "a100", "h100")


# Assumptions, not measurements (the project's machines have no GPU): a compute-bound training step of HF's ViT in
# eager PyTorch reaches ~40 % of the dense peak with SDPA (eager attention ~30 %); an FP16 TensorRT / ONNX Runtime
# engine at a large batch ~50 %. Eager PyTorch also pays ~10 µs per kernel (launch plus Python dispatch), ~48 kernels
# per block per step (16 forward, 32 backward), so small batches are launch-bound, not FLOP-bound.
TRAIN_EFFICIENCY = {"sdpa": 0.40, "eager": 0.30}


SERVE_EFFICIENCY = 0.50


KERNEL_SECONDS = 10e-6


KERNELS_PER_BLOCK_STEP = 48


def train_flops_per_image(s: VitShape, setup: Setup) -> float:
    """Forward + backward (+ recomputation with checkpointing). Backward is twice a matmul's forward when its weight
    trains (input and weight gradients), once when frozen (input gradient only); blocks before the first trainable
    one run forward only."""
    f = vit_flops(s)
    weights, attention = f["layer_weight_matmuls"], f["layer_attention_matmuls"]
    frozen = frozen_layers(s, setup)
    weight_backward = weights if setup.lora_r else 2 * weights
    per_block_backward = weight_backward + 2 * attention + (weights + attention if setup.checkpointing else 0)
    embeddings_backward = f["patch_embed"] if setup.frozen == "none" and not setup.lora_r else 0.0
    return f["total"] + (s.layers - frozen) * per_block_backward + embeddings_backward + 2 * f["head"]


def training_images_per_s(s: VitShape, setup: Setup, gpu: Gpu) -> float:
    peak = (gpu.tflops_16bit if setup.autocast else gpu.tflops_fp32) * 1e12
    compute = setup.batch * train_flops_per_image(s, setup) / (TRAIN_EFFICIENCY[setup.attention] * peak)
    launches = KERNELS_PER_BLOCK_STEP * s.layers * KERNEL_SECONDS
    return setup.batch / max(compute, launches)


def serving_images_per_s(s: VitShape, gpu: Gpu, precision: str = "fp16") -> float:
    peak = (gpu.tflops_fp32 if precision == "fp32" else gpu.tflops_16bit) * 1e12
    return SERVE_EFFICIENCY * peak / vit_flops(s)["total"]


