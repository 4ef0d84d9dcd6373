"""checkpoint → FP32 PyTorch model + the facts export needs (labels, preprocessing, temperature).

Loaders are registered by name; ``load_checkpoint`` asks each whether it recognises the source, so a
timm ViT loader can be added later as one more registered function without touching the rest.
"""

from __future__ import annotations

import hashlib
import json
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


@register_loader("huggingface-vit")
def load_hf_vit(source: str) -> LoadedCheckpoint | None:
    """A local HF ViTForImageClassification directory, or a hub id (needs network)."""
    from transformers import ViTForImageClassification

    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            return None
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("model_type") != "vit":
            return None
        weight_files = sorted(path.glob("*.safetensors"))
        if not weight_files:
            raise ValueError(f"{path} has no .safetensors weights; vitserve never unpickles .bin checkpoints")
        local = path
    elif _HUB_ID.fullmatch(source) and not path.exists():
        from huggingface_hub import snapshot_download  # a transformers dependency

        local = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
        weight_files = sorted(local.glob("*.safetensors"))
        cfg = json.loads((local / "config.json").read_text())
    else:
        return None

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
        name=cfg.get("_name_or_path") or local.name,
        source=str(source),
        source_sha256=weights_sha256(weight_files),
        architecture="vit",
        preprocessing_source=pre_cfg_path if pre_cfg_path.is_file() else None,
        calibration_source=calib_path if calib_path.is_file() else None,
    )
