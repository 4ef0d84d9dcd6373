"""Training augmentation presets, applied to whole batches with kornia (torchvision is not available here).

    preset    crop scale   flip  policy                  mixup / cutmix   random erasing
    none      -            -     -                       -                -
    light     0.80-1.00    yes   -                       -                -
    standard  0.35-1.00    yes   TrivialAugment          -                p=0.25
    heavy     0.08-1.00    yes   RandAugment(n=2, m=9)   0.8 / 1.0        p=0.25

`light` is the ViT paper's fine-tuning recipe (crop + flip); `heavy` is DeiT's recipe for training from scratch.
Every random draw uses torch's global generator, in the training process, so a run resumed from a checkpoint
(which stores that generator's state) augments exactly as the uninterrupted run would have.
Evaluation never augments: it is the service's preprocessing (finetune.data) and finetune.data.normalize alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from kornia.augmentation.auto import RandAugment, TrivialAugment

from finetune.data import normalize

POLICY_GROUP = 4  # kornia draws one policy op per call: apply it per group of 4 images so a batch sees several ops


@dataclass(frozen=True)
class Preset:
    crop_scale: tuple[float, float] | None = None
    flip: bool = False
    policy: str | None = None  # "trivial" | "randaugment"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    erase_prob: float = 0.0


PRESETS = {
    "none": Preset(),
    "light": Preset(crop_scale=(0.8, 1.0), flip=True),
    "standard": Preset(crop_scale=(0.35, 1.0), flip=True, policy="trivial", erase_prob=0.25),
    "heavy": Preset(
        crop_scale=(0.08, 1.0), flip=True, policy="randaugment", mixup_alpha=0.8, cutmix_alpha=1.0, erase_prob=0.25
    ),
}


class BatchAugment(torch.nn.Module):
    """uint8 images (B, 3, S, S) + labels (B,) -> normalized float images and targets.

    Targets are class indices (B,), or soft targets (B, C) when mixup/cutmix mixed the batch.
    """

    def __init__(self, preset: str, image_size: int, scale: torch.Tensor, offset: torch.Tensor, num_classes: int):
        super().__init__()
        p = PRESETS[preset]
        self.p, self.num_classes = p, num_classes
        self.register_buffer("scale", scale, persistent=False)  # finetune.data.normalization(spec)
        self.register_buffer("offset", offset, persistent=False)
        geometric = []
        if p.crop_scale:
            geometric.append(K.RandomResizedCrop((image_size, image_size), scale=p.crop_scale))
        if p.flip:
            geometric.append(K.RandomHorizontalFlip())
        self.geometric = torch.nn.Sequential(*geometric)
        self.policy = {None: None, "trivial": TrivialAugment(), "randaugment": RandAugment(n=2, m=9)}[p.policy]
        self.erase = K.RandomErasing(p=p.erase_prob, value=0.0) if p.erase_prob else None  # 0 = the mean pixel

    @torch.no_grad()
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 255.0  # (B, 3, S, S) in [0, 1]
        x = self.geometric(x)
        if self.policy is not None:
            x = torch.cat([self.policy(chunk) for chunk in x.split(POLICY_GROUP)]).clamp_(0, 1)
        x = normalize(x * 255.0, self.scale, self.offset)  # back on the 0..255 scale the served arithmetic takes
        if self.erase is not None:
            x = self.erase(x)
        return mix(x, labels, self.num_classes, self.p.mixup_alpha, self.p.cutmix_alpha)


def mix(x: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019), chosen 50/50 when both are on, with the batch
    reversed as partner. Returns (images, soft targets (B, C)), or (images, labels) when neither is on."""
    if not (mixup_alpha or cutmix_alpha) or len(x) < 2:
        return x, labels
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or torch.rand(()) < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = x.flip(0)
    if use_cutmix:  # paste a box covering (1 - lam) of the image from the partner; lam = the area that is left
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1 - lam) * partner
    one_hot = F.one_hot(labels, num_classes).float()  # (B, C)
    return x, lam * one_hot + (1 - lam) * one_hot.flip(0)
