"""The model side of fine-tuning: load a ViT (Hugging Face, or timm's layout mapped onto it) with a new head, change
its resolution, add stochastic depth, freeze layers or add LoRA adapters, and save a plain Hugging Face checkpoint
the export stage takes unchanged. A randomly initialised ViT is saved the same way (`write_random_vit`): the offline
base of the demo, the tests and the benchmarks.

Weights are only ever read from safetensors (`use_safetensors=True`): never unpickled.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from finetune.config import UsageError, freeze_spec
from finetune.shapes import VitShape

DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults, used by the in21k ViT checkpoints


def timm_base(base: str) -> tuple[Path, dict] | None:
    """(folder, timm config.json) when `base` is a timm ViT (a local folder or a hub id), else None."""
    from export.checkpoint import is_timm_config, local_folder

    return local_folder(base, is_timm_config)


def load(
    base: str, labels: list[str], dropout: float = 0.0, attention_dropout: float = 0.0
) -> ViTForImageClassification:
    """The base ViT (an HF checkpoint, or a timm one mapped onto HF's layout) with a freshly initialised head for
    `labels` (the head is resized when the count differs)."""
    changes = dict(**label_fields(labels), hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout)
    try:
        if timm := timm_base(base):
            from export.checkpoint import load_timm_vit_model

            return load_timm_vit_model(*timm, attn_implementation="sdpa", **changes)  # transformers' training default
        return ViTForImageClassification.from_pretrained(
            base,
            ignore_mismatched_sizes=True,  # the base's head (or none) does not match our classes
            use_safetensors=True,
            **changes,
        )
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load base model {base!r} as a safetensors ViT checkpoint: {e}") from e


def image_processor_class():
    """transformers.ViTImageProcessor needs torchvision; without it the PIL one writes the same config file."""
    try:
        import torchvision  # noqa: F401
        from transformers import ViTImageProcessor
        return ViTImageProcessor
    except ImportError:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
        return ViTImageProcessorPil


def load_processor(base: str, image_size: int):
    """A ViTImageProcessor with the base's mean/std at our image size: resize to exactly S x S (PIL bilinear),
    x / 255, normalize. Only mean/std are taken from the base (a timm base's from its pretrained_cfg), so no other
    processor's options (crops, ...) leak in."""
    cls = image_processor_class()
    mean, std = list(DEFAULT_MEAN), list(DEFAULT_STD)
    try:
        if timm := timm_base(base):  # timm's pretrained_cfg (its default is ImageNet's statistics)
            from export.checkpoint import TIMM_DEFAULT_MEAN, TIMM_DEFAULT_STD

            pretrained = timm[1]["pretrained_cfg"]
            mean = list(pretrained.get("mean") or TIMM_DEFAULT_MEAN)
            std = list(pretrained.get("std") or TIMM_DEFAULT_STD)
        else:
            from transformers import AutoImageProcessor

            base_processor = AutoImageProcessor.from_pretrained(base)
            mean, std = list(base_processor.image_mean), list(base_processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError):  # no preprocessor_config.json: ViT's defaults
        pass
    return cls(
        size={"height": image_size, "width": image_size},
        resample=2,  # PIL bilinear, what finetune.data.ImageFolderDataset uses
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
    )


def set_image_size(model: ViTForImageClassification, image_size: int) -> None:
    """Resize the position embeddings to a new resolution (bicubic, as HF's interpolate_pos_encoding does) and
    record it in the config, so the saved checkpoint runs at `image_size` without `interpolate_pos_encoding`."""
    cfg, emb = model.config, model.vit.embeddings
    patch = cfg.patch_size
    if image_size % patch:
        raise UsageError(f"--image-size {image_size} must be a multiple of the base's patch size {patch}")
    pos = emb.position_embeddings.data  # (1, 1 + g*g, D)
    old_grid, new_grid, dim = math.isqrt(pos.shape[1] - 1), image_size // patch, pos.shape[-1]
    if new_grid != old_grid:
        grid = pos[:, 1:].reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim)  # (1, g'*g', D)
        emb.position_embeddings = torch.nn.Parameter(torch.cat([pos[:, :1], grid], dim=1))
    cfg.image_size = image_size
    emb.patch_embeddings.image_size = (image_size, image_size)
    emb.patch_embeddings.num_patches = new_grid * new_grid
    emb.image_size = (image_size, image_size)


def blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks (`vit.layers` in transformers 5, `vit.encoder.layer` before)."""
    vit = model.vit
    return vit.layers if hasattr(vit, "layers") else vit.encoder.layer


class DropPath:
    """Stochastic depth (Huang et al. 2016) per residual branch, as DeiT/timm train ViTs: during training each
    sample's branch output is zeroed with probability `rate` and the survivors scaled by 1 / (1 - rate).

    HF's ViT has no drop path, so this is a forward hook on the dropout that ends each residual branch (attention
    and MLP): it leaves the module tree and the saved weights untouched and is a no-op in eval mode. Under
    gradient checkpointing the recomputed mask is the same one, because checkpointing replays the RNG state.
    """

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.rate == 0:
            return output
        keep = 1 - self.rate
        mask = output.new_empty((output.shape[0],) + (1,) * (output.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return output * mask / keep


def add_drop_path(model, rate: float) -> list:
    """Drop path rising linearly from 0 (first block) to `rate` (last block); returns the hook handles."""
    layers, handles = blocks(model), []
    for i, layer in enumerate(layers):
        layer_rate = rate * i / max(1, len(layers) - 1)
        if hasattr(layer, "mlp"):  # transformers 5: one dropout after both branches, before each residual add
            branch_ends = [layer.dropout]
        else:  # transformers 4: ViTSelfOutput.dropout (attention) and ViTOutput.dropout (MLP)
            branch_ends = [layer.attention.output.dropout, layer.output.dropout]
        handles += [m.register_forward_hook(DropPath(layer_rate)) for m in branch_ends]
    return handles


def freeze(model, spec: str) -> None:
    """--freeze none | patch-embed | blocks:N | linear-probe (only the classifier trains)."""
    kind, n = freeze_spec(spec)
    if kind == "none":
        return
    if kind == "linear-probe":
        frozen = [model.vit]
    else:
        layers = blocks(model)
        if n > len(layers):
            raise UsageError(f"--freeze blocks:{n}: the base has only {len(layers)} blocks")
        frozen = [model.vit.embeddings, *list(layers)[:n]]
    for module in frozen:
        module.requires_grad_(False)


def attention_projections(model) -> list[str]:
    """Names of the q/k/v projection Linear modules in this transformers version."""
    for names in (["q_proj", "k_proj", "v_proj"], ["query", "key", "value"]):
        if all(any(n.endswith("." + name) for n, _ in model.named_modules()) for name in names):
            return names
    raise UsageError("could not find the attention q/k/v projections for --lora")


def add_lora(model, r: int, alpha: float, dropout: float):
    """Wrap the model in PEFT LoRA adapters on q/k/v; everything else frozen except the (new) classifier."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=attention_projections(model),
        modules_to_save=["classifier"],  # the new head must train in full
        bias="none",
    )
    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def plain(model) -> ViTForImageClassification:
    """The model as a plain ViTForImageClassification: a PEFT model is copied and its LoRA merged into the weights
    (`merge_and_unload`); a DDP wrapper is removed. The training model is left as it is."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "merge_and_unload"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return copy.deepcopy(model).merge_and_unload()
    return model


def save_checkpoint(model, processor, path: Path) -> None:
    """Write an HF checkpoint folder: config.json (with id2label/label2id), model.safetensors,
    preprocessor_config.json."""
    model = plain(model)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)


def tiny_config(**overrides) -> ViTConfig:
    """A tiny ViT config for tests and offline demos (overrides win)."""
    kw = dict(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=2,
    )  # fmt: skip
    kw.update(overrides)
    return ViTConfig(**kw)


def shape_config(shape: VitShape, **overrides) -> ViTConfig:
    """The ViT config of a `vitserve plan` shape, its class count as num_labels (overrides win)."""
    kw = dict(
        image_size=shape.image_size, patch_size=shape.patch_size, num_channels=shape.channels, hidden_size=shape.hidden,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, intermediate_size=shape.mlp,
        num_labels=shape.labels,
    )  # fmt: skip
    kw.update(overrides)
    return ViTConfig(**kw)


def label_fields(labels: list[str]) -> dict:
    """A ViT config's class fields for these class names, index = position: num_labels, id2label, label2id."""
    return dict(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


def random_vit(
    config: ViTConfig, *, seed: int = 0, head_std: float | None = None, head_bias_std: float | None = None
) -> ViTForImageClassification:
    """A randomly initialised ViT: torch.manual_seed(seed), then HF's init (truncated normal, std 0.02). A fresh
    head has zero bias and tiny weights, so every image gets near-identical logits; `head_std` and `head_bias_std`
    redraw the head's weight, then its bias, from N(0, std^2) to spread them like a trained head's."""
    torch.manual_seed(seed)
    model = ViTForImageClassification(config)
    with torch.no_grad():
        if head_std is not None:
            model.classifier.weight.normal_(0, head_std)
        if head_bias_std is not None:
            model.classifier.bias.normal_(0, head_bias_std)
    return model


def write_random_vit(
    out: str | Path,
    config: ViTConfig,
    *,
    seed: int = 0,
    labels: list[str] | None = None,
    head_std: float | None = None,
    head_bias_std: float | None = None,
) -> Path:
    """A `random_vit` saved as `vitserve finetune` saves a checkpoint: model.safetensors, config.json (with `labels`
    as id2label/label2id when given) and a preprocessor_config.json that resizes to the config's image size and
    normalizes with mean/std 0.5, as the in21k ViTs. Nothing is downloaded: the offline base of demos, tests and
    benchmarks."""
    if labels is not None:
        config = copy.deepcopy(config)
        config.update(label_fields(labels))
    model = random_vit(config, seed=seed, head_std=head_std, head_bias_std=head_bias_std)
    size = config.image_size
    processor = image_processor_class()(
        size={"height": size, "width": size}, image_mean=list(DEFAULT_MEAN), image_std=list(DEFAULT_STD)
    )
    save_checkpoint(model, processor, Path(out))
    return Path(out)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
