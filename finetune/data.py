"""Image folders in, checked samples and batches out.

A folder holds one subfolder per class; the sorted subfolder names are the labels. Before training every file is
opened and fully decoded once: unreadable files are listed and skipped, never a crash. The scan also reports classes
with few images, class imbalance, files duplicated across train and validation (same sha256) and the model card's
advice on dataset size.

Loading is the service's own preprocessing (service.preprocess): the same decode (JPEG draft scaling, EXIF
orientation, every mode to RGB with alpha composited on white, 16-bit scaled), the same resize and crop, from the
same Preprocessing spec export writes into the manifest. The dataset stops at uint8 (3, S, S) tensors; `normalize`
applies the service's folded arithmetic on the batch, so a model is evaluated, calibrated and selected on exactly
the tensors it will be served, and augmentation (finetune/augment.py) runs batched in between.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from finetune.config import UsageError
from finetune.estimates import dataset_advice
from finetune.shapes import DEFAULT_BASE
from finetune.storage import Folder
from service.artifact import Preprocessing
from service.errors import ServiceError
from service.preprocess import Preprocessor, decode_image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MIN_IMAGES_PER_CLASS = 10  # below this a class's validation score is a handful of images: noise
IMBALANCE_RATIO = 3.0  # largest / smallest class above this: report it (accuracy hides the small classes)
# Training reads trusted files of any size: only Pillow's own decompression-bomb ceiling applies (the service's
# per-request pixel limit guards a network endpoint, not a local folder).
MAX_TRAINING_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


@dataclass
class Scan:
    """What is in one image folder."""

    root: Folder  # local or remote (finetune.storage)
    classes: list[str]
    samples: list[tuple[str, int]]  # (path relative to root, label index), sorted
    sha256: dict[str, str]  # relative path -> hex digest of the file bytes
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    ignored: list[str] = field(default_factory=list)  # files without an image extension

    def counts(self) -> list[int]:
        c = Counter(label for _, label in self.samples)
        return [c[i] for i in range(len(self.classes))]


def check_image(folder: Folder, rel: str) -> tuple[str | None, str | None]:
    """(sha256, None) for an image the service would decode, (None, reason) otherwise. Decodes the whole file with
    the service's decoder: `verify()` alone misses truncated data, and a file named .jpg may be anything."""
    try:
        data = folder.read(rel)
        if not data:
            return None, "empty file"
        img = decode_image(data, max_pixels=MAX_TRAINING_PIXELS)
        if img.width < 1 or img.height < 1:
            return None, "zero-sized image"
        return hashlib.sha256(data).hexdigest(), None
    except ServiceError as e:
        return None, e.message
    except OSError as e:
        return None, f"{type(e).__name__}: {e}"


def scan_folder(root: str | os.PathLike, classes: list[str] | None = None, threads: int = 4) -> Scan:
    """Find and check every image under root/<class>/. `classes` fixes the label order (validation and test
    folders use the training folder's classes)."""
    root = root if isinstance(root, Folder) else Folder(root)
    if not root.exists():
        raise UsageError(f"{root}: not a folder")
    found = root.subfolders()
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise UsageError(f"{root}: needs at least 2 class subfolders, found {found}")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UsageError(f"{root}: classes {unknown} are not in the training folder's classes")
    index = {name: i for i, name in enumerate(classes)}

    candidates, ignored = [], []
    # Class by class, each in path order (part by part): the order samples had when folders were walked locally, so
    # a split is the same whatever the storage.
    for rel in sorted(root.files(exclude=[]), key=lambda rel: PurePosixPath(rel).parts):  # hidden ones left out
        name = rel.split("/", 1)[0]
        if "/" not in rel or name not in index:
            continue  # a file beside the class folders
        (candidates if Path(rel).suffix.lower() in IMAGE_EXTENSIONS else ignored).append((rel, index[name]))

    with ThreadPoolExecutor(max(1, threads)) as pool:  # decoding is mostly in C and releases the GIL; reads wait on I/O
        checked = list(pool.map(lambda c: check_image(root, c[0]), candidates))
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


def describe(
    train: Scan, train_samples: list, val_samples: list, val_sha: dict[str, str], info, warn, base: str = DEFAULT_BASE
) -> None:
    """Report corrupt files, small and imbalanced classes, train/val duplicates and the model card's dataset-size
    advice for `base`, the model being fine-tuned (finetune.estimates.dataset_advice)."""
    for rel, reason in train.corrupt:
        warn(f"skipping unreadable file {train.root}/{rel} ({reason})")
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

    is_warning, advice = dataset_advice(len(train_samples), base)
    (warn if is_warning else info)(
        f"dataset: {len(train_samples)} training images in {len(train.classes)} classes; model card advice: {advice}"
    )


def preprocessing(processor, image_size: int) -> Preprocessing:
    """The checkpoint's image processor as the serving manifest will describe it: export reads the same
    preprocessor_config.json through the same function (service.artifact.Preprocessing.from_hf)."""
    return Preprocessing.from_hf(json.loads(processor.to_json_string()), image_size)


def exact_resize(image_size: int) -> Preprocessing:
    """ViTImageProcessor's defaults: resize to S x S (bilinear), x / 255, mean = std = 0.5."""
    return Preprocessing(resize_mode="exact", resize_size=(image_size, image_size), resample="bilinear")


class ImageFolderDataset(torch.utils.data.Dataset):
    """(uint8 image (3, H, W), label) pairs, decoded, resized and cropped by the service's own code."""

    def __init__(self, root: Folder | Path, samples: list[tuple[str, int]], spec: Preprocessing | int):
        self.root, self.samples = root if isinstance(root, Folder) else Folder(root), samples
        self.spec = exact_resize(spec) if isinstance(spec, int) else spec
        self.preprocessor = Preprocessor(self.spec)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        hwc = self.preprocessor.decode_uint8(self.root.read(rel), max_pixels=MAX_TRAINING_PIXELS, index=i)
        return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1))), label  # (3, H, W) uint8


def normalization(spec: Preprocessing, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset), each (3,) float32: the model input is ``pixel * scale + offset`` for pixels on the 0..255
    scale. The very constants the service folds (service.preprocess.Preprocessor), not recomputed from mean/std."""
    pre = Preprocessor(spec)
    return torch.from_numpy(pre.scale.reshape(3)).to(device), torch.from_numpy(pre.offset.reshape(3)).to(device)


def normalize(images: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S), or float on the same 0..255 scale → the model's input, float32. The same two IEEE float32
    operations (multiply, then add) as the service, so evaluation tensors equal served ones bit for bit."""
    return images.float() * scale.view(1, -1, 1, 1) + offset.view(1, -1, 1, 1)
