"""What a training step holds at its peak and how fast it runs, counted from the model's shapes (see finetune/plan.py
for the sum); the largest batch that fits; and the advice `vitserve plan` and fine-tuning give. Nothing here imports
torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from finetune.shapes import DEFAULT_BASE, HUB_IDS, MODELS, VitShape, family, numel, parameter_count, parameter_shapes, resolve_shape

GiB = 2**30

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
def human_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


