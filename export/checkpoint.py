"""checkpoint → FP32 PyTorch model + the facts export needs (labels, preprocessing, temperature).

Loaders are registered by name; ``load_checkpoint`` asks each whether it recognises the source: a Hugging Face ViT
folder or hub id, or a timm ViT (``model.safetensors`` plus timm's ``config.json`` with ``architecture`` and
``pretrained_cfg``, as timm publishes on the hub), whose weights are renamed to HF's ViT layout and whose
preprocessing (mean, std, interpolation, crop_pct) goes into the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from service.artifact import Preprocessing

CALIBRATION_FILE = "vitserve_calibration.json"  # written by `vitserve finetune`, read here into the manifest


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module  # FP32, eval mode, forward(pixel_values) → logits tensor
    labels: list[str]
    preprocessing: Preprocessing
    temperature: float
    name: str
    source: str
    source_sha256: str
    architecture: str
    preprocessing_source: Path | None = None  # the image-processor JSON the preprocessing came from
    calibration_source: Path | None = None  # vitserve_calibration.json, when fine-tuning wrote one


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # namespace/name; paths start with / or . instead
Loader = Callable[[str], LoadedCheckpoint | None]
_LOADERS: dict[str, Loader] = {}


def register_loader(name: str):
    def deco(fn: Loader) -> Loader:
        _LOADERS[name] = fn
        return fn

    return deco


def load_checkpoint(source: str) -> LoadedCheckpoint:
    for name, loader in _LOADERS.items():
        loaded = loader(source)
        if loaded is not None:
            return loaded
    raise ValueError(f"no loader recognises {source!r} (known formats: {', '.join(_LOADERS)})")


def weights_sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


class _LogitsOnly(torch.nn.Module):
    """HF models return a ModelOutput; export and parity want a plain (B, L) tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def local_folder(source: str, is_ours: Callable[[dict], bool]) -> tuple[Path, dict] | None:
    """(folder, config.json) for a local folder or hub id (needs network) whose config.json `is_ours` accepts; a hub
    repo is downloaded (JSON and safetensors only) after its config.json says it is."""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            return None
        cfg = json.loads((path / "config.json").read_text())
        return (path, cfg) if is_ours(cfg) else None
    if not (_HUB_ID.fullmatch(source) and not path.exists()):
        return None
    from huggingface_hub import hf_hub_download, snapshot_download  # a transformers dependency

    cfg = json.loads(Path(hf_hub_download(source, "config.json")).read_text())
    if not is_ours(cfg):
        return None
    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"])), cfg


GENERIC_FOLDERS = {"checkpoint", "pytorch", "best", "final", "model"}  # names that say where, not what


def model_name(source: str) -> str:
    """The name a served model gets unless --name says otherwise: a hub id's name; a folder's own name, or, for a
    folder named for its role (`vitserve finetune`'s runs/NAME/checkpoint, an artifact's pytorch/), its parent's.
    (config.json's _name_or_path names the *base* a fine-tuned model started from, so it is not used.)"""
    path = Path(source)
    if _HUB_ID.fullmatch(source) and not path.exists():
        return source.split("/")[-1]
    path = path.resolve()
    return path.parent.name if path.name in GENERIC_FOLDERS and path.parent.name else path.name


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors weights; vitserve never unpickles .bin checkpoints")
    return files


@register_loader("huggingface-vit")
def load_hf_vit(source: str) -> LoadedCheckpoint | None:
    """A local HF ViTForImageClassification directory, or a hub id (needs network)."""
    from transformers import ViTForImageClassification

    found = local_folder(source, lambda cfg: cfg.get("model_type") == "vit")
    if found is None:
        return None
    local, cfg = found
    weight_files = safetensors_files(local)

    model = ViTForImageClassification.from_pretrained(local, use_safetensors=True, attn_implementation="eager")
    model = model.float().eval()
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    labels = [id2label[i] for i in range(len(id2label))]
    pre_cfg_path = local / "preprocessor_config.json"
    pre_cfg = json.loads(pre_cfg_path.read_text()) if pre_cfg_path.is_file() else {}
    calib_path = local / CALIBRATION_FILE
    temperature = float(json.loads(calib_path.read_text())["temperature"]) if calib_path.is_file() else 1.0
    return LoadedCheckpoint(
        model=_LogitsOnly(model).eval(),
        labels=labels,
        preprocessing=Preprocessing.from_hf(pre_cfg, model.config.image_size),
        temperature=temperature,
        name=model_name(source),
        source=str(source),
        source_sha256=weights_sha256(weight_files),
        architecture="vit",
        preprocessing_source=pre_cfg_path if pre_cfg_path.is_file() else None,
        calibration_source=calib_path if calib_path.is_file() else None,
    )


