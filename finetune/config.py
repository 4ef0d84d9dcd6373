"""Every option of `vitserve finetune`, its default and the reason for it, in one dataclass.

The command line is generated from this class (finetune/cli.py), so `--help` and `args.json` show exactly these
fields. `check()` turns nonsense into a `UsageError` (exit code 2) and values outside the model card's recommended
ranges into warnings that say why.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from finetune.shapes import DEFAULT_BASE

# The base model card (google/vit-large-patch16-224-in21k, as documented for this project) recommends these ranges.
RECOMMENDED_BATCH = (2, 16)
RECOMMENDED_EPOCHS = (1, 15)
RECOMMENDED_LR = (1e-6, 1e-4)

OPTIMIZERS = ("adamw", "sgd", "adafactor", "lamb", "lars")
AUGMENT_PRESETS = ("none", "light", "standard", "heavy")
PRECISIONS = ("fp32", "bf16", "fp16")
METRICS = ("top1", "top5", "macro_f1", "loss")


class UsageError(ValueError):
    """A bad option or unusable data; the CLI prints the message and exits with code 2."""


def arg(default, help: str, group: str, **argparse_kwargs):
    """A config field that also describes its command-line option."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_kwargs})


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------------------------
    train_dir: str | None = arg(None, "folder with one subfolder of images per class", "data", required=True)
    val_dir: str | None = arg(None, "validation folder (same layout); without it --val-split is held out", "data")
    val_split: float = arg(0.15, "fraction of each class held out for validation when there is no --val-dir", "data")
    test_dir: str | None = arg(None, "optional test folder, evaluated once with the best checkpoint", "data")
    image_size: int | None = arg(
        None, "training/serving resolution, position embeddings resized to it (None: the base's size)", "data"
    )
    # The ViT paper fine-tunes with crop + flip only; heavier presets pay off on small data or long runs.
    augment: str = arg("light", "augmentation preset (see finetune/augment.py)", "data", choices=AUGMENT_PRESETS)
    # 4 keeps one GPU busy with ViT-L at 224 px; never more than the cores this process may use (DataLoader warns,
    # and the workers would only take turns); 0 decodes images in the training process.
    num_workers: int = arg(min(4, len(os.sched_getaffinity(0))), "data loader worker processes", "data")

    # --- model ------------------------------------------------------------------------------------------------
    base: str = arg(DEFAULT_BASE, "local HF/timm ViT folder or hub id (safetensors only)", "model")
    # The ViT paper fine-tunes without dropout; 0.1 is worth trying on small datasets.
    dropout: float = arg(0.0, "hidden dropout (config.hidden_dropout_prob)", "model")
    attention_dropout: float = arg(0.0, "attention-probability dropout", "model")
    drop_path: float = arg(0.0, "stochastic depth rate of the last block (linear from 0 over depth)", "model")
    gradient_checkpointing: bool = arg(
        False, "recompute activations in backward: ~30%% slower, far less memory", "model"
    )
    freeze: str = arg("none", "none | patch-embed | blocks:N (embeddings + first N blocks) | linear-probe", "model")
    lora: bool = arg(False, "train LoRA adapters on the attention q/k/v projections (merged when saved)", "model")
    lora_r: int = arg(8, "LoRA rank", "model")
    lora_alpha: float = arg(16.0, "LoRA scale numerator (update scaled by alpha/r)", "model")
    lora_dropout: float = arg(0.1, "dropout on the LoRA input", "model")

    # --- optimisation -----------------------------------------------------------------------------------------
    batch_size: int = arg(4, "images per step per process (model card: 2-16)", "optimisation")
    epochs: int = arg(1, "passes over the training set (model card: 1-15)", "optimisation")
    learning_rate: float = arg(5e-5, "peak learning rate (model card: 1e-6..1e-4)", "optimisation", aliases=["--lr"])
    eval_steps: int = arg(1, "evaluate every N epochs (and always after the last)", "optimisation")
    optimizer: str = arg("adamw", "optimizer (docs/finetune.md: which suits what)", "optimisation", choices=OPTIMIZERS)
    sam: bool = arg(
        False, "wrap the optimizer in Sharpness-Aware Minimization (2 forward/backward per step)", "optimisation"
    )
    sam_rho: float = arg(0.05, "SAM neighbourhood radius (Foret et al. use 0.05)", "optimisation")
    # Decoupled decay, not applied to biases, norms, position embeddings or the CLS token (DeiT/BEiT recipes).
    weight_decay: float = arg(0.05, "weight decay", "optimisation")
    warmup_ratio: float = arg(0.1, "fraction of steps with linear warmup before cosine decay", "optimisation")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step", "optimisation")
    max_grad_norm: float = arg(1.0, "clip the gradient norm to this (0: off); the ViT paper clips at 1", "optimisation")
    label_smoothing: float = arg(0.0, "label smoothing of the cross-entropy targets", "optimisation")
    # fp32 runs everywhere and reproduces bit for bit; use bf16 on Ampere or newer GPUs.
    precision: str = arg(
        "fp32", "fp32 | bf16 (GPU, or CPU autocast) | fp16 (GPU only)", "optimisation", choices=PRECISIONS
    )
    auto_batch: bool = arg(
        False, "on CUDA, find the largest micro-batch that fits; keeps batch x accumulation", "optimisation"
    )
    seed: int = arg(42, "seed for the split, initialisation, data order and augmentation", "optimisation")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N", "optimisation")

    # --- run folder -------------------------------------------------------------------------------------------
    output: str | None = arg(None, "run folder (checkpoint/, metrics.json, report/ ...)", "output", required=True)
    resume: bool = arg(False, "continue from the run folder's last training state", "output")
    # ViT-L's training state is ~3.6 GB (weights + AdamW moments): a few minutes of GPU time between saves.
    save_every_steps: int = arg(
        500, "also save the training state every N optimizer steps (0: epoch ends only)", "output"
    )
    metric: str = arg("top1", "validation metric that picks the best checkpoint", "output", choices=METRICS)
    log_every_steps: int = arg(10, "record train loss and lr every N steps (training curves)", "output")


