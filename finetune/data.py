"""Image folders in, checked samples and batches out.

A folder holds one subfolder per class; the sorted subfolder names are the labels. Before training every file is
opened and fully decoded once: unreadable files are listed and skipped, never a crash. The scan also reports classes
with few images, class imbalance, files duplicated across train and validation (same sha256) and the model card's
advice on dataset size.

Loading reproduces the checkpoint's ViTImageProcessor exactly (resize to image_size x image_size, bilinear; x/255;
(x - mean) / std): the dataset returns uint8 (3, S, S) tensors and `normalize` does the rest on the batch, so the
eval transform is deterministic and augmentation (finetune/augment.py) runs batched between the two.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finetune.config import UsageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MIN_IMAGES_PER_CLASS = 10  # below this a class's validation score is a handful of images: noise
IMBALANCE_RATIO = 3.0  # largest / smallest class above this: report it (accuracy hides the small classes)


@dataclass
class Scan:
    """What is in one image folder."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path relative to root, label index), sorted
    sha256: dict[str, str]  # relative path -> hex digest of the file bytes
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    ignored: list[str] = field(default_factory=list)  # files without an image extension

    def counts(self) -> list[int]:
        c = Counter(label for _, label in self.samples)
        return [c[i] for i in range(len(self.classes))]


def check_image(path: Path) -> tuple[str | None, str | None]:
    """(sha256, None) for a readable image, (None, reason) otherwise. Decodes the whole file: `verify()` alone
    misses truncated data, and a file named .jpg may be anything."""
    try:
        data = path.read_bytes()
        if not data:
            return None, "empty file"
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable: open again and decode
            im.load()
            if im.width < 1 or im.height < 1:
                return None, "zero-sized image"
        return hashlib.sha256(data).hexdigest(), None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return None, f"{type(e).__name__}: {e}"


def scan_folder(root: str | os.PathLike, classes: list[str] | None = None, threads: int = 4) -> Scan:
    """Find and check every image under root/<class>/. `classes` fixes the label order (validation and test
    folders use the training folder's classes)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise UsageError(f"{root}: needs at least 2 class subfolders, found {found}")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UsageError(f"{root}: classes {unknown} are not in the training folder's classes")
    index = {name: i for i, name in enumerate(classes)}

    candidates, ignored = [], []
    for name in found:
        for path in sorted((root / name).rglob("*")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            rel = path.relative_to(root).as_posix()
            (candidates if path.suffix.lower() in IMAGE_EXTENSIONS else ignored).append((rel, index[name]))

    with ThreadPoolExecutor(max(1, threads)) as pool:  # decoding is mostly in C and releases the GIL
        checked = list(pool.map(lambda c: check_image(root / c[0]), candidates))
    samples, sha, corrupt = [], {}, []
    for (rel, label), (digest, reason) in zip(candidates, checked):
        if digest is None:
            corrupt.append((rel, reason))
        else:
            samples.append((rel, label))
            sha[rel] = digest
    return Scan(root, classes, samples, sha, corrupt, [rel for rel, _ in ignored])


def stratified_split(samples: list[tuple[str, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction * n) of each class (at least 1 when the class has 2+ images). Deterministic for
    a seed and independent of file-system order (samples are sorted first)."""
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for s in sorted(samples):
        by_class.setdefault(s[1], []).append(s)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, round(fraction * len(items)))) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return sorted(train), sorted(val)


def describe(train: Scan, train_samples: list, val_samples: list, val_sha: dict[str, str], info, warn) -> None:
    """Report corrupt files, small and imbalanced classes, train/val duplicates and the dataset-size advice."""
    for rel, reason in train.corrupt:
        warn(f"skipping unreadable file {train.root / rel} ({reason})")
    if train.ignored:
        shown = ", ".join(train.ignored[:5]) + (" ..." if len(train.ignored) > 5 else "")
        warn(f"ignoring {len(train.ignored)} file(s) without an image extension in {train.root}: {shown}")

    counts = Counter(label for _, label in train_samples)
    val_counts = Counter(label for _, label in val_samples)
    for i, name in enumerate(train.classes):
        if counts[i] == 0:
            raise UsageError(f"class {name!r} has no readable training images")
        if counts[i] < MIN_IMAGES_PER_CLASS:
            warn(f"class {name!r} has only {counts[i]} training images (fewer than {MIN_IMAGES_PER_CLASS})")
        if val_samples and val_counts[i] == 0:
            warn(f"class {name!r} has no validation images: its recall cannot be measured")
    smallest, largest = min(counts.values()), max(counts.values())
    if largest / smallest > IMBALANCE_RATIO:
        warn(
            f"class imbalance: largest class has {largest} training images, smallest {smallest} "
            f"(ratio {largest / smallest:.1f}); macro-F1 and per_class.csv show what top-1 hides"
        )

    train_hashes = {}
    for rel, _ in train_samples:
        train_hashes.setdefault(train.sha256[rel], rel)
    dups = [(train_hashes[h], rel) for rel, h in val_sha.items() if h in train_hashes]
    if dups:
        examples = "; ".join(f"{a} == {b}" for a, b in dups[:3])
        warn(
            f"{len(dups)} validation file(s) are byte-identical to training files (validation is optimistic): "
            + examples
        )

    n = len(train_samples)
    if n < 5000:
        advice = (
            "under 5,000 images: ViT-Large will likely overfit; consider ViT-Base (google/vit-base-patch16-224-in21k)"
        )
    elif n <= 10000:
        advice = "5,000-10,000 images: marginal for ViT-Large; watch the validation curve"
    else:
        advice = "over 10,000 images: enough for ViT-Large"
    message = f"dataset: {n} training images in {len(train.classes)} classes; model card advice: {advice}"
    (warn if n < 5000 else info)(message)


class ImageFolderDataset(torch.utils.data.Dataset):
    """(uint8 image (3, S, S), label) pairs: RGB, resized exactly as ViTImageProcessor does (PIL bilinear)."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], image_size: int):
        self.root, self.samples, self.image_size = Path(root), samples, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        with Image.open(self.root / rel) as im:
            im = im.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            pixels = torch.from_numpy(np.asarray(im).copy())  # (S, S, 3) uint8
        return pixels.permute(2, 0, 1), label  # (3, S, S)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float (B, 3, S, S) -> the model's input: (x / 255 - mean) / std, float32."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