# --- timm ViT checkpoints ------------------------------------------------------------------------------------------

# timm's architecture names carry the size; the weights carry every other dimension, but not the head count.
TIMM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16, "gigantic": 16}
TIMM_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
TIMM_DEFAULT_CROP_PCT = 0.875  # timm.data.constants.DEFAULT_CROP_PCT, used when pretrained_cfg has none
TIMM_DEFAULT_MEAN, TIMM_DEFAULT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_*
# Weights that mark a VisionTransformer variant HF's ViT cannot express (timm's vision_transformer.py names).
TIMM_UNSUPPORTED_WEIGHTS = {
    "fc_norm.": "fc_norm (a norm after pooling)", "norm_pre.": "pre-norm (norm_pre, as CLIP ViTs)",
    "reg_token": "register tokens", "dist_token": "a distillation token (DeiT distilled)",
    ".ls1.": "layer scale (init_values)", ".q_norm.": "q/k normalisation (qk_norm)", "attn_pool.": "MAP pooling",
    "patch_embed.backbone": "a hybrid CNN stem", "patch_embed.norm": "a norm after the patch embedding",
}  # fmt: skip
# model_args that would change the computation away from the standard ViT, with the values that do not.
TIMM_STANDARD_ARGS = {
    "class_token": (True,), "fc_norm": (False, None), "pre_norm": (False,), "no_embed_class": (False,),
    "reg_tokens": (0,), "init_values": (None,), "qk_norm": (False,), "final_norm": (True,), "proj_bias": (True,),
    "pos_embed": ("learn",), "act_layer": (None, "gelu"), "norm_layer": (None, "layernorm"), "block_fn": (None,),
    "mlp_layer": (None,), "attn_layer": (None,), "embed_layer": (None,),
}  # fmt: skip


def is_timm_config(cfg: dict) -> bool:
    return "architecture" in cfg and "pretrained_cfg" in cfg and "model_type" not in cfg


def _weight_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from the safetensors headers: nothing loaded."""
    from safetensors import safe_open

    shapes = {}
    for f in safetensors_files(folder):
        with safe_open(str(f), "pt") as fh:
            shapes.update({k: fh.get_slice(k).get_shape() for k in fh.keys()})
    return shapes


def _refuse_unsupported_timm(cfg: dict, shapes: dict[str, list[int]]) -> None:
    """Only the standard ViT (class token, global_pool="token", final norm, no fc_norm) maps onto HF's ViT."""
    args = cfg.get("model_args") or {}
    found: dict[str, str] = {}  # label → the first tensor showing it
    for k in sorted(shapes):
        for pattern, label in TIMM_UNSUPPORTED_WEIGHTS.items():
            if pattern in k:
                found.setdefault(label, k)
    problems = [f"{label} ({k})" for label, k in found.items()]
    pool = args.get("global_pool", cfg.get("global_pool", "token"))
    if pool != "token":
        problems.append(f'global_pool="{pool}" (HF\'s ViT classifies the class token: global_pool="token")')
    problems += [f"model_args {k}={v!r}" for k, v in args.items() if v not in TIMM_STANDARD_ARGS.get(k, (v,))]
    if "cls_token" not in shapes:
        problems.append("no class token")
    if "norm.weight" not in shapes:
        problems.append("no final norm")
    if not cfg["architecture"].startswith(("vit_", "deit_")):
        problems.append(f"architecture {cfg['architecture']!r} is not timm's VisionTransformer (vit_*, deit_*)")
    if problems:
        raise ValueError(f"unsupported timm ViT {cfg['architecture']!r}: {'; '.join(problems)}. Supported: the "
                         'standard ViT (class token, global_pool="token", final norm, no fc_norm / norm_pre)')


