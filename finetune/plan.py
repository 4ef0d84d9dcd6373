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
import math
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GiB = 2**30


# --- shapes ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VitShape:
    image_size: int
    patch_size: int
    hidden: int
    layers: int
    heads: int
    mlp: int
    channels: int = 3
    labels: int = 1000

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + [CLS]


MODELS: dict[str, VitShape] = {
    "vit-tiny": VitShape(224, 16, 192, 12, 3, 768),
    "vit-small": VitShape(224, 16, 384, 12, 6, 1536),
    "vit-base": VitShape(224, 16, 768, 12, 12, 3072),
    "vit-large": VitShape(224, 16, 1024, 24, 16, 4096),
    "vit-huge": VitShape(224, 14, 1280, 32, 16, 5120),
}
HUB_IDS = {  # the Google in21k checkpoints `--base` takes for these names
    "vit-base": "google/vit-base-patch16-224-in21k",
    "vit-large": "google/vit-large-patch16-224-in21k",
    "vit-huge": "google/vit-huge-patch14-224-in21k",
}
DEFAULT_BASE = HUB_IDS["vit-large"]  # finetune.config.TrainConfig.base
FAMILY_BY_WIDTH = {192: "ViT-Tiny", 384: "ViT-Small", 768: "ViT-Base", 1024: "ViT-Large", 1280: "ViT-Huge"}


def shape_from_hf(cfg: dict) -> VitShape:
    """An HF ViT config.json (as a dict) → VitShape."""
    size, patch = cfg.get("image_size", 224), cfg.get("patch_size", 16)
    return VitShape(
        image_size=size if isinstance(size, int) else size[0], patch_size=patch if isinstance(patch, int) else patch[0],
        hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
        mlp=cfg["intermediate_size"], channels=cfg.get("num_channels", 3),
        labels=len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2),
    )  # fmt: skip


def resolve_shape(model: str) -> tuple[VitShape, str]:
    """A name in MODELS, one of their hub ids, or a local HF / timm checkpoint folder → (shape, hub id or path)."""
    if model in MODELS:
        return MODELS[model], HUB_IDS.get(model, model)
    for name, hub_id in HUB_IDS.items():
        if model == hub_id:
            return MODELS[name], hub_id
    path = Path(model)
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("model_type") == "vit":
            return shape_from_hf(cfg), model
        from export.checkpoint import is_timm_config, timm_vit_config  # the safetensors header only, no weights

        if is_timm_config(cfg):
            return shape_from_hf(timm_vit_config(path, cfg).to_dict()), model
    known = ", ".join([*MODELS, *HUB_IDS.values()])
    raise ValueError(f"{model!r} is neither a known model ({known}) nor a folder with an HF or timm ViT config.json")


def family(shape: VitShape) -> str:
    return FAMILY_BY_WIDTH.get(shape.hidden, f"a width-{shape.hidden}, {shape.layers}-block ViT")