def freeze_spec(spec: str) -> tuple[str, int]:
    """'none' | 'patch-embed' | 'linear-probe' -> (kind, 0); 'blocks:N' -> ('blocks', N)."""
    if spec in ("none", "patch-embed", "linear-probe"):
        return spec, 0
    kind, _, n = spec.partition(":")
    if kind == "blocks" and n.isdigit():
        return "blocks", int(n)
    raise UsageError(f"--freeze {spec!r}: expected none, patch-embed, blocks:N or linear-probe")


def outside_recommended(
    option: str, value: float, recommended: tuple, too_low: str, too_high: str, fmt: str = "", sep: str = "-"
) -> list[str]:
    """The warning (a list of one, or none) for a value outside the model card's `recommended` (lo, hi) range,
    with the reason for the side it is on; `fmt` formats the numbers, `sep` joins lo and hi."""
    lo, hi = recommended
    if lo <= value <= hi:
        return []
    why = too_low if value < lo else too_high
    return [f"{option} {value:{fmt}} is outside the model card's recommended {lo:{fmt}}{sep}{hi:{fmt}}: {why}"]


def check(cfg: TrainConfig) -> list[str]:
    """Raise UsageError for values that cannot work; return warnings for values outside recommended ranges."""

    def need(ok: bool, message: str):
        if not ok:
            raise UsageError(message)

    need(cfg.batch_size >= 1, f"--batch-size must be >= 1 (got {cfg.batch_size})")
    need(cfg.epochs >= 1, f"--epochs must be >= 1 (got {cfg.epochs})")
    lr = cfg.learning_rate
    need(math.isfinite(lr) and lr > 0, f"--learning-rate must be > 0 (got {lr})")
    need(cfg.eval_steps >= 1, f"--eval-steps must be >= 1 epoch (got {cfg.eval_steps})")
    need(cfg.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be >= 1")
    need(0 < cfg.val_split < 1, f"--val-split must be in (0, 1) (got {cfg.val_split})")
    need(cfg.image_size is None or cfg.image_size >= 1, "--image-size must be >= 1")
    need(cfg.num_workers >= 0, "--num-workers must be >= 0")
    need(cfg.weight_decay >= 0, "--weight-decay must be >= 0")
    need(0 <= cfg.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
    need(cfg.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 turns clipping off)")
    for name in ("label_smoothing", "dropout", "attention_dropout", "drop_path", "lora_dropout"):
        need(0 <= getattr(cfg, name) < 1, f"--{name.replace('_', '-')} must be in [0, 1)")
    need(cfg.lora_r >= 1, "--lora-r must be >= 1")
    need(cfg.lora_alpha > 0, "--lora-alpha must be > 0")
    need(cfg.sam_rho > 0, "--sam-rho must be > 0")
    need(cfg.save_every_steps >= 0, "--save-every-steps must be >= 0 (0: only at epoch ends)")
    need(cfg.log_every_steps >= 1, "--log-every-steps must be >= 1")
    kind, _ = freeze_spec(cfg.freeze)
    need(not (cfg.lora and kind != "none"), "--lora already freezes the base model; drop --freeze or --lora")
    need(not (cfg.sam and cfg.precision == "fp16"), "--sam with fp16 loss scaling is not supported; use bf16 or fp32")

    warnings = outside_recommended(
        "--batch-size", cfg.batch_size, RECOMMENDED_BATCH,
        too_low="a batch of 1 gives very noisy gradients",
        too_high="larger batches need more memory and usually a larger learning rate (scale it with the batch)",
    )  # fmt: skip
    lo, hi = RECOMMENDED_EPOCHS
    if cfg.epochs > hi:
        warnings.append(
            f"--epochs {cfg.epochs} is above the model card's recommended {lo}-{hi}: a pretrained ViT usually "
            "overfits by then; watch the validation curve (the best epoch is kept)"
        )
    note = ""
    if cfg.optimizer in ("lamb", "lars", "sgd", "adafactor"):
        note = f"; note the range is for AdamW, and {cfg.optimizer} usually wants a larger learning rate"
    warnings += outside_recommended(
        "--learning-rate", cfg.learning_rate, RECOMMENDED_LR, fmt="g", sep="..",
        too_low="steps this small barely move the weights" + note,
        too_high="steps this large can wreck the pretrained features (fine when training from scratch)" + note,
    )  # fmt: skip
    if cfg.val_dir is not None and cfg.val_split != TrainConfig.val_split:
        warnings.append("--val-split is ignored because --val-dir is given")
    if cfg.optimizer == "sgd" and cfg.learning_rate < 1e-3:
        warnings.append(
            "--optimizer sgd at a learning rate below 1e-3 will barely train a ViT; the ViT paper fine-tunes with "
            "SGD at 0.003-0.03 and clipping at 1"
        )
    return warnings


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


# Options that may change between a run and its --resume without changing what is computed.
RESUME_SAFE = {"resume", "num_workers", "device", "save_every_steps", "log_every_steps", "test_dir"}