def timm_vit_config(folder: Path, cfg: dict | None = None):
    """The HF ViTConfig that computes what timm's standard ViT in `folder` computes (timm's LayerNorm eps is 1e-6,
    its GELU exact); refuses, naming it, any variant HF's ViT cannot express."""
    from transformers import ViTConfig

    cfg = cfg or json.loads((Path(folder) / "config.json").read_text())
    shapes = _weight_shapes(Path(folder))
    _refuse_unsupported_timm(cfg, shapes)
    args, pre = cfg.get("model_args") or {}, cfg["pretrained_cfg"]
    hidden, (_, channels, patch, _) = shapes["cls_token"][-1], shapes["patch_embed.proj.weight"]
    size = re.match(r"(?:vit|deit)_([a-z]+)_", cfg["architecture"])
    heads = args.get("num_heads") or TIMM_HEADS.get(size.group(1) if size else "")
    if not heads:
        raise ValueError(f"cannot tell the head count of timm architecture {cfg['architecture']!r}: add "
                         f"model_args.num_heads to its config.json (known sizes: {', '.join(TIMM_HEADS)})")
    image = args.get("img_size") or pre.get("input_size", [3, 224, 224])[-1]
    image = image if isinstance(image, int) else image[-1]
    tokens = shapes["pos_embed"][1]
    if tokens != (image // patch) ** 2 + 1:
        raise ValueError(f"timm ViT position embeddings hold {tokens} tokens, not the {(image // patch) ** 2 + 1} of "
                         f"{image} px with patch {patch} (+ class token)")
    labels = _timm_labels(cfg, shapes)
    return ViTConfig(
        image_size=image, patch_size=patch, num_channels=channels, hidden_size=hidden,
        num_hidden_layers=1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")),
        num_attention_heads=heads, intermediate_size=shapes["blocks.0.mlp.fc1.weight"][0], hidden_act="gelu",
        layer_norm_eps=1e-6, qkv_bias="blocks.0.attn.qkv.bias" in shapes,
        num_labels=max(1, len(labels)), id2label=dict(enumerate(labels)) if labels else None,
        label2id={n: i for i, n in enumerate(labels)} if labels and len(set(labels)) == len(labels) else None,
    )  # fmt: skip


def _timm_labels(cfg: dict, shapes: dict[str, list[int]]) -> list[str]:
    """timm's label_names when its config carries them, else class_N for each output of the head (none: no head)."""
    count = shapes["head.weight"][0] if "head.weight" in shapes else 0
    names = cfg.get("label_names") or cfg["pretrained_cfg"].get("label_names")
    if names and len(names) == count:
        return [str(n) for n in names]
    return [f"class_{i}" for i in range(count)]


def timm_to_hf_state_dict(weights: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """timm's ViT tensor names → HF ViT's checkpoint names (as transformers' convert_vit_timm_to_pytorch.py maps
    them), the fused qkv split into query, key and value. Raises on a tensor left unmapped."""
    rename = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
              "patch_embed.proj.": "vit.embeddings.patch_embeddings.projection.", "norm.": "vit.layernorm.",
              "head.": "classifier."}  # fmt: skip
    block = {"norm1.": "layernorm_before.", "attn.proj.": "attention.output.dense.", "norm2.": "layernorm_after.",
             "mlp.fc1.": "intermediate.dense.", "mlp.fc2.": "output.dense."}  # fmt: skip
    out, left = {}, set(weights)
    for name, tensor in weights.items():
        for old, new in rename.items():
            if name == old or (old.endswith(".") and name.startswith(old)):
                out[new + name[len(old):]] = tensor
                left.discard(name)
    for i in range(layers):
        prefix, hf = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = weights.get(f"{prefix}attn.qkv.{kind}")
            if qkv is not None:  # rows [q; k; v], each hidden-sized
                for part, chunk in zip(("query", "key", "value"), qkv.chunk(3, dim=0)):
                    out[f"{hf}attention.attention.{part}.{kind}"] = chunk.contiguous()
                left.discard(f"{prefix}attn.qkv.{kind}")
            for old, new in block.items():
                if f"{prefix}{old}{kind}" in weights:
                    out[f"{hf}{new}{kind}"] = weights[f"{prefix}{old}{kind}"]
                    left.discard(f"{prefix}{old}{kind}")
    if left:
        raise ValueError(f"timm ViT tensors with no place in HF's ViT: {', '.join(sorted(left)[:8])}")
    needed = ["cls_token", "pos_embed", "norm.weight", "norm.bias", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(layers):
        needed += [f"blocks.{i}.attn.qkv.weight"] + [f"blocks.{i}.{n}.{kind}" for kind in ("weight", "bias")
                                                      for n in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]
    if missing := [k for k in needed if k not in weights]:  # HF would initialise them at random: refuse instead
        raise ValueError(f"timm ViT lacks tensors HF's ViT needs: {', '.join(missing[:8])}")
    return out


def timm_preprocessing(pretrained_cfg: dict, image_size: int) -> Preprocessing:
    """timm's eval transform (timm.data.transforms_imagenet_eval) as the manifest's Preprocessing: resize to
    floor(size / crop_pct), then centre-crop `size`. crop_mode "center" keeps the aspect (shortest edge, the long side
    truncated and the crop's origin rounded, as torchvision computes both), "squash" resizes both sides; "border" pads
    with the mean colour, which the service does not do, and is refused."""
    interpolation = pretrained_cfg.get("interpolation") or "bilinear"
    if interpolation not in TIMM_INTERPOLATIONS:
        raise ValueError(f"timm interpolation {interpolation!r} is not one of {', '.join(TIMM_INTERPOLATIONS)}")
    scaled = math.floor(image_size / (pretrained_cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT))
    mode = pretrained_cfg.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise ValueError(f"timm crop_mode {mode!r} is not supported (center and squash are)")
    return Preprocessing(
        resize_mode="shortest_edge" if mode == "center" else "exact", resize_size=(scaled, scaled),
        center_crop=(image_size, image_size), crop_offset="round", resample=interpolation,
        mean=tuple(pretrained_cfg.get("mean") or TIMM_DEFAULT_MEAN),
        std=tuple(pretrained_cfg.get("std") or TIMM_DEFAULT_STD),
    )  # fmt: skip


def load_timm_vit_model(folder: Path, cfg: dict | None = None, attn_implementation: str = "eager", **config_changes):
    """A timm ViT folder as transformers' ViTForImageClassification (by default with eager attention, which can
    return attention weights); `config_changes` (num_labels, id2label, dropout, ...) are applied to the config before
    loading, and a head of another size is then freshly initialised (from_pretrained's ignore_mismatched_sizes)."""
    from safetensors.torch import load_file
    from transformers import ViTForImageClassification

    config = timm_vit_config(folder, cfg)
    weights: dict[str, torch.Tensor] = {}
    for f in safetensors_files(Path(folder)):
        weights.update(load_file(str(f)))
    state = timm_to_hf_state_dict(weights, config.num_hidden_layers)
    config.update(config_changes)
    return ViTForImageClassification.from_pretrained(
        None, config=config, state_dict=state, ignore_mismatched_sizes=True, attn_implementation=attn_implementation
    )


@register_loader("timm-vit")
def load_timm_vit(source: str) -> LoadedCheckpoint | None:
    """A timm ViT: a local folder or hub id with model.safetensors and timm's config.json."""
    found = local_folder(source, is_timm_config)
    if found is None:
        return None
    local, cfg = found
    if "head.weight" not in _weight_shapes(local):
        raise ValueError(f"{source} is a timm ViT without a classifier head (num_classes=0): fine-tune it first "
                         "(vitserve finetune --base ...)")
    model = load_timm_vit_model(local, cfg).float().eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    tag = cfg["pretrained_cfg"].get("tag")
    return LoadedCheckpoint(
        model=_LogitsOnly(model).eval(), labels=labels,
        preprocessing=timm_preprocessing(cfg["pretrained_cfg"], model.config.image_size), temperature=1.0,
        name=f"{cfg['architecture']}.{tag}" if tag else cfg["architecture"], source=str(source),
        source_sha256=weights_sha256(safetensors_files(local)), architecture="vit",
    )  # fmt: skip