def parameter_shapes(s: VitShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of transformers' ViTForImageClassification, with its shape (per-layer ones once, '*')."""
    d, m, c, p = s.hidden, s.mlp, s.channels, s.patch_size
    layer = [("q", (d, d)), ("q.bias", (d,)), ("k", (d, d)), ("k.bias", (d,)), ("v", (d, d)), ("v.bias", (d,)),
             ("o", (d, d)), ("o.bias", (d,)), ("ln1", (d,)), ("ln1.bias", (d,)), ("ln2", (d,)), ("ln2.bias", (d,)),
             ("fc1", (m, d)), ("fc1.bias", (m,)), ("fc2", (d, m)), ("fc2.bias", (d,))]  # fmt: skip
    embeddings = [("cls", (1, 1, d)), ("pos", (1, s.tokens, d)), ("patch", (d, c, p, p)), ("patch.bias", (d,))]
    head = [("ln", (d,)), ("ln.bias", (d,)), ("classifier", (s.labels, d)), ("classifier.bias", (s.labels,))]
    return embeddings + [(f"*.{n}", sh) for n, sh in layer] * s.layers + head


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def parameter_count(s: VitShape) -> int:
    return sum(numel(sh) for _, sh in parameter_shapes(s))


# --- FLOPs -------------------------------------------------------------------------------------------------------


def vit_flops(s: VitShape) -> dict[str, float]:
    """Forward FLOPs per image (a multiply-add = 2), matmuls only (softmax, LayerNorm, GELU are O(T·d)): per-layer QKV,
    attention scores and weighted sum, output projection and MLP, times layers, plus patch embedding and head.
    ViT-L/16 at 224 px (197 tokens) ≈ 123.1 GFLOP."""
    patches, t, d, m = s.tokens - 1, s.tokens, s.hidden, s.mlp
    weights = 2 * (t * d * 3 * d + t * d * d + 2 * t * d * m)  # per layer: q, k, v, o, fc1, fc2
    attention = 2 * (t * t * d * 2)  # per layer: Q·Kᵀ and A·V, over all heads
    patch_embed = 2 * patches * (s.channels * s.patch_size**2) * d
    head = 2 * d * s.labels
    encoder = (weights + attention) * s.layers
    return {"encoder": float(encoder), "patch_embed": float(patch_embed), "head": float(head),
            "total": float(encoder + patch_embed + head), "tokens": t,
            "layer_weight_matmuls": float(weights), "layer_attention_matmuls": float(attention)}  # fmt: skip


# --- what is trained -----------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adafactor", "sgd", "lamb", "lars")
ATTENTIONS = ("sdpa", "eager")  # transformers' default for training is SDPA; diagnostics need eager


@dataclass(frozen=True)
class Setup:
    """One training configuration, in `vitserve finetune`'s terms."""

    batch: int = 4
    precision: str = "fp32"  # bf16 / fp16: autocast over fp32 master weights, as finetune trains
    attention: str = "sdpa"
    checkpointing: bool = False
    optimizer: str = "adamw"
    lora_r: int = 0  # 0: no LoRA
    lora_dropout: float = 0.1
    frozen: str = "none"  # none | patch-embed | blocks:N | linear-probe (finetune --freeze)
    accumulation: int = 1
    sam: bool = False
    device: str = "cuda"  # cuda: torch's foreach optimizers (a full-size temporary); cpu: per-tensor loops

    @property
    def autocast(self) -> bool:
        return self.precision != "fp32"


def frozen_layers(s: VitShape, setup: Setup) -> int:
    """Blocks that run without autograd: the first N with --freeze blocks:N, all of them for a linear probe."""
    if setup.frozen == "linear-probe":
        return s.layers
    kind, _, n = setup.frozen.partition(":")
    return min(int(n), s.layers) if kind == "blocks" else 0


def trainable_shapes(s: VitShape, setup: Setup) -> list[tuple[int, ...]]:
    """Shapes of the parameters the optimizer updates (finetune.model.freeze / add_lora)."""
    shapes = parameter_shapes(s)
    head = [sh for _, sh in shapes[-2:]]
    if setup.lora_r:  # PEFT: A (r×d) and B (d×r) on each of q, k, v, plus the full classifier (modules_to_save)
        r, d = setup.lora_r, s.hidden
        return [(r, d), (d, r)] * 3 * s.layers + head
    if setup.frozen == "linear-probe":
        return head
    per_layer = len(shapes[4:-4]) // s.layers
    skip = 4 + frozen_layers(s, setup) * per_layer if setup.frozen != "none" else 0  # embeddings + frozen blocks
    return [sh for _, sh in shapes[skip:]]


def trainable_count(s: VitShape, setup: Setup) -> int:
    return sum(numel(sh) for sh in trainable_shapes(s, setup))


# --- activations: what autograd keeps for backward ----------------------------------------------------------------


def layer_activations(s: VitShape, setup: Setup, *, first_lora_block: bool = False) -> dict[str, int]:
    """Bytes one trainable block of HF's ViT keeps for backward, tensor by tensor (transformers 5, torch 2.13).

    Under autocast, linears and attention run in 16 bits but LayerNorm, softmax and the residual stream stay fp32,
    and each linear casts its input itself: the LayerNorm output feeding q, k and v is cast three times. 16-bit
    copies of the weights are saved too. A frozen linear keeps no input (it needs no weight gradient).
    """
    b, t, d, m, h = setup.batch, s.tokens, s.hidden, s.mlp, s.heads
    btd, btm, bt = b * t * d, b * t * m, b * t
    half = setup.autocast
    a = 2 if half else 4  # bytes of a matmul's input or output
    saved = {"layernorm inputs (fp32 residual stream) and statistics": 2 * (4 * btd + 2 * 4 * bt)}
    if setup.lora_r:
        r, dropout = setup.lora_r, setup.lora_dropout > 0
        saved["LoRA dropout masks"] = 3 * 4 * btd if dropout else 0
        saved["LoRA A inputs"] = 3 * a * btd if (dropout or half) else 4 * btd  # one shared tensor in fp32
        saved["LoRA B inputs"] = 3 * a * b * t * r
        # SDPA keeps q, k, v and its output; eager keeps its bmm copies of q, k, v (the frozen o_proj keeps nothing)
        saved["q, k, v (+ SDPA output)"] = (4 if setup.attention == "sdpa" else 3) * a * btd
        saved["fc1 output (GELU input)"] = a * btm
        saved["16-bit weight copies"] = 2 * (4 * d * d + 2 * d * m + 3 * 2 * d * r) if half else 0
        if first_lora_block:  # its input needs no gradient: no LayerNorm-1 input, statistics, dropout masks, nor
            # the 16-bit q/k/v and LoRA-A weights (kept only to pass a gradient to their input)
            saved["layernorm inputs (fp32 residual stream) and statistics"] -= 4 * btd + 2 * 4 * bt
            saved["LoRA dropout masks"] = 0
            saved["16-bit weight copies"] -= 2 * (3 * d * d + 3 * d * r) if half else 0
    else:
        saved["q/k/v projection input"] = 3 * a * btd if half else 4 * btd
        saved["q, k, v, attention output"] = 4 * a * btd  # eager: bmm copies + o_proj input; SDPA: q, k, v, output
        saved["fc1 input"] = a * btd
        saved["fc1 output (GELU input), GELU output (fc2 input)"] = 2 * a * btm
        saved["16-bit weight copies"] = 2 * (4 * d * d + 2 * d * m) if half else 0
    if setup.attention == "eager":  # fp32 softmax output, plus its 16-bit copy for A·V under autocast
        saved["attention probabilities"] = (6 if half else 4) * b * h * t * t
    else:  # SDPA never materialises the (T, T) matrix; it keeps the softmax log-sum-exp
        saved["attention log-sum-exp"] = 4 * b * h * t
    return saved


def activation_bytes(s: VitShape, setup: Setup) -> dict[str, int]:
    """Everything saved for backward in one forward pass: the trainable blocks, the embeddings, the head."""
    b, t, d, c = setup.batch, s.tokens, s.hidden, s.channels
    half = setup.autocast
    trained = s.layers - frozen_layers(s, setup)
    if setup.checkpointing:  # each block keeps only its input; backward recomputes one block at a time
        blocks = trained * 4 * b * t * d
    else:
        per_block = sum(layer_activations(s, setup).values())
        first = sum(layer_activations(s, setup, first_lora_block=True).values()) if setup.lora_r else per_block
        blocks = (trained - 1) * per_block + first if trained else 0
    # The training loop holds the fp32 batch through backward (the patch projection saves it too, in fp32); under
    # autocast the projection saves its own 16-bit copy and the 16-bit weight.
    pixels = 4 * b * c * s.image_size**2
    embeddings = 0
    if setup.frozen == "none" and not setup.lora_r and half:
        embeddings = pixels // 2 + 2 * d * c * s.patch_size**2
    head = 0 if setup.frozen == "linear-probe" else 4 * b * t * d + 2 * 4 * b * t  # final LayerNorm input, stats
    if half:  # the [CLS] row cast for the classifier, and the classifier's 16-bit weight when grads flow through
        head += 2 * b * d + (0 if setup.frozen == "linear-probe" else 2 * d * s.labels)
    else:  # the classifier keeps a view of the LayerNorm output, which holds the whole (B, T, D) storage
        head += 4 * b * t * d
    return {"input batch": pixels, "blocks": blocks, "embeddings": embeddings, "head": head}


def backward_transient(s: VitShape, setup: Setup) -> int:
    """Memory backward holds beyond the saved activations while it works through the last block. The MLP first: one
    (B, T, M) gradient more than it frees. Then attention, after the MLP's saved tensors are gone: eager softmax
    holds two (B, H, T, T) fp32 gradients (probabilities and scores), SDPA those of q, k and v. With
    checkpointing, the block being recomputed holds all its activations on top."""
    b, t, d, m, h = setup.batch, s.tokens, s.hidden, s.mlp, s.heads
    a = 2 if setup.autocast else 4  # 16-bit activations get 16-bit gradients
    mlp_saved = a * b * t * m * (1 if setup.lora_r else 2) + (0 if setup.lora_r else a * b * t * d)
    freed_before_attention = mlp_saved + 4 * b * t * d  # and the second LayerNorm's input
    attention = (2 * 4 * b * h * t * t if setup.attention == "eager" else 3 * a * b * t * d) - freed_before_attention
    transient = max(a * b * t * m, attention)
    if setup.checkpointing:
        transient += sum(layer_activations(s, setup).values())
    return transient


# --- memory --------------------------------------------------------------------------------------------------------

# Not measured here (no GPU on the project's machines): a CUDA context with torch's lazily loaded kernels plus cuBLAS
# workspaces takes about 0.5 GiB before the first tensor (nvidia-smi on an idle torch process), and the caching
# allocator holds more than it hands out (memory_reserved / max_memory_allocated is ~1.05-1.2 for fixed shapes).
CUDA_CONTEXT_BYTES = int(0.6 * GiB)
FRAGMENTATION = 0.10


def optimizer_state_bytes(s: VitShape, setup: Setup) -> int:
    """AdamW and LAMB keep two fp32 moments, SGD and LARS one momentum buffer; torch's Adafactor keeps factored
    second moments (a row and a column vector per matrix) and no first moment."""
    shapes = trainable_shapes(s, setup)
    if setup.optimizer == "adafactor":
        return 4 * sum(numel(sh[:-1]) + numel(sh[:-2]) * sh[-1] if len(sh) >= 2 else numel(sh) for sh in shapes)
    moments = {"adamw": 2, "lamb": 2, "sgd": 1, "lars": 1}[setup.optimizer]
    return 4 * moments * sum(numel(sh) for sh in shapes)


def optimizer_step_temporaries(s: VitShape, setup: Setup) -> int:
    """On CUDA torch's AdamW, SGD and Adafactor run foreach: one temporary as large as all trainable weights (AdamW's
    sqrt(v)). On CPU, and in finetune's own LAMB/LARS, they loop per tensor: two of the largest."""
    shapes = trainable_shapes(s, setup)
    if setup.device == "cuda" and setup.optimizer in ("adamw", "sgd", "adafactor"):
        return 4 * sum(numel(sh) for sh in shapes)
    return 2 * 4 * max(numel(sh) for sh in shapes)


@dataclass
class TrainingMemory:
    weights: int
    gradients: int
    optimizer_state: int
    activations: dict[str, int]
    backward_transient: int
    step_temporaries: int
    sam_offsets: int
    accumulation: int
    context: int
    fragmentation: float

    @property
    def activations_total(self) -> int:
        return sum(self.activations.values())

    @property
    def step_peak(self) -> int:
        """The step's peak above the resident weights and optimizer state: at the start of backward (activations)
        or in the optimizer step (gradients). With accumulation, later micro-batches also hold the gradients."""
        grads_during_backward = self.gradients if self.accumulation > 1 else 0
        backward = self.activations_total + self.backward_transient + grads_during_backward
        return max(backward, self.gradients + self.step_temporaries) + self.sam_offsets

    @property
    def allocated_peak(self) -> int:
        return self.weights + self.optimizer_state + self.step_peak

    @property
    def total(self) -> int:
        """What the device must have: the allocated peak, fragmentation and the context."""
        return int(self.allocated_peak * (1 + self.fragmentation)) + self.context


def training_memory(s: VitShape, setup: Setup) -> TrainingMemory:
    trainable = trainable_count(s, setup)
    weights = parameter_count(s) + (trainable if setup.lora_r else 0)  # PEFT adds adapters and a classifier copy
    cuda = setup.device == "cuda"
    return TrainingMemory(
        weights=4 * weights, gradients=4 * trainable, optimizer_state=optimizer_state_bytes(s, setup),
        activations=activation_bytes(s, setup), backward_transient=backward_transient(s, setup),
        step_temporaries=optimizer_step_temporaries(s, setup), sam_offsets=4 * trainable if setup.sam else 0,
        accumulation=setup.accumulation, context=CUDA_CONTEXT_BYTES if cuda else 0,
        fragmentation=FRAGMENTATION if cuda else 0.0,
    )  # fmt: skip


def inference_memory(s: VitShape, batch: int, precision: str, attention: str = "sdpa", device: str = "cuda") -> dict:
    """Serving holds the weights, the fp32 input batch and, inside a block, the largest set of tensors alive at once:
    in attention the residual stream, the LayerNorm output, q, k, v and the output (+ scores and probabilities when
    eager); in the MLP four (B, T, D) tensors (the residual stream, the LayerNorm output and what the block still
    references; counted from a measurement, tests/test_plan.py) and the two (B, T, M)."""
    b, t, d, m, h = batch, s.tokens, s.hidden, s.mlp, s.heads
    e = 4 if precision == "fp32" else 2
    attn = 6 * b * t * d + (2 * b * h * t * t if attention == "eager" else 0)
    mlp = 4 * b * t * d + 2 * b * t * m
    parts = {"weights": e * parameter_count(s), "input": 4 * b * s.channels * s.image_size**2,
             "working": e * max(attn, mlp), "context": CUDA_CONTEXT_BYTES if device == "cuda" else 0}  # fmt: skip
    return {**parts, "total": sum(parts.values())}


def largest_batch(s: VitShape, setup: Setup, budget: int, limit: int = 1 << 16) -> int:
    """The largest micro-batch whose training estimate fits in `budget` bytes (0: not even one image)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if training_memory(s, replace(setup, batch=mid)).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- speed ---------------------------------------------------------------------------------------------------------


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


# --- advice --------------------------------------------------------------------------------------------------------

LARGE_PARAMETERS = 200e6  # ViT-Large (304M) and up: the size the model card's dataset-size advice is about


def millions(n: float) -> str:
    return f"{n / 1e6:.0f}M" if n >= 10e6 else f"{n / 1e6:.2g}M"


def describe_base(base: str) -> tuple[str, str, VitShape | None]:
    """(family name, 'base ID, 304M parameters', shape) for a base the plan can size without loading weights or
    going to the network; ('the base', 'base ID', None) otherwise."""
    try:
        shape, _ = resolve_shape(base)
    except (ValueError, OSError, KeyError):
        return "the base", f"base {base}", None
    return family(shape), f"base {base}, {millions(parameter_count(shape))} parameters", shape


def dataset_advice(n_images: int, base: str = DEFAULT_BASE) -> tuple[bool, str]:
    """(is_a_warning, advice): the model card's dataset-size advice (google/vit-large-patch16-224-in21k: under 5,000
    images ViT-Large will likely overfit, 10,000+ recommended) for the base actually being fine-tuned. A base the
    plan cannot size is treated as ViT-Large, the default."""
    name, detail, shape = describe_base(base)
    if shape is not None and parameter_count(shape) < LARGE_PARAMETERS:
        if n_images < 10000:
            return False, (
                f"{n_images:,} images: {name} ({detail}) is smaller than ViT-Large, for which the model card "
                "wants 10,000+; watch the validation curve"
            )
        return False, f"over 10,000 images: enough for {name} ({detail}); ViT-Large may do better (16 GB+ GPU)"
    if n_images < 5000:
        base_id = HUB_IDS["vit-base"]
        return True, f"under 5,000 images: {name} will likely overfit ({detail}); consider ViT-Base ({base_id})"
    if n_images <= 10000:
        return False, f"5,000-10,000 images: marginal for {name} ({detail}); watch the validation curve"
    return False, f"over 10,000 images: enough for {name} ({detail})"


def setup_from_config(cfg, device: str = "cuda", batch: int | None = None) -> Setup:
    """finetune's TrainConfig (or the plan's own options) → Setup."""
    return Setup(
        batch=batch or cfg.batch_size, precision=cfg.precision, attention=getattr(cfg, "attention", "sdpa"),
        checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer, lora_r=cfg.lora_r if cfg.lora else 0,
        lora_dropout=getattr(cfg, "lora_dropout", 0.1), frozen=cfg.freeze,
        accumulation=getattr(cfg, "gradient_accumulation_steps", 1), sam=getattr(cfg, "sam", False), device=device,
    )  # fmt: skip


def alternatives(s: VitShape, setup: Setup, budget: int) -> list[tuple[str, int, bool]]:
    """What else could be run, as (options, estimated bytes, fits in budget): checkpointing, the largest micro-batch
    with accumulation making up the rest, LoRA, freezing half the blocks, Adafactor, ViT-Base for larger models."""
    options = []
    if not setup.checkpointing:
        options.append(("--gradient-checkpointing", replace(setup, checkpointing=True), s))
    fitting = largest_batch(s, setup, budget)
    if 0 < fitting < setup.batch:
        steps = math.ceil(setup.batch * setup.accumulation / fitting)
        options.append((f"--batch-size {fitting} --gradient-accumulation-steps {steps}",
                        replace(setup, batch=fitting, accumulation=steps), s))  # fmt: skip
    if not setup.lora_r:
        options.append(("--lora", replace(setup, lora_r=8, frozen="none"), s))
    if setup.frozen == "none" and not setup.lora_r:
        options.append((f"--freeze blocks:{s.layers // 2}", replace(setup, frozen=f"blocks:{s.layers // 2}"), s))
    if setup.optimizer in ("adamw", "lamb"):
        options.append(("--optimizer adafactor", replace(setup, optimizer="adafactor"), s))
    if parameter_count(s) > parameter_count(MODELS["vit-base"]):
        base = replace(MODELS["vit-base"], image_size=s.image_size, labels=s.labels)
        options.append((f"--base {HUB_IDS['vit-base']}", setup, base))
    return [(flags, (m := training_memory(shape, alt).total), m <= budget) for flags, alt, shape in options]


def fit_lines(s: VitShape, setup: Setup, budget: int) -> list[str]:
    """Whether the setup fits in `budget` bytes, its largest batch, and if it does not fit, what would."""
    need = training_memory(s, setup).total
    most = largest_batch(s, setup, budget)
    if need <= budget:
        lines = [f"fits in {budget / GiB:.0f} GiB ({need / GiB:.1f} GiB, {(budget - need) / GiB:.1f} spare); "
                 f"largest batch that fits: {most}"]  # fmt: skip
        if not setup.checkpointing:
            checkpointed = largest_batch(s, replace(setup, checkpointing=True), budget)
            lines.append(f"with --gradient-checkpointing: {checkpointed}")
        return lines
    lines = [f"does NOT fit in {budget / GiB:.0f} GiB: needs {need / GiB:.1f} GiB"
             + (f" (largest batch that fits: {most})" if most else " even at batch 1")]  # fmt: skip
    lines += [f"  {flags:<58} {bytes_ / GiB:6.1f} GiB  {'fits' if ok else 'does not fit'}"
              for flags, bytes_, ok in alternatives(s, setup, budget)]  # fmt: skip
    return lines


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


def human_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


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
